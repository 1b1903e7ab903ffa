/* lib/conn_count.h — active and pending TCP connections per backend and per frontend, kept by
 * sockops, and the choices that read them: least_connections (power of two choices) and
 * connection limits (circuit breaking).
 *
 * Reads:  services (slots), the socket's sock_revnat storage (sock_conn for sockets an older
 *         agent connected)
 * Writes: conn_counts (per backend endpoint), svc_conns (array, per svc_id; svc_conn_counts,
 *         the hash before it, for sockets an older build counted), the socket's state in
 *         sock_revnat (or sock_conn), conn_overflows (per-CPU, per svc_id)
 *
 * Counting happens in sockops, never at connect(): a connect() that fails before the SYN
 * (no route, no port) never reaches TCP_CONNECT_CB, so it is never counted and cannot leak.
 * A connection is counted once, in `active`, at TCP_CONNECT_CB, and taken back at CLOSE: what
 * every reader uses is active + pending (least_connections, limits, the metric), so moving it
 * from pending to active at ESTABLISHED cost two hash lookups and two atomics a connection for
 * a split nobody reads. `pending` holds only what an older build counted (it moved a
 * connection from pending to active at ESTABLISHED), and this build still does that move for
 * such a socket.
 * Each counted socket remembers in its own storage what it counted against and in which state;
 * every decrement is of something that socket incremented, so counts never go negative. That
 * storage is the socket's sock_revnat, which the connect hook creates for its reverse
 * translation anyway (one allocation a connect, not two); sockets connected by an older agent
 * keep their state in sock_conn, its former place, and are counted down from there. Storage and
 * counts are pinned: a restarted agent's programs decrement what the previous agent's programs
 * counted. The same storage names the frontend and backend for lib/latency.h, so sockops never
 * looks a counted socket up in revnat.
 */
#ifndef NM_LIB_CONN_COUNT_H
#define NM_LIB_CONN_COUNT_H

struct nm_conn_count {
	__u64 active;  /* from the SYN (TCP_CONNECT_CB) to CLOSE; an older build: from ESTABLISHED */
	__u64 pending; /* an older build's SYN_SENT connections; this build only takes them back */
};

enum nm_sock_conn_state {
	NM_SOCK_NONE = 0,    /* translated at connect(), not counted (yet) */
	NM_SOCK_PENDING = 1, /* counted as pending (an older build, in SYN_SENT) */
	NM_SOCK_ACTIVE = 2,  /* counted as active (this build: since its SYN) */
};

/* sock_revnat's flags: the socket's count state is in that storage's `state`. Unset (an older
 * agent's connect hook wrote the storage), it is in sock_conn. */
#define NM_SOCK_F_COUNTS 0x1
/* Set by sockops with the count: the frontend's count is in svc_conns (an array by svc_id),
 * not in svc_conn_counts (the hash an older build counted in, still counted down from). */
#define NM_SOCK_F_SVC_ARRAY 0x2

/* Per-socket storage of sockets an older agent's connect hook translated: the backend it chose,
 * and what sockops counted. This build keeps the same in sock_revnat (NM_SOCK_F_COUNTS); it
 * writes sock_conn only when a socket with an older agent's sock_revnat connects again. */
struct nm_sock_conn {
	struct nm_endpoint_key backend;
	__u32 svc_id;
	__u8 state; /* enum nm_sock_conn_state */
	__u8 pad[3];
};

#define NM_CONN_PROBES 8 /* slots probed for a backend under its cap (unrolled below) */

NM_PINNED_SK_STORAGE(sock_conn, struct nm_sock_conn);

BPF_F_TABLE("hash:" NM_PIN_DIR "/conn_counts", struct nm_endpoint_key, struct nm_conn_count,
	    conn_counts, NM_MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash:" NM_PIN_DIR "/svc_conn_counts", u32, struct nm_conn_count, svc_conn_counts,
	    NM_MAX_FRONTENDS, BPF_F_NO_PREALLOC);
/* Per frontend, by svc_id: an array, so counting a connection is an address computation (the
 * verifier inlines array lookups), not a hash lookup, at its SYN and at its CLOSE. 16 bytes a
 * possible frontend (2 MiB at the default 131,072), preallocated. A new pin beside
 * svc_conn_counts, so main's pins are adopted as they are: sockets an older build counted are
 * counted down in the hash (no NM_SOCK_F_SVC_ARRAY), and a frontend's load is the sum of both.
 * A reused svc_id keeps the count of its former owner's connections still open, which they
 * take back as they close (as the hash did): counts never go negative, so nobody zeroes it. */
BPF_TABLE_PINNED("array", u32, struct nm_conn_count, svc_conns, NM_MAX_FRONTENDS,
		 NM_PIN_DIR "/svc_conns");
#ifdef NM_COST_EP_ARRAY
/* bench/sock_cost.py's `eparray` build only (never the agent's): what conn_counts and
 * endpoint_health would cost in sockops as arrays indexed by an endpoint id carried in the
 * socket's storage. The id here is a stand-in (the backend port's low bits): counts are
 * per-port, not per endpoint, which is fine for measuring and wrong for anything else. */
BPF_ARRAY(cost_ep_counts, struct nm_conn_count, 1024);
BPF_ARRAY(cost_ep_health, struct nm_endpoint_health, 1024);
static __always_inline u32 nm_cost_endpoint_id(struct nm_endpoint_key *ek)
{
	return ek->port & 1023;
}
#endif
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/conn_overflows", u32, u64, conn_overflows,
	    NM_MAX_FRONTENDS, BPF_F_NO_PREALLOC);

static __always_inline void nm_endpoint_of_backend(struct nm_backend *be,
						   struct nm_endpoint_key *ek)
{
	ek->addr[0] = be->addr[0];
	ek->addr[1] = be->addr[1];
	ek->addr[2] = be->addr[2];
	ek->addr[3] = be->addr[3];
	ek->port = be->port;
	ek->family = be->family;
}

static __always_inline u64 nm_load(struct nm_conn_count *c)
{
	return c ? c->active + c->pending : 0;
}

static __always_inline u64 nm_backend_load(u32 backend_id)
{
	struct nm_backend *be = backends.lookup(&backend_id);
	if (!be)
		return ~0ULL;
	struct nm_endpoint_key ek = {};
	nm_endpoint_of_backend(be, &ek);
	return nm_load(conn_counts.lookup(&ek));
}

/* The backend id in slot `index` (0-based) of the bank key's master names; 0 if gone. */
static __always_inline u32 nm_slot_backend(struct nm_svc_key *key, u8 bank, u32 index)
{
	key->slot = ((u16)bank << NM_SLOT_BANK_SHIFT) | (u16)((index + 1) & NM_SLOT_INDEX_MASK);
	struct nm_svc_value *slot = services.lookup(key);
	return slot ? slot->backend_id : 0;
}

/* Active + pending connections of the backend in slot `index`; ~0 when the slot is gone. */
static __always_inline u64 nm_slot_load(struct nm_svc_key *key, u8 bank, u32 index)
{
	u32 id = nm_slot_backend(key, bank, index);
	return id ? nm_backend_load(id) : ~0ULL;
}

static __always_inline void nm_count_overflow(u32 svc_id)
{
	u64 zero = 0;
	u64 *v = conn_overflows.lookup_or_try_init(&svc_id, &zero);
	if (v)
		*v += 1;
}

/* Refine the slot index the algorithm chose. least_connections: a second slot holding another
 * backend is drawn, and the less loaded of the two wins (ties keep the first draw). Limits:
 * a backend at max_conns_per_backend is skipped for the next slot under it, up to
 * NM_CONN_PROBES slots. Returns 0 with *index set, or -1 when the frontend is over a limit
 * (every probed backend at its cap, or max_conns reached): the caller refuses. */
static __always_inline int nm_conn_choose(struct nm_svc_key *key, u8 bank, u8 algorithm,
					  u32 svc_id, u32 n, u32 max_per_backend, u32 max_total,
					  u32 *index)
{
	if (max_total && nm_load(svc_conns.lookup(&svc_id)) +
				 nm_load(svc_conn_counts.lookup(&svc_id)) >= max_total) {
		nm_count_overflow(svc_id);
		return -1;
	}
	if (algorithm == NM_ALG_LEAST_CONNECTIONS && n > 1) {
		u32 first = *index;
		u32 a = nm_slot_backend(key, bank, first);
		u32 second = (first + 1 + bpf_get_prandom_u32() % (n - 1)) % n;
		u32 b = nm_slot_backend(key, bank, second);
		if (b == a) { /* weights repeat a backend in several slots: one more draw */
			second = (first + 1 + bpf_get_prandom_u32() % (n - 1)) % n;
			b = nm_slot_backend(key, bank, second);
		}
		if (b && b != a && nm_backend_load(b) < nm_backend_load(a))
			*index = second;
	}
	if (!max_per_backend)
		return 0;
	u32 start = *index;
	/* Unrolled by hand: BCC cannot hand bpf_loop a callback, clang keeps a loop with early
	 * exits rolled, and the verifier then walks it into "too complex". */
#define NM_PROBE(i)                                                       \
	if ((i) < n) {                                                    \
		u32 at = start + (i) >= n ? start + (i) - n : start + (i); \
		if (nm_slot_load(key, bank, at) < max_per_backend) {        \
			*index = at;                                        \
			return 0;                                           \
		}                                                           \
	}
	NM_PROBE(0) NM_PROBE(1) NM_PROBE(2) NM_PROBE(3)
	NM_PROBE(4) NM_PROBE(5) NM_PROBE(6) NM_PROBE(7)
#undef NM_PROBE
	nm_count_overflow(svc_id);
	return -1;
}

/* What sockops reads and writes of a translated TCP socket, wherever its storage is: the backend
 * endpoint and frontend it is counted against (a copy), and its state byte (in the storage). */
struct nm_conn_ref {
	struct nm_endpoint_key backend;
	__u32 svc_id;
	__u8 *state; /* enum nm_sock_conn_state */
	__u8 *flags; /* sock_revnat's NM_SOCK_F_*; NULL for sock_conn (its counts: the hash) */
};

/* connect(), the former way: the chosen backend in sock_conn, for sockops to count. TCP only.
 * For a socket whose sock_revnat an older agent wrote, or which could get none (sock_lb.c
 * remember_connected()). */
static __always_inline void nm_conn_remember(struct bpf_sock_addr *ctx, struct nm_backend *be,
					     u32 svc_id)
{
	struct bpf_sock *sk = ctx->sk;
	if (ctx->protocol != IPPROTO_TCP || !sk)
		return;
	struct nm_sock_conn *sc = sock_conn.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!sc || sc->state != NM_SOCK_NONE)
		return; /* already counted: a second connect() on a connected socket fails */
	nm_endpoint_of_backend(be, &sc->backend);
	sc->svc_id = svc_id;
}

/* Add to a count. A decrement applies only to an entry that was there before: a missing entry
 * is created by an increment, never below zero. */
static __always_inline void nm_count_add(struct nm_conn_count *c, int created, s64 active,
					 s64 pending)
{
	if (active && !(created && active < 0))
		__sync_fetch_and_add(&c->active, active);
	if (pending && !(created && pending < 0))
		__sync_fetch_and_add(&c->pending, pending);
}

/* Move the socket's counts by (active, pending), backend and frontend alike: one lookup each,
 * also when ESTABLISHED moves an older build's connection from pending to active. */
static __always_inline void nm_conn_add(struct nm_conn_ref *ref, s64 active, s64 pending)
{
	struct nm_conn_count zero = {};
	int grows = active > 0 || pending > 0;
	int created = 0;
#ifdef NM_COST_EP_ARRAY /* measuring build only: an array by a stand-in endpoint id */
	u32 ep = nm_cost_endpoint_id(&ref->backend);
	struct nm_conn_count *c = cost_ep_counts.lookup(&ep);
#else
	struct nm_conn_count *c = conn_counts.lookup(&ref->backend);
	if (!c && grows) {
		conn_counts.insert(&ref->backend, &zero); /* fails harmlessly if another CPU won */
		c = conn_counts.lookup(&ref->backend);
		created = 1;
	}
#endif
	if (c)
		nm_count_add(c, created, active, pending);
	u32 svc_id = ref->svc_id;
	if (ref->flags && (*ref->flags & NM_SOCK_F_SVC_ARRAY)) {
		/* Every decrement here is of this socket's own increment: no floor needed. */
		struct nm_conn_count *a = svc_conns.lookup(&svc_id);
		if (a)
			nm_count_add(a, 0, active, pending);
		return;
	}
	created = 0;
	struct nm_conn_count *s = svc_conn_counts.lookup(&svc_id);
	if (!s && grows) {
		svc_conn_counts.insert(&svc_id, &zero);
		s = svc_conn_counts.lookup(&svc_id);
		created = 1;
	}
	if (s)
		nm_count_add(s, created, active, pending);
}

/* sockops: 1 with *ref filled when the connect hook translated this socket, else 0. The
 * socket's sock_revnat, or for a socket an older agent connected, its sock_conn. One lookup per
 * sockops run for sockets this build connected, shared by the counting here and the latency of
 * lib/latency.h. */
static __always_inline int nm_conn_ref_of(struct bpf_sock_ops *skops, struct nm_conn_ref *ref)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct nm_sock_revnat *sr = sock_revnat.sk_storage_get(sk, 0, 0);
	if (sr && (sr->flags & NM_SOCK_F_COUNTS)) {
		ref->backend.addr[0] = sr->backend[0];
		ref->backend.addr[1] = sr->backend[1];
		ref->backend.addr[2] = sr->backend[2];
		ref->backend.addr[3] = sr->backend[3];
		ref->backend.port = sr->backend_port;
		ref->backend.family = sr->family;
		ref->svc_id = sr->svc_id;
		ref->state = &sr->state;
		ref->flags = &sr->flags;
		return 1;
	}
	struct nm_sock_conn *sc = sock_conn.sk_storage_get(sk, 0, 0);
	if (!sc)
		return 0;
	ref->backend = sc->backend;
	ref->svc_id = sc->svc_id;
	ref->state = &sc->state;
	ref->flags = NULL;
	return 1;
}

/* sockops, for the ops nm_sockops lets through (TCP_CONNECT_CB, ACTIVE_ESTABLISHED_CB, and
 * STATE_CB to TCP_CLOSE). Returns 1 when the socket is counted, so its state callbacks must
 * stay on. */
static __always_inline int nm_conn_sockops(struct bpf_sock_ops *skops, struct nm_conn_ref *ref,
					   struct nm_endpoint_key *remote)
{
	if (!ref)
		return 0;
	u8 state = *ref->state;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Count only the destination the connect hook chose (not a later reconnect
		 * elsewhere on the same socket). */
		if (state != NM_SOCK_NONE || ref->backend.port != remote->port ||
		    ref->backend.family != remote->family ||
		    ref->backend.addr[0] != remote->addr[0] ||
		    ref->backend.addr[1] != remote->addr[1] ||
		    ref->backend.addr[2] != remote->addr[2] ||
		    ref->backend.addr[3] != remote->addr[3])
			return 0;
		/* Counted once, here, until CLOSE: ESTABLISHED then has no count to move. */
		*ref->state = NM_SOCK_ACTIVE;
#ifndef NM_COST_SVC_HASH /* measuring builds and tests: the former way, the hash */
		if (ref->flags)
			*ref->flags |= NM_SOCK_F_SVC_ARRAY;
#endif
		nm_conn_add(ref, 1, 0);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (state == NM_SOCK_ACTIVE)
			return 1; /* counted at its SYN: nothing to write */
		if (state != NM_SOCK_PENDING)
			return 0;
		/* Counted as pending by an older build before an upgrade: move it as it would. */
		*ref->state = NM_SOCK_ACTIVE;
		nm_conn_add(ref, 1, -1);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != 7 /* TCP_CLOSE */ || state == NM_SOCK_NONE)
			return state != NM_SOCK_NONE;
		if (state == NM_SOCK_ACTIVE)
			nm_conn_add(ref, -1, 0);
		else
			nm_conn_add(ref, 0, -1);
		*ref->state = NM_SOCK_NONE;
		if (ref->flags) /* a socket that connects again is counted afresh */
			*ref->flags &= ~NM_SOCK_F_SVC_ARRAY;
		return 0;
	}
	return state != NM_SOCK_NONE;
}

#endif /* NM_LIB_CONN_COUNT_H */
