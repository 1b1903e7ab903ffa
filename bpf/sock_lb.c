/* sock_lb.c — socket-level service load balancing on cgroup v2 sock_addr hooks.
 *
 * Hooks:  connect4/6     TCP connect() and UDP connect(): VIP:port -> backend, once per socket
 *         sendmsg4/6     unconnected UDP sendto(): the same, once per datagram
 *         recvmsg4/6     UDP recvfrom(): backend -> VIP, so replies seem to come from the VIP
 *         getpeername4/6 getpeername(): backend -> VIP, so the application sees the VIP
 *         sockops        TCP connect outcomes per backend endpoint (passive health), and
 *                        active/pending connection counts (lib/conn_count.h)
 * Also:   lib/policy.h decides L4 authorization and per-workload opt-out before a backend is
 *         chosen; lib/conn_count.h refines the choice (least_connections, connection limits)
 *         getsockopt, sk_msg, and the proxy redirect in connect4/6: lib/proxy.h, lib/accel.h
 * Reads:  services (masters + slots), backends, rr_state, revnat, affinity, maglev tables
 * Writes: the socket address in ctx, sock_revnat (connected sockets' storage, which sockops
 *         also counts TCP connections by), revnat (unconnected UDP, proxy redirects) and
 *         affinity (LRU), endpoint_health, failure events (ring buffer), per-CPU svc_stats /
 *         backend_stats / counters
 *
 * Because translation happens at connect(), packets carry the backend address from the start:
 * no per-packet NAT, no conntrack, nothing extra on the data path after the first syscall.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include "nodemesh.h"
#include "lib/flow.h"

/* Service table: masters and slots; sized for all frontends and all their slots. No
 * preallocation, so memory follows use and a replaced element is never recycled under a
 * reader (RCU). */
BPF_F_TABLE("hash:" NM_PIN_DIR "/services", struct nm_svc_key, struct nm_svc_value, services,
	    NM_MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash:" NM_PIN_DIR "/backends", u32, struct nm_backend, backends,
	    NM_MAX_BACKENDS, BPF_F_NO_PREALLOC);
/* Round-robin positions, one per frontend (svc_id), shared by all CPUs. */
BPF_TABLE_PINNED("array", u32, u64, rr_state, NM_MAX_FRONTENDS, NM_PIN_DIR "/rr_state");
/* Reverse translation of unconnected UDP (per datagram destination) and of proxy redirects
 * (lib/proxy.h reads it in sockops). */
BPF_TABLE_PINNED("lru_hash", struct nm_revnat_key, struct nm_revnat_value, revnat,
		 NM_MAX_REVNAT, NM_PIN_DIR "/revnat");
/* Reverse translation of a connected socket, in its own storage: created at connect() and
 * freed with the socket, instead of an LRU hash entry keyed by cookie that outlives it until
 * evicted (its cost per connect: bench/sock_cost.py, variants full and hashrevnat). Pinned,
 * so a restarted agent's programs read what the previous one's wrote. */
NM_PINNED_SK_STORAGE(sock_revnat, struct nm_sock_revnat);
/* Per-CPU counters. An entry is created here on first use and deleted by the agent when it
 * frees (and again when it reuses) the id, so memory follows the ids in use, programming a
 * service writes nothing here, and a reused id starts from zero. */
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/svc_stats", u32, struct nm_svc_stats, svc_stats,
	    NM_MAX_FRONTENDS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/backend_stats", u32, struct nm_backend_stats,
	    backend_stats, NM_MAX_BACKENDS, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, NM_CTR_MAX, NM_PIN_DIR "/counters");
BPF_TABLE_PINNED("array", u32, struct nm_info, info, 1, NM_PIN_DIR "/info");
BPF_TABLE_PINNED("lru_hash", struct nm_affinity_key, struct nm_affinity_value, affinity,
		 NM_MAX_AFFINITY, NM_PIN_DIR "/affinity");
BPF_F_TABLE("hash:" NM_PIN_DIR "/endpoint_health", struct nm_endpoint_key,
	    struct nm_endpoint_health, endpoint_health, NM_MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
/* Not pinned: each agent reads the ring of the programs it loaded. */
BPF_RINGBUF_OUTPUT(failure_events, 16);
#include "lib/maglev.h"

#include "lib/conn_count.h"
#include "lib/policy.h"

/* sock_addr programs: 1 lets the syscall go on, 0 rejects it (with the retval we set). */
#define SYS_PROCEED 1
#define SYS_REJECT 0

static __always_inline void count(u32 reason)
{
	u64 *v = counters.lookup(&reason);
	if (v)
		*v += 1;
}

#include "lib/select.h"

/* dst = src: an address as four words (IPv4 in word 0). */
static __always_inline void nm_addr_copy(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline void remember(void *ctx, struct nm_backend *be, struct nm_svc_key *vip,
				     u32 svc_id)
{
	struct nm_revnat_key rk = {};
	struct nm_revnat_value rv = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	nm_addr_copy(rk.addr, be->addr);
	rk.port = be->port;
	rk.family = be->family;
	nm_addr_copy(rv.addr, vip->addr);
	rv.port = vip->port;
	rv.svc_id = svc_id;
	if (revnat.update(&rk, &rv))
		count(NM_CTR_REVNAT_FAILED);
}

/* connect(): the same, in the socket's storage, which for TCP is also what sockops counts the
 * connection by (lib/conn_count.h): one storage a socket. A socket connected again (UDP may)
 * keeps only its latest peer, which is the only one it can receive from; a TCP socket already
 * counted keeps what it counts (its second connect() fails anyway). Falls back to revnat (and
 * sock_conn) when the storage cannot be had. */
static __always_inline void remember_connected(struct bpf_sock_addr *ctx, struct nm_backend *be,
					       struct nm_svc_key *vip, u32 svc_id)
{
	struct nm_sock_revnat want = {};
	nm_addr_copy(want.backend, be->addr);
	want.backend_port = be->port;
	want.family = be->family;
	nm_addr_copy(want.vip, vip->addr);
	want.vip_port = vip->port;
	want.svc_id = svc_id;
#ifndef NM_COST_TWO_STORAGES
	want.flags = NM_SOCK_F_COUNTS;
#endif
	struct bpf_sock *sk = ctx->sk;
	/* A new storage starts as `want`; an existing one is returned as it is. */
	struct nm_sock_revnat *sr = sk ? sock_revnat.sk_storage_get(sk, &want,
								    BPF_SK_STORAGE_GET_F_CREATE)
				       : NULL;
	if (!sr) {
		remember(ctx, be, vip, svc_id);
		nm_conn_remember(ctx, be, svc_id);
		return;
	}
	if (sr->flags & NM_SOCK_F_COUNTS) {
		if (sr->state != NM_SOCK_NONE)
			return;
	} else {
		/* Written by an older agent's connect hook (or the measuring build of the former
		 * way): that socket's count state lives in sock_conn, and stays there. */
		nm_conn_remember(ctx, be, svc_id);
	}
	sr->backend[0] = want.backend[0];
	sr->backend[1] = want.backend[1];
	sr->backend[2] = want.backend[2];
	sr->backend[3] = want.backend[3];
	sr->backend_port = want.backend_port;
	sr->family = want.family;
	sr->vip[0] = want.vip[0];
	sr->vip[1] = want.vip[1];
	sr->vip[2] = want.vip[2];
	sr->vip[3] = want.vip[3];
	sr->vip_port = want.vip_port;
	sr->svc_id = svc_id;
}

/* recvmsg, getpeername: the VIP behind peer (family, addr, port) of this socket, from its
 * storage (connected sockets) or else from revnat (unconnected UDP, proxy redirects, and
 * sockets an agent without sock_revnat connected). */
static __always_inline int lookup_reverse(struct bpf_sock_addr *ctx, u8 family, u32 a0, u32 a1,
					  u32 a2, u32 a3, u16 port, u32 *vip, u16 *vip_port)
{
	struct bpf_sock *sk = ctx->sk;
	struct nm_sock_revnat *sr = sk ? sock_revnat.sk_storage_get(sk, 0, 0) : NULL;
	if (sr && sr->family == family && sr->backend_port == port && sr->backend[0] == a0 &&
	    sr->backend[1] == a1 && sr->backend[2] == a2 && sr->backend[3] == a3) {
		vip[0] = sr->vip[0];
		vip[1] = sr->vip[1];
		vip[2] = sr->vip[2];
		vip[3] = sr->vip[3];
		*vip_port = sr->vip_port;
		return 1;
	}
	struct nm_revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr[0] = a0;
	rk.addr[1] = a1;
	rk.addr[2] = a2;
	rk.addr[3] = a3;
	rk.port = port;
	rk.family = family;
	struct nm_revnat_value *rv = revnat.lookup(&rk);
	if (!rv)
		return 0;
	vip[0] = rv->addr[0];
	vip[1] = rv->addr[1];
	vip[2] = rv->addr[2];
	vip[3] = rv->addr[3];
	*vip_port = rv->port;
	return 1;
}

static __always_inline int refuse(void)
{
	/* Without this the syscall would fail with EPERM; a missing backend is a refusal. */
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

static __always_inline int is_lb_protocol(struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_UDP;
}

/* The family-independent part of a translation of frontend key, whose master entry the caller
 * looked up: 0 when a racing update removed the frontend (leave the socket alone), -1 when it
 * has no backend or is over a connection limit (refuse), 1 with *out set to the backend, whose
 * address the caller writes into ctx in its family's shape. Policy was decided before
 * (admit()). */
static __always_inline int pick(struct bpf_sock_addr *ctx, struct nm_svc_key *key,
				struct nm_svc_value *master, struct nm_backend **out, int connected)
{
	struct nm_svc_key vip = *key;
	int is_service;
	u32 svc_id = 0;
#ifdef NM_COST_NO_NETNS
	u64 netns = 0;
#else
	u64 netns = bpf_get_netns_cookie(ctx);
#endif
	struct nm_backend *be = select_backend(netns, netns, key, master, &is_service, &svc_id);
	if (!is_service)
		return 0;
	if (is_service == 2) {
		nm_flow_emit(ctx, NM_FLOW_DROPPED, NM_FLOW_REASON_CONNECTION_LIMIT, &vip, NULL, svc_id);
		return -1;
	}
#ifndef NM_COST_NO_ACCOUNT
	account(svc_id, be != NULL);
#endif
#ifndef NM_COST_NO_FLOW
	nm_flow_emit(ctx, be ? NM_FLOW_TRANSLATED : NM_FLOW_NO_BACKEND, 0, &vip, be, svc_id);
#endif
	if (!be)
		return -1;
#ifndef NM_COST_NO_REVNAT
	/* Connected sockets: reverse translation and, for TCP, what sockops counts by, in one
	 * socket storage. Unconnected UDP: revnat, per datagram destination. */
	if (connected)
		remember_connected(ctx, be, &vip, svc_id);
	else
		remember(ctx, be, &vip, svc_id);
#endif
	*out = be;
	return 1;
}

/* NM_COST_NO_*: parts compiled out, in bench/sock_cost.py's measuring builds only (never
 * defined by the agent), to attribute the connect hook's cost. NM_COST_TWO_STORAGES: the
 * former way (count state in sock_conn, a second storage), for before/after and for the
 * tests of sockets an older agent connected; NM_COST_SVC_HASH (lib/conn_count.h) likewise,
 * a frontend's count in the svc_conn_counts hash instead of the svc_conns array. */

/* Policy comes first, before the proxy redirect and the choice of a backend: a caller the
 * policy denies must not reach the service through the proxy either. 1: go on translating;
 * 0: leave the address alone (not a policed frontend's business, or an opted-out workload);
 * -1: denied (the caller rejects with EPERM). */
static __always_inline int admit(struct bpf_sock_addr *ctx, struct nm_svc_key *key)
{
#ifdef NM_COST_NO_POLICY
	return 1;
#endif
	int decided = nm_policy_decide(key);
	if (decided == NM_POLICY_NO_LB)
		return 0;
	if (decided != NM_POLICY_DENIED)
		return 1;
	struct nm_svc_key master = *key;
	master.slot = 0;
	struct nm_svc_value *mv = services.lookup(&master);
	nm_flow_emit(ctx, NM_FLOW_DENIED, 0, key, NULL, mv ? mv->svc_id : 0);
	return -1;
}

#include "lib/proxy.h"
#include "lib/accel.h"

/* ---- IPv4 ---------------------------------------------------------------------------- */

static __always_inline int translate4(struct bpf_sock_addr *ctx, int connected)
{
	struct nm_svc_key key = {};
	key.addr[0] = ctx->user_ip4;
	key.port = (u16)ctx->user_port;
	key.proto = (u8)ctx->protocol;
	key.family = NM_FAMILY_V4;
	int admitted = admit(ctx, &key);
	if (admitted < 0)
		return nm_policy_reject();
	if (admitted == 0)
		return SYS_PROCEED;
	/* One lookup of the master entry for the proxy check and the choice of a backend. */
	struct nm_svc_value *master = services.lookup(&key);
	if (!master)
		return SYS_PROCEED; /* not a frontend */
#ifndef NM_COST_NO_PROXY
	if (nm_proxy_redirect4(ctx, &key, master))
		return SYS_PROCEED;
#endif
	struct nm_backend *be = NULL;
	int picked = pick(ctx, &key, master, &be, connected);
	if (picked == 0)
		return SYS_PROCEED;
	if (picked < 0 || !be)
		return refuse();
	ctx->user_ip4 = be->addr[0];
	ctx->user_port = be->port;
	return SYS_PROCEED;
}

int nm_connect4(struct bpf_sock_addr *ctx)
{
	if (!is_lb_protocol(ctx))
		return SYS_PROCEED;
	return translate4(ctx, 1);
}

int nm_sendmsg4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	int ret = translate4(ctx, 0);
	count(NM_CTR_UDP_SENDMSG);
	return ret;
}

/* recvmsg and getpeername: if this socket reached this backend through a VIP, show the VIP. */
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	u32 vip[4] = {};
	u16 vip_port = 0;
	if (lookup_reverse(ctx, NM_FAMILY_V4, ctx->user_ip4, 0, 0, 0, (u16)ctx->user_port, vip,
			   &vip_port)) {
		ctx->user_ip4 = vip[0];
		ctx->user_port = vip_port;
		count(NM_CTR_REVNAT_HIT);
	}
	return SYS_PROCEED;
}

int nm_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

int nm_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

/* ---- IPv6 ---------------------------------------------------------------------------- */

/* An AF_INET6 socket may connect to ::ffff:a.b.c.d; such a destination is an IPv4 frontend. */
static __always_inline int is_v4_mapped(u32 a0, u32 a1, u32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

static __always_inline int translate6(struct bpf_sock_addr *ctx, int connected)
{
	struct nm_svc_key key = {};
	u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2],
	    a3 = ctx->user_ip6[3];
	int mapped = is_v4_mapped(a0, a1, a2);
	if (mapped) {
		key.addr[0] = a3;
		key.family = NM_FAMILY_V4;
	} else {
		key.addr[0] = a0;
		key.addr[1] = a1;
		key.addr[2] = a2;
		key.addr[3] = a3;
		key.family = NM_FAMILY_V6;
	}
	key.port = (u16)ctx->user_port;
	key.proto = (u8)ctx->protocol;
	int admitted = admit(ctx, &key);
	if (admitted < 0)
		return nm_policy_reject();
	if (admitted == 0)
		return SYS_PROCEED;
	struct nm_svc_value *master = services.lookup(&key);
	if (!master)
		return SYS_PROCEED; /* not a frontend */
	if (nm_proxy_redirect6(ctx, &key, master, mapped))
		return SYS_PROCEED;
	struct nm_backend *be = NULL;
	int picked = pick(ctx, &key, master, &be, connected);
	if (picked == 0)
		return SYS_PROCEED;
	if (picked < 0 || !be)
		return refuse();
	if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = be->addr[0];
		count(NM_CTR_V4_IN_V6);
	} else {
		ctx->user_ip6[0] = be->addr[0];
		ctx->user_ip6[1] = be->addr[1];
		ctx->user_ip6[2] = be->addr[2];
		ctx->user_ip6[3] = be->addr[3];
	}
	ctx->user_port = be->port;
	return SYS_PROCEED;
}

int nm_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_lb_protocol(ctx))
		return SYS_PROCEED;
	return translate6(ctx, 1);
}

int nm_sendmsg6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	int ret = translate6(ctx, 0);
	count(NM_CTR_UDP_SENDMSG);
	return ret;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2],
	    a3 = ctx->user_ip6[3];
	int mapped = is_v4_mapped(a0, a1, a2);
	u32 vip[4] = {};
	u16 vip_port = 0;
	int found = mapped ? lookup_reverse(ctx, NM_FAMILY_V4, a3, 0, 0, 0, (u16)ctx->user_port,
					    vip, &vip_port)
			   : lookup_reverse(ctx, NM_FAMILY_V6, a0, a1, a2, a3, (u16)ctx->user_port,
					    vip, &vip_port);
	if (!found)
		return SYS_PROCEED;
	if (mapped) {
		ctx->user_ip6[3] = vip[0];
	} else {
		ctx->user_ip6[0] = vip[0];
		ctx->user_ip6[1] = vip[1];
		ctx->user_ip6[2] = vip[2];
		ctx->user_ip6[3] = vip[3];
	}
	ctx->user_port = vip_port;
	count(NM_CTR_REVNAT_HIT);
	return SYS_PROCEED;
}

int nm_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

int nm_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

/* ---- sockops: passive health ------------------------------------------------------------ */

#define NM_TCP_ESTABLISHED 1
#define NM_TCP_SYN_SENT 2
#define NM_TCP_CLOSE 7

static __always_inline void endpoint_of(struct bpf_sock_ops *skops, struct nm_endpoint_key *ek)
{
	if (skops->family == 2 /* AF_INET */) {
		ek->addr[0] = skops->remote_ip4;
		ek->family = NM_FAMILY_V4;
	} else {
		u32 a0 = skops->remote_ip6[0], a1 = skops->remote_ip6[1], a2 = skops->remote_ip6[2],
		    a3 = skops->remote_ip6[3];
		if (is_v4_mapped(a0, a1, a2)) {
			ek->addr[0] = a3;
			ek->family = NM_FAMILY_V4;
		} else {
			ek->addr[0] = a0;
			ek->addr[1] = a1;
			ek->addr[2] = a2;
			ek->addr[3] = a3;
			ek->family = NM_FAMILY_V6;
		}
	}
	/* Unlike sock_addr's user_port, sock_ops' remote_port holds the network-order port in its
	 * upper 16 bits (the kernel shifts it so that bpf_ntohl() gives the port). */
	ek->port = (u16)(skops->remote_port >> 16);
}

#include "lib/latency.h"

/* The endpoint's passive-health entry, if the agent watches it. Measuring builds only
 * (bench/sock_cost.py): NM_COST_NO_HEALTH looks nothing up, NM_COST_EP_ARRAY an array entry by
 * a stand-in endpoint id, whose `watched` test is a field the agent would set. */
static __always_inline struct nm_endpoint_health *nm_health_of(struct nm_endpoint_key *ek)
{
#if defined(NM_COST_NO_HEALTH)
	return NULL;
#elif defined(NM_COST_EP_ARRAY)
	u32 ep = nm_cost_endpoint_id(ek);
	struct nm_endpoint_health *h = cost_ep_health.lookup(&ep);
	return h && h->last_failure_ns >> 63 ? h : NULL;
#else
	return endpoint_health.lookup(ek);
#endif
}

/* Connect outcomes of client sockets in the cgroup, for endpoints the agent watches:
 * a connect that reaches ESTABLISHED is a success; one that goes from SYN_SENT to CLOSE was
 * refused, reset before it was established, or timed out (also when the application gave up
 * and closed it). Failures go to the agent on a ring buffer at once, so it can eject an
 * outlier within milliseconds of the Nth failure.
 *
 * A counted connection runs this about nine times (TIMEOUT_INIT, RWND_INIT, NEEDS_ECN,
 * TCP_CONNECT, ACTIVE_ESTABLISHED and four state changes); only three of those runs have work
 * (TCP_CONNECT, ACTIVE_ESTABLISHED and the move to CLOSE), so the other six leave before any
 * helper call or map lookup. */
int nm_sockops(struct bpf_sock_ops *skops)
{
	u32 op = skops->op;
	u32 old_state = 0;
	if (op == BPF_SOCK_OPS_STATE_CB) {
		/* Counting, latency and health act on the move to CLOSE only. */
		if (skops->args[1] != NM_TCP_CLOSE)
			return 1;
		old_state = skops->args[0];
	} else if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
			nm_mesh_sockops(skops);
		return 1;
	}
	if (op != BPF_SOCK_OPS_STATE_CB)
		nm_mesh_sockops(skops);
	struct nm_endpoint_key ek = {};
	endpoint_of(skops, &ek);
	struct nm_conn_ref ref = {};
	struct nm_conn_ref *sc = nm_conn_ref_of(skops, &ref) ? &ref : NULL;
	/* Before counting forgets it: was this an established, counted connection? */
	if (sc && op == BPF_SOCK_OPS_STATE_CB)
		nm_latency_closed(skops, sc, old_state);
	/* Active connection counts: a counted socket keeps its state callbacks to its close. */
	int counted = nm_conn_sockops(skops, sc, &ek);
	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
#ifndef NM_COST_NO_STATE_CB /* measuring builds only: no CLOSE, so counts never go down */
		if (counted || nm_health_of(&ek))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							 BPF_SOCK_OPS_STATE_CB_FLAG);
#endif
		break;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		struct nm_endpoint_health *h = nm_health_of(&ek);
		if (h) {
			h->consecutive_failures = 0;
			__sync_fetch_and_add(&h->successes, 1);
		}
		/* Established: the rest of the socket's life is not our business, unless it is
		 * counted (lib/conn_count.h), and then its end is measured too (lib/latency.h). */
		if (counted && sc)
			nm_latency_established(skops, sc);
		else
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags &
							 ~BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB: {
		if (old_state != NM_TCP_SYN_SENT)
			break;
		struct nm_endpoint_health *h = nm_health_of(&ek);
		if (!h)
			break;
		u64 consecutive = __sync_fetch_and_add(&h->consecutive_failures, 1) + 1;
		__sync_fetch_and_add(&h->failures, 1);
		u64 now = bpf_ktime_get_ns();
		h->last_failure_ns = now;
		count(NM_CTR_CONNECT_FAILED);
		struct nm_failure_event ev = {};
		ev.addr[0] = ek.addr[0];
		ev.addr[1] = ek.addr[1];
		ev.addr[2] = ek.addr[2];
		ev.addr[3] = ek.addr[3];
		ev.port = ek.port;
		ev.family = ek.family;
		ev.old_state = old_state;
		ev.consecutive_failures = (u32)consecutive;
		ev.ts_ns = now;
		failure_events.ringbuf_output(&ev, sizeof(ev), 0);
		break;
	}
	}
	return 1;
}
