/* lib/conn_count.h — active and pending TCP connections per backend and per frontend, kept by
 * sockops, and the choices that read them: least_connections (power of two choices) and
 * connection limits (circuit breaking).
 *
 * Reads:  services (slots), the socket's sock_conn storage
 * Writes: conn_counts (per backend endpoint), svc_conn_counts (per svc_id), sock_conn,
 *         conn_overflows (per-CPU, per svc_id)
 *
 * Counting happens in sockops, never at connect(): a connect() that fails before the SYN
 * (no route, no port) never reaches TCP_CONNECT_CB, so it is never counted and cannot leak.
 * Each counted socket remembers in its own storage what it counted against and in which state;
 * every decrement is of something that socket incremented, so counts never go negative. The
 * storage and the counts are pinned: a restarted agent's programs decrement what the previous
 * agent's programs counted. The same storage names the frontend and backend for lib/latency.h,
 * so sockops never looks a counted socket up in revnat.
 */
#ifndef NM_LIB_CONN_COUNT_H
#define NM_LIB_CONN_COUNT_H

struct nm_conn_count {
	__u64 active;  /* ESTABLISHED (and later, until CLOSE) */
	__u64 pending; /* SYN_SENT: connect() in flight */
};

enum nm_sock_conn_state {
	NM_SOCK_NONE = 0,    /* translated at connect(), not counted (yet) */
	NM_SOCK_PENDING = 1, /* counted as pending */
	NM_SOCK_ACTIVE = 2,  /* counted as active */
};

/* Per-socket storage: the backend the connect hook chose, and what sockops counted. */
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
	if (max_total && nm_load(svc_conn_counts.lookup(&svc_id)) >= max_total) {
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

/* connect(): remember the chosen backend on the socket, for sockops to count. TCP only. */
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

static __always_inline void nm_conn_add(struct nm_sock_conn *sc, int active, s64 delta)
{
	struct nm_conn_count zero = {};
	struct nm_conn_count *c = conn_counts.lookup(&sc->backend);
	if (!c && delta > 0) {
		conn_counts.insert(&sc->backend, &zero); /* fails harmlessly if another CPU won */
		c = conn_counts.lookup(&sc->backend);
	}
	if (c)
		__sync_fetch_and_add(active ? &c->active : &c->pending, delta);
	u32 svc_id = sc->svc_id;
	struct nm_conn_count *s = svc_conn_counts.lookup(&svc_id);
	if (!s && delta > 0) {
		svc_conn_counts.insert(&svc_id, &zero);
		s = svc_conn_counts.lookup(&svc_id);
	}
	if (s)
		__sync_fetch_and_add(active ? &s->active : &s->pending, delta);
}

/* sockops: the socket's storage, or NULL when the connect hook translated nothing for it. One
 * lookup per sockops run, shared by the counting here and the latency of lib/latency.h. */
static __always_inline struct nm_sock_conn *nm_sock_conn_of(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return NULL;
	return sock_conn.sk_storage_get(sk, 0, 0);
}

/* sockops, for the ops nm_sockops lets through (TCP_CONNECT_CB, ACTIVE_ESTABLISHED_CB, and
 * STATE_CB to TCP_CLOSE). Returns 1 when the socket is counted, so its state callbacks must
 * stay on. */
static __always_inline int nm_conn_sockops(struct bpf_sock_ops *skops, struct nm_sock_conn *sc,
					   struct nm_endpoint_key *remote)
{
	if (!sc)
		return 0;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Count only the destination the connect hook chose (not a later reconnect
		 * elsewhere on the same socket). */
		if (sc->state != NM_SOCK_NONE || sc->backend.port != remote->port ||
		    sc->backend.family != remote->family || sc->backend.addr[0] != remote->addr[0] ||
		    sc->backend.addr[1] != remote->addr[1] || sc->backend.addr[2] != remote->addr[2] ||
		    sc->backend.addr[3] != remote->addr[3])
			return 0;
		sc->state = NM_SOCK_PENDING;
		nm_conn_add(sc, 0, 1);
		return 1;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (sc->state != NM_SOCK_PENDING)
			return 0;
		sc->state = NM_SOCK_ACTIVE;
		nm_conn_add(sc, 0, -1);
		nm_conn_add(sc, 1, 1);
		return 1;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != 7 /* TCP_CLOSE */ || sc->state == NM_SOCK_NONE)
			return sc->state != NM_SOCK_NONE;
		nm_conn_add(sc, sc->state == NM_SOCK_ACTIVE, -1);
		sc->state = NM_SOCK_NONE;
		return 0;
	}
	return sc->state != NM_SOCK_NONE;
}

#endif /* NM_LIB_CONN_COUNT_H */
