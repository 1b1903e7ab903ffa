/* lib/accel.h — same-node acceleration: established local TCP sockets in a sockhash, and an
 * sk_msg program that moves each sendmsg() straight into the peer socket's receive queue.
 *
 * Hooks:  sockops (ACTIVE/PASSIVE_ESTABLISHED_CB, from nm_mesh_sockops): when --accelerate-local
 *         is on, each end of a TCP connection in the cgroup joins accel_socks, keyed by its own
 *         view of the 4-tuple
 *         sk_msg (nm_sk_msg, attached to accel_socks through a pinned sockmap link): look the
 *         peer up by the reversed tuple; found, bpf_msg_redirect_hash(BPF_F_INGRESS) skips the
 *         TCP/IP stack under both ends; not found (the peer is remote, or not in the cgroup),
 *         the message goes through TCP as usual and counts as a fallback
 * Reads:  mesh_config (lib/proxy.h)
 * Writes: accel_socks, accel_stats
 *
 * A socket leaves accel_socks by itself when it closes; the agent never deletes one. Loopback tuples carry the netns cookie
 * in the key, since every netns has its own 127.0.0.1; other addresses are node-wide.
 */
#ifndef NM_LIB_ACCEL_H
#define NM_LIB_ACCEL_H

#ifndef NM_MAX_ACCEL_SOCKETS
#define NM_MAX_ACCEL_SOCKETS 65536
#endif

enum nm_accel_counter {
	NM_ACCEL_REDIRECTED_BYTES = 0, /* bytes moved socket to socket */
	NM_ACCEL_REDIRECTED_MSGS = 1,  /* sendmsg chunks moved socket to socket */
	NM_ACCEL_FALLBACKS = 2,        /* messages that went through TCP: no local peer */
	NM_ACCEL_SOCKETS_ADDED = 3,    /* sockets put in accel_socks */
	NM_ACCEL_MAX = 4,
};

struct nm_sock_key {
	__u32 local[4];     /* this end's address (IPv4 in [0]) */
	__u32 remote[4];
	__u32 local_port;   /* host order */
	__u32 remote_port;  /* host order */
	__u64 netns;        /* loopback only: the netns cookie; else 0 */
	__u8 family;
	__u8 pad[7];
};

/* BCC's BPF_SOCKHASH, pinned: its table type carries the sockhash helpers as methods, which
 * BPF_TABLE_PINNED's generic type lacks. */
struct accel_socks_table_t {
	struct nm_sock_key key;
	int leaf;
	int (*update)(struct nm_sock_key *, int *);
	int (*delete)(struct nm_sock_key *);
	int (*sock_hash_update)(void *, void *, u64);
	int (*msg_redirect_hash)(void *, void *, u64);
	int (*sk_redirect_hash)(void *, void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" NM_PIN_DIR "/accel_socks")))
struct accel_socks_table_t accel_socks = {.max_entries = NM_MAX_ACCEL_SOCKETS};
BPF_TABLE_PINNED("percpu_array", u32, u64, accel_stats, NM_ACCEL_MAX, NM_PIN_DIR "/accel_stats");

static __always_inline void nm_accel_count(u32 which, u64 n)
{
	u64 *v = accel_stats.lookup(&which);
	if (v)
		*v += n;
}

/* A socket's addresses in one shape: v4-mapped IPv6 becomes IPv4, so that an AF_INET6 end
 * and its AF_INET peer build mirror-image keys. */
static __always_inline u8 nm_norm_addrs(u32 family, u32 l4, u32 r4, u32 *l6, u32 *r6,
					u32 *local, u32 *remote)
{
	if (family == 2 /* AF_INET */) {
		local[0] = l4;
		remote[0] = r4;
		return NM_FAMILY_V4;
	}
	if (r6[0] == 0 && r6[1] == 0 && r6[2] == bpf_htonl(0x0000ffff)) {
		local[0] = l6[3];
		remote[0] = r6[3];
		return NM_FAMILY_V4;
	}
	local[0] = l6[0];
	local[1] = l6[1];
	local[2] = l6[2];
	local[3] = l6[3];
	remote[0] = r6[0];
	remote[1] = r6[1];
	remote[2] = r6[2];
	remote[3] = r6[3];
	return NM_FAMILY_V6;
}

static __always_inline void nm_accel_add(struct bpf_sock_ops *skops, u8 family, u32 *local,
					 u32 *remote)
{
	struct nm_sock_key k = {};
	k.family = family;
	k.local[0] = local[0];
	k.local[1] = local[1];
	k.local[2] = local[2];
	k.local[3] = local[3];
	k.remote[0] = remote[0];
	k.remote[1] = remote[1];
	k.remote[2] = remote[2];
	k.remote[3] = remote[3];
	k.local_port = skops->local_port;
	k.remote_port = bpf_ntohl(skops->remote_port);
	if (nm_is_loopback(family, remote))
		k.netns = bpf_get_netns_cookie(skops);
	/* NOEXIST: never evict a socket already in (it would lose the unread data queued in it,
	 * see below); a colliding tuple is simply not accelerated. BCC rewrites these helper
	 * methods as whole statements: assign, then test. */
	int err = accel_socks.sock_hash_update(skops, &k, BPF_NOEXIST);
	if (err == 0)
		nm_accel_count(NM_ACCEL_SOCKETS_ADDED, 1);
}

/* The one call from nm_sockops: proxy bookkeeping and acceleration. */
static __always_inline void nm_mesh_sockops(struct bpf_sock_ops *skops)
{
	u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return;
	/* Established sockets matter only with acceleration on: ask before reading addresses. */
	struct nm_mesh_config *cfg = NULL;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB) {
		cfg = mesh_cfg();
		if (!cfg || !cfg->accelerate)
			return;
	}
	u32 local[4] = {}, remote[4] = {}, l6[4], r6[4];
	l6[0] = skops->local_ip6[0];
	l6[1] = skops->local_ip6[1];
	l6[2] = skops->local_ip6[2];
	l6[3] = skops->local_ip6[3];
	r6[0] = skops->remote_ip6[0];
	r6[1] = skops->remote_ip6[1];
	r6[2] = skops->remote_ip6[2];
	r6[3] = skops->remote_ip6[3];
	u8 family = nm_norm_addrs(skops->family, skops->local_ip4, skops->remote_ip4, l6, r6,
				  local, remote);
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		nm_proxy_record(skops, family, local, remote);
		return;
	}
	nm_accel_add(skops, family, local, remote);
}

/* A socket deleted from the sockhash loses what was redirected into it and not read yet (the
 * kernel purges its psock's queue), so the agent never deletes one. Turning acceleration off
 * (cleanup, or an agent started without --accelerate-local) clears mesh_config.accelerate
 * instead: the sockets stay in until they close, their next messages take TCP, and what was
 * queued is read first, in order. */
int nm_sk_msg(struct sk_msg_md *msg)
{
	struct nm_mesh_config *cfg = mesh_cfg();
	if (!cfg || !cfg->accelerate)
		return SK_PASS;
	u32 local[4] = {}, remote[4] = {}, l6[4], r6[4];
	l6[0] = msg->local_ip6[0];
	l6[1] = msg->local_ip6[1];
	l6[2] = msg->local_ip6[2];
	l6[3] = msg->local_ip6[3];
	r6[0] = msg->remote_ip6[0];
	r6[1] = msg->remote_ip6[1];
	r6[2] = msg->remote_ip6[2];
	r6[3] = msg->remote_ip6[3];
	u8 family = nm_norm_addrs(msg->family, msg->local_ip4, msg->remote_ip4, l6, r6, local,
				  remote);
	/* The peer's key is its own view of the connection: our remote is its local. */
	struct nm_sock_key peer = {};
	peer.family = family;
	peer.local[0] = remote[0];
	peer.local[1] = remote[1];
	peer.local[2] = remote[2];
	peer.local[3] = remote[3];
	peer.remote[0] = local[0];
	peer.remote[1] = local[1];
	peer.remote[2] = local[2];
	peer.remote[3] = local[3];
	peer.local_port = bpf_ntohl(msg->remote_port);
	peer.remote_port = msg->local_port;
	if (nm_is_loopback(family, remote))
		peer.netns = bpf_get_netns_cookie(msg);
	u32 size = msg->size;
	int verdict = accel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		nm_accel_count(NM_ACCEL_REDIRECTED_BYTES, size);
		nm_accel_count(NM_ACCEL_REDIRECTED_MSGS, 1);
	} else {
		nm_accel_count(NM_ACCEL_FALLBACKS, 1);
	}
	return SK_PASS;
}

#endif /* NM_LIB_ACCEL_H */
