/* lib/proxy.h — transparent redirect of service connections to a node-local proxy.
 *
 * Hooks:  connect4/6   (from translate4/6) a TCP connect to a frontend with a proxy port goes
 *                      to 127.0.0.1 / [::1]:port in the caller's own netns instead of a backend
 *         sockops      (TCP_CONNECT_CB, from nm_mesh_sockops) the redirected socket's source
 *                      port is now known: record (netns, client addr:port, proxy port) -> VIP
 *         getsockopt   SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the proxy's accepted socket
 *                      answered from that record, as netfilter's REDIRECT would
 * Reads:  services (master: proxy_port, flags), mesh_config, revnat
 * Writes: the socket address, revnat (so getpeername still shows the VIP), proxy_origdst,
 *         svc_stats.proxy_redirects
 *
 * No loops: a task running as the proxy uid, or inside the proxy cgroup, is never redirected;
 * its upstream connect to the VIP is balanced by the rest of sock_lb.c as usual.
 * Include after sock_lb.c's maps and helpers (services, svc_stats, count, remember).
 */
#ifndef NM_LIB_PROXY_H
#define NM_LIB_PROXY_H

#define NM_NO_UID 0xffffffff
#define NM_SO_ORIGINAL_DST 80 /* SO_ORIGINAL_DST (SOL_IP) == IP6T_SO_ORIGINAL_DST (SOL_IPV6) */
#define NM_SOL_IP 0
#define NM_SOL_IPV6 41

/* Node-wide settings, written by the agent at start (one element). */
struct nm_mesh_config {
	__u32 proxy_uid;          /* never redirected; NM_NO_UID: none */
	__u16 proxy_port;         /* node default proxy port, network order; 0: none */
	__u8 accelerate;          /* 1: sockops puts local TCP sockets in accel_socks */
	__u8 proxy_cgroup_level;  /* depth of --proxy-cgroup below the cgroup v2 root */
	__u64 proxy_cgroup_id;    /* --proxy-cgroup's id (inode); 0: none */
};

/* The client end of a redirected connection, as the proxy's accepted socket sees its peer. */
struct nm_origdst_key {
	__u64 netns;       /* bpf_get_netns_cookie(): the redirect stays in the caller's netns */
	__u32 addr[4];     /* client address (IPv4 in addr[0]) */
	__u16 port;        /* client port, network order */
	__u16 proxy_port;  /* the proxy's listening port, network order */
	__u8 family;
	__u8 pad[7];
};

struct nm_origdst {
	__u32 addr[4];     /* the VIP the application connected to */
	__u16 port;        /* VIP port, network order */
	__u8 family;
	__u8 pad;
	__u32 svc_id;
};

BPF_TABLE_PINNED("array", u32, struct nm_mesh_config, mesh_config, 1, NM_PIN_DIR "/mesh_config");
#ifndef NM_MAX_ORIGDST
#define NM_MAX_ORIGDST 65536
#endif
BPF_TABLE_PINNED("lru_hash", struct nm_origdst_key, struct nm_origdst, proxy_origdst,
		 NM_MAX_ORIGDST, NM_PIN_DIR "/proxy_origdst");

static __always_inline struct nm_mesh_config *mesh_cfg(void)
{
	u32 zero = 0;
	return mesh_config.lookup(&zero);
}

/* Is the calling task the proxy itself (its uid, or inside its cgroup)? */
static __always_inline int nm_is_proxy(struct nm_mesh_config *cfg)
{
	if ((u32)bpf_get_current_uid_gid() == cfg->proxy_uid)
		return 1;
	return cfg->proxy_cgroup_id &&
	       bpf_get_current_ancestor_cgroup_id(cfg->proxy_cgroup_level) == cfg->proxy_cgroup_id;
}

/* The proxy port for the frontend whose master entry the caller looked up, or 0 to balance as
 * usual. */
static __always_inline u16 nm_proxy_port(struct bpf_sock_addr *ctx, struct nm_svc_value *master,
					 u32 *svc_id)
{
	if (ctx->protocol != IPPROTO_TCP || (master->flags & NM_SVC_F_PROXY_OFF))
		return 0;
	struct nm_mesh_config *cfg = mesh_cfg();
	if (!cfg)
		return 0;
	u16 port = master->proxy_port ? master->proxy_port : cfg->proxy_port;
	if (!port || nm_is_proxy(cfg))
		return 0;
	*svc_id = master->svc_id;
	return port;
}

static __always_inline void nm_count_redirect(u32 svc_id)
{
	struct nm_svc_stats zero = {};
	struct nm_svc_stats *st = svc_stats.lookup_or_try_init(&svc_id, &zero);
	if (st)
		st->proxy_redirects += 1;
}

/* translate4: 1 when the connect was sent to the proxy (the caller proceeds), else 0. */
static __always_inline int nm_proxy_redirect4(struct bpf_sock_addr *ctx, struct nm_svc_key *key,
					      struct nm_svc_value *master)
{
	u32 svc_id = 0;
	u16 port = nm_proxy_port(ctx, master, &svc_id);
	if (!port)
		return 0;
	/* The proxy stands in for a backend in revnat: getpeername shows the VIP, and sockops
	 * finds the VIP there when the source port is known. */
	struct nm_backend proxy = {.family = NM_FAMILY_V4, .port = port};
	proxy.addr[0] = bpf_htonl(0x7f000001);
	remember(ctx, &proxy, key, svc_id);
	nm_count_redirect(svc_id);
	nm_flow_emit(ctx, NM_FLOW_PROXY_REDIRECT, 0, key, NULL, svc_id);
	ctx->user_ip4 = proxy.addr[0];
	ctx->user_port = port;
	return 1;
}

/* translate6: the same to [::1], or to ::ffff:127.0.0.1 for an IPv4 frontend reached through
 * a v4-mapped address (the socket is AF_INET6 and must stay on IPv4 loopback). */
static __always_inline int nm_proxy_redirect6(struct bpf_sock_addr *ctx, struct nm_svc_key *key,
					      struct nm_svc_value *master, int mapped)
{
	u32 svc_id = 0;
	u16 port = nm_proxy_port(ctx, master, &svc_id);
	if (!port)
		return 0;
	struct nm_backend proxy = {.port = port};
	if (mapped) {
		proxy.family = NM_FAMILY_V4;
		proxy.addr[0] = bpf_htonl(0x7f000001);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = proxy.addr[0];
	} else {
		proxy.family = NM_FAMILY_V6;
		proxy.addr[3] = bpf_htonl(1);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = proxy.addr[3];
	}
	remember(ctx, &proxy, key, svc_id);
	nm_count_redirect(svc_id);
	nm_flow_emit(ctx, NM_FLOW_PROXY_REDIRECT, 0, key, NULL, svc_id);
	ctx->user_port = port;
	return 1;
}

static __always_inline int nm_is_loopback(u8 family, u32 *a)
{
	if (family == NM_FAMILY_V4)
		return (bpf_ntohl(a[0]) >> 24) == 127;
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

/* sockops, TCP_CONNECT_CB: the source port is chosen and the SYN not sent yet, so the record
 * exists before the proxy can accept. Only loopback peers can be a redirect. */
static __always_inline void nm_proxy_record(struct bpf_sock_ops *skops, u8 family, u32 *local,
					    u32 *remote)
{
	if (!nm_is_loopback(family, remote))
		return;
	struct nm_revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(skops);
	rk.addr[0] = remote[0];
	rk.addr[1] = remote[1];
	rk.addr[2] = remote[2];
	rk.addr[3] = remote[3];
	rk.port = (u16)(skops->remote_port >> 16);
	rk.family = family;
	struct nm_revnat_value *rv = revnat.lookup(&rk);
	if (!rv)
		return;
	struct nm_origdst_key ok = {};
	ok.netns = bpf_get_netns_cookie(skops);
	ok.addr[0] = local[0];
	ok.addr[1] = local[1];
	ok.addr[2] = local[2];
	ok.addr[3] = local[3];
	ok.port = bpf_htons((u16)skops->local_port);
	ok.proxy_port = rk.port;
	ok.family = family;
	struct nm_origdst od = {};
	od.addr[0] = rv->addr[0];
	od.addr[1] = rv->addr[1];
	od.addr[2] = rv->addr[2];
	od.addr[3] = rv->addr[3];
	od.port = rv->port;
	/* A v4-mapped VIP was stored as an IPv4 frontend (addr[1..3] zero). */
	od.family = (rv->addr[1] | rv->addr[2] | rv->addr[3]) ? NM_FAMILY_V6 : family;
	od.svc_id = rv->svc_id;
	proxy_origdst.update(&ok, &od);
}

struct nm_sockaddr_in {
	u16 family;
	u16 port;
	u32 addr;
	u8 zero[8];
};

struct nm_sockaddr_in6 {
	u16 family;
	u16 port;
	u32 flowinfo;
	u32 addr[4];
	u32 scope_id;
};

/* cgroup getsockopt: runs after the kernel answered (without conntrack, ENOENT or
 * ENOPROTOOPT); for a redirected connection we replace that answer with the VIP. */
int nm_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != NM_SO_ORIGINAL_DST)
		return 1;
	int want6 = ctx->level == NM_SOL_IPV6;
	if (!want6 && ctx->level != NM_SOL_IP)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct nm_origdst_key ok = {};
	ok.netns = bpf_get_netns_cookie(ctx);
	if (sk->family == 2 /* AF_INET */) {
		ok.addr[0] = sk->dst_ip4;
		ok.family = NM_FAMILY_V4;
	} else {
		u32 a0 = sk->dst_ip6[0], a1 = sk->dst_ip6[1], a2 = sk->dst_ip6[2],
		    a3 = sk->dst_ip6[3];
		if (a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff)) {
			ok.addr[0] = a3;
			ok.family = NM_FAMILY_V4;
		} else {
			ok.addr[0] = a0;
			ok.addr[1] = a1;
			ok.addr[2] = a2;
			ok.addr[3] = a3;
			ok.family = NM_FAMILY_V6;
		}
	}
	ok.port = (u16)sk->dst_port;
	ok.proxy_port = bpf_htons((u16)sk->src_port);
	struct nm_origdst *od = proxy_origdst.lookup(&ok);
	if (!od)
		return 1;
	if (!want6 && od->family == NM_FAMILY_V4) {
		struct nm_sockaddr_in *sa = ctx->optval;
		if ((void *)(sa + 1) > ctx->optval_end || ctx->optlen < (int)sizeof(*sa))
			return 1;
		sa->family = 2;
		sa->port = od->port;
		sa->addr = od->addr[0];
		__builtin_memset(sa->zero, 0, sizeof(sa->zero));
		ctx->optlen = sizeof(*sa);
		ctx->retval = 0;
	} else if (want6 && od->family == NM_FAMILY_V6) {
		struct nm_sockaddr_in6 *sa6 = ctx->optval;
		if ((void *)(sa6 + 1) > ctx->optval_end || ctx->optlen < (int)sizeof(*sa6))
			return 1;
		sa6->family = 10;
		sa6->port = od->port;
		sa6->flowinfo = 0;
		sa6->addr[0] = od->addr[0];
		sa6->addr[1] = od->addr[1];
		sa6->addr[2] = od->addr[2];
		sa6->addr[3] = od->addr[3];
		sa6->scope_id = 0;
		ctx->optlen = sizeof(*sa6);
		ctx->retval = 0;
	}
	return 1;
}

#endif /* NM_LIB_PROXY_H */
