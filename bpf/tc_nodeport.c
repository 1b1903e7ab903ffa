/* tc_nodeport.c — the packet path for traffic that enters the node: NodePorts, externalIPs and
 * loadBalancerIPs, on TC (clsact, direct action) of the interfaces given with --interface.
 *
 * Hooks:  nm_tc_ingress  new flows to a frontend: backend chosen by lib/select.h (the socket
 *                        path's code), DNAT, SNAT unless externalTrafficPolicy is Local,
 *                        conntrack; replies and ICMP errors of known flows translated back
 *         nm_tc_egress   replies of Local flows (the client address was kept) translated back
 * Reads:  services, backends, rr_state, affinity (shared with sock_lb.c), node_addrs, tc_config
 * Writes: the packet, ct (LRU), per-CPU svc_stats, backend_stats, tc_stats, tc_drops
 *
 * A separate BCC unit from sock_lb.c: it is compiled only when --interface is given, and it
 * opens the socket path's pinned maps by path, so both programs see one service table.
 * Fragments and protocols other than TCP, UDP and ICMP pass untouched and are counted.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/socket.h>
#include "nodemesh.h"
#include "lib/tc_types.h"

/* The socket path's maps, declared exactly as in sock_lb.c: BCC opens their pins. */
BPF_F_TABLE("hash:" NM_PIN_DIR "/services", struct nm_svc_key, struct nm_svc_value, services,
	    NM_MAX_SERVICE_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash:" NM_PIN_DIR "/backends", u32, struct nm_backend, backends,
	    NM_MAX_BACKENDS, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, u64, rr_state, NM_MAX_FRONTENDS, NM_PIN_DIR "/rr_state");
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/svc_stats", u32, struct nm_svc_stats, svc_stats,
	    NM_MAX_FRONTENDS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/backend_stats", u32, struct nm_backend_stats,
	    backend_stats, NM_MAX_BACKENDS, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, NM_CTR_MAX, NM_PIN_DIR "/counters");
BPF_TABLE_PINNED("lru_hash", struct nm_affinity_key, struct nm_affinity_value, affinity,
		 NM_MAX_AFFINITY, NM_PIN_DIR "/affinity");

/* The packet path's own maps. */
BPF_TABLE_PINNED("lru_hash", struct nm_ct_key, struct nm_ct_value, ct, NM_MAX_CT,
		 NM_PIN_DIR "/ct");
BPF_TABLE_PINNED("array", u32, struct nm_tc_config, tc_config, 1, NM_PIN_DIR "/tc_config");
BPF_F_TABLE("hash:" NM_PIN_DIR "/node_addrs", struct nm_node_addr_key, u32, node_addrs,
	    NM_MAX_NODE_ADDRS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/tc_stats", struct nm_tc_stats_key, u64, tc_stats,
	    4096, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_array", u32, u64, tc_drops, NM_DROP_MAX, NM_PIN_DIR "/tc_drops");
BPF_TABLE_PINNED("percpu_array", u32, u64, tc_events, NM_TC_EV_MAX, NM_PIN_DIR "/tc_events");
/* ifindex -> NM_TC_IFACE_F_*: for the agent, so cleanup removes only the clsact qdiscs it
 * created (in the pin folder, because that is where everything nodemesh made is); for
 * forward(), the attached veths whose peer bpf_redirect_peer reaches. */
BPF_F_TABLE("hash:" NM_PIN_DIR "/tc_ifaces", u32, u32, tc_ifaces, 1024, BPF_F_NO_PREALLOC);

static __always_inline void count(u32 reason)
{
	u64 *v = counters.lookup(&reason);
	if (v)
		*v += 1;
}

#include "lib/maglev.h"
#include "lib/select.h"
#include "lib/conntrack.h"
#include "lib/nat.h"

/* struct bpf_redir_neigh of the kernel's uapi (Linux 5.10), which BCC 0.26's headers lack. */
struct nm_redir_neigh {
	u32 nh_family;
	u32 nh[4]; /* ipv4_nh in nh[0], or ipv6_nh */
};

/* BCC 0.26 declares bpf_redirect_neigh without its plen argument; the kernel's has four. */
static long (*nm_redirect_neigh)(u32 ifindex, void *params, int plen, u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

#ifndef NM_FIB_LOOKUP_SRC
#define NM_FIB_LOOKUP_SRC (1U << 4) /* BPF_FIB_LOOKUP_SRC (Linux 6.7), absent from older headers */
#endif

/* Per-CPU scratch space: BCC inlines every function into the program, whose stack is 512
 * bytes, so the larger temporaries of a packet live here (one packet at a time per CPU). */
struct nm_scratch {
	struct bpf_fib_lookup fib;
	struct nm_ct_value fwd;
	struct nm_ct_value rev;
	struct nm_ct_key rkey;
	struct nm_ct_key okey; /* the forward key of a flow whose SNAT port is taken over */
	u32 quote[NM_QUOTE6 / 4];
	u32 old[NM_QUOTE6 / 4];
};
BPF_PERCPU_ARRAY(scratch, struct nm_scratch, 1);

static __always_inline void tc_event(u32 event)
{
	u64 *n = tc_events.lookup(&event);
	if (n)
		*n += 1;
}

static __always_inline int verdict(struct __sk_buff *skb, u8 dir, u8 v, int action)
{
	struct nm_tc_stats_key k = {.ifindex = skb->ifindex, .direction = dir, .verdict = v};
	u64 zero = 0;
	u64 *n = tc_stats.lookup_or_try_init(&k, &zero);
	if (n)
		*n += 1;
	return action;
}

static __always_inline int drop(struct __sk_buff *skb, u8 dir, u32 reason)
{
	u64 *n = tc_drops.lookup(&reason);
	if (n)
		*n += 1;
	return verdict(skb, dir, NM_TC_DROP, TC_ACT_SHOT);
}

enum parse_result { PARSE_OK, PARSE_PASS, PARSE_FRAGMENT, PARSE_UNKNOWN };

static __always_inline int parse_ports(struct __sk_buff *skb, struct nm_pkt *p, u32 off)
{
	u16 ports[2];
	if (bpf_skb_load_bytes(skb, off, ports, 4) < 0)
		return PARSE_PASS;
	p->t.sport = ports[0];
	p->t.dport = ports[1];
	if (p->t.proto == IPPROTO_TCP) {
		u8 flags;
		if (bpf_skb_load_bytes(skb, off + 13, &flags, 1) < 0)
			return PARSE_PASS;
		p->tcp_flags = flags;
	}
	return PARSE_OK;
}

/* An ICMP error quotes the packet that caused it: take that packet's tuple, reversed, so that
 * it reads as the flow's packets towards us and finds their conntrack entry. */
static __always_inline int parse_quote(struct __sk_buff *skb, struct nm_pkt *p, u32 off, int v4)
{
	u32 src[4] = {}, dst[4] = {};
	u8 proto;
	u32 ports_off;
	if (v4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl != 5)
			return PARSE_PASS;
		src[0] = ip.saddr;
		dst[0] = ip.daddr;
		proto = ip.protocol;
		ports_off = off + sizeof(ip);
	} else {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
			return PARSE_PASS;
		__builtin_memcpy(src, &ip6.saddr, 16);
		__builtin_memcpy(dst, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		ports_off = off + sizeof(ip6);
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return PARSE_PASS;
	u16 ports[2];
	if (bpf_skb_load_bytes(skb, ports_off, ports, 4) < 0)
		return PARSE_PASS;
	__builtin_memcpy(p->t.src, dst, 16);
	__builtin_memcpy(p->t.dst, src, 16);
	p->t.sport = ports[1];
	p->t.dport = ports[0];
	p->t.proto = proto;
	p->icmp_error = 1;
	return PARSE_OK;
}

static __always_inline int parse(struct __sk_buff *skb, struct nm_pkt *p, u32 outer_src[4],
				 u32 outer_dst[4])
{
	u32 off;
	u8 proto;
	int v4 = skb->protocol == bpf_htons(ETH_P_IP);
	if (v4) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, NM_ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4 ||
		    ip.ihl < 5)
			return PARSE_PASS;
		if (ip.frag_off & bpf_htons(0x3fff)) /* MF, or an offset: a fragment */
			return PARSE_FRAGMENT;
		p->t.family = NM_FAMILY_V4;
		outer_src[0] = ip.saddr;
		outer_dst[0] = ip.daddr;
		proto = ip.protocol;
		off = NM_ETH_HLEN + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, NM_ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return PARSE_PASS;
		p->t.family = NM_FAMILY_V6;
		__builtin_memcpy(outer_src, &ip6.saddr, 16);
		__builtin_memcpy(outer_dst, &ip6.daddr, 16);
		proto = ip6.nexthdr;
		off = NM_ETH_HLEN + sizeof(ip6);
		if (proto == 44 /* NEXTHDR_FRAGMENT */)
			return PARSE_FRAGMENT;
	} else {
		return PARSE_PASS;
	}
	p->l4_off = off;
	p->t.proto = proto;
	__builtin_memcpy(p->t.src, outer_src, 16);
	__builtin_memcpy(p->t.dst, outer_dst, 16);
	if (proto == IPPROTO_TCP) {
		p->csum_off = off + 16;
		return parse_ports(skb, p, off);
	}
	if (proto == IPPROTO_UDP) {
		p->csum_off = off + 6;
		return parse_ports(skb, p, off);
	}
	if (proto == IPPROTO_ICMP && v4) {
		u8 type;
		if (bpf_skb_load_bytes(skb, off, &type, 1) < 0)
			return PARSE_PASS;
		/* destination unreachable (fragmentation needed too), time exceeded, parameter */
		if (type == 3 || type == 11 || type == 12)
			return parse_quote(skb, p, off + 8, 1);
		return PARSE_PASS;
	}
	if (proto == IPPROTO_ICMPV6 && !v4) {
		u8 type;
		if (bpf_skb_load_bytes(skb, off, &type, 1) < 0)
			return PARSE_PASS;
		/* destination unreachable, packet too big, time exceeded, parameter problem */
		if (type >= 1 && type <= 4)
			return parse_quote(skb, p, off + 8, 0);
		return PARSE_PASS;
	}
	return PARSE_UNKNOWN;
}

/* Send the rewritten packet on towards its new destination: the FIB says through which
 * interface, and the kernel resolves the neighbour. When the FIB has no forwarding answer
 * (a local destination, forwarding off) the stack takes the packet as it is. */
static __always_inline int forward(struct __sk_buff *skb, struct nm_pkt *p, struct nm_ct_value *v)
{
	u32 zero = 0;
	struct nm_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return TC_ACT_OK;
	struct bpf_fib_lookup *f = &sc->fib;
	__builtin_memset(f, 0, sizeof(*f));
#define fib (*f)
	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->t.proto;
	fib.sport = v->nat_sport;
	fib.dport = v->nat_dport;
	/* tot_len 0: no MTU check. A GSO packet's length is its whole burst, far above the MTU,
	 * and the FIB would say "fragmentation needed" for what the device will segment. */
	fib.tot_len = 0;
	if (p->t.family == NM_FAMILY_V4) {
		fib.family = AF_INET;
		fib.ipv4_src = v->nat_src[0];
		fib.ipv4_dst = v->nat_dst[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, v->nat_src, 16);
		__builtin_memcpy(fib.ipv6_dst, v->nat_dst, 16);
	}
	int rc = bpf_fib_lookup(skb, f, sizeof(*f), 0);
#undef fib
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		/* The neighbour is known: write its MAC and ours and send the packet straight to
		 * the device. bpf_redirect_neigh would look the route up again and go through the
		 * neighbour layer for what the FIB just told us. */
		u8 *macs = (u8 *)sc->quote; /* scratch: dmac then smac, as in the Ethernet header */
		__builtin_memcpy(macs, f->dmac, 6);
		__builtin_memcpy(macs + 6, f->smac, 6);
		if (bpf_skb_store_bytes(skb, 0, macs, 12, 0) < 0)
			return TC_ACT_SHOT;
		skb->tc_index |= NM_TC_INDEX_F_REDIRECTED;
		/* Towards a pod's veth (forward() runs at ingress only): into the pod's own
		 * ingress at once, as Cilium does, rather than through the veth's transmit and the
		 * per-CPU backlog, which cost the packet a second pass of the receive path. */
		u32 oif = f->ifindex;
		u32 *iface = tc_ifaces.lookup(&oif);
		if (iface && (*iface & NM_TC_IFACE_F_PEER))
			return bpf_redirect_peer(oif, 0);
		return bpf_redirect(oif, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* The neighbour layer resolves the next hop the FIB found (no second route
		 * lookup) and holds the packet until it answers. */
		struct nm_redir_neigh *nh = (struct nm_redir_neigh *)sc->old;
		__builtin_memset(nh, 0, sizeof(*nh));
		if (p->t.family == NM_FAMILY_V4) {
			nh->nh_family = AF_INET;
			nh->nh[0] = f->ipv4_dst;
		} else {
			nh->nh_family = AF_INET6;
			__builtin_memcpy(nh->nh, f->ipv6_dst, 16);
		}
		skb->tc_index |= NM_TC_INDEX_F_REDIRECTED;
		return nm_redirect_neigh(f->ifindex, nh, sizeof(*nh), 0);
	}
	return TC_ACT_OK;
}

/* The node's address towards `dst` (the FIB's preferred source), for SNAT. 0 if none. */
static __always_inline int snat_address(struct __sk_buff *skb, struct nm_pkt *p, u32 *dst,
					u32 *out, struct bpf_fib_lookup *f)
{
	__builtin_memset(f, 0, sizeof(*f));
#define fib (*f)
	fib.ifindex = skb->ingress_ifindex;
	fib.l4_protocol = p->t.proto;
	fib.tot_len = 0; /* no MTU check, as in forward() */
	if (p->t.family == NM_FAMILY_V4) {
		fib.family = AF_INET;
		fib.ipv4_dst = dst[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_dst, dst, 16);
	}
	int rc = bpf_fib_lookup(skb, f, sizeof(*f), NM_FIB_LOOKUP_SRC);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return -1;
	if (p->t.family == NM_FAMILY_V4) {
		out[0] = fib.ipv4_src;
	} else {
		__builtin_memcpy(out, fib.ipv6_src, 16);
	}
#undef fib
	return 0;
}

/* The service frontend this packet is for: its VIP (ClusterIP, externalIP, loadBalancerIP) or,
 * on an address this interface owns, a NodePort (stored with the all-zero address). */
static __always_inline struct nm_svc_value *frontend(struct __sk_buff *skb, struct nm_pkt *p,
						     struct nm_svc_key *key)
{
	__builtin_memcpy(key->addr, p->t.dst, 16);
	key->port = p->t.dport;
	key->proto = p->t.proto;
	key->family = p->t.family;
	struct nm_svc_value *master = services.lookup(key);
	if (master)
		return master;
	struct nm_node_addr_key nk = {};
	__builtin_memcpy(nk.addr, p->t.dst, 16);
	nk.ifindex = skb->ifindex;
	nk.family = p->t.family;
	if (!node_addrs.lookup(&nk))
		return NULL;
	__builtin_memset(key->addr, 0, 16);
	return services.lookup(key);
}

static __always_inline u64 client_identity(struct nm_pkt *p)
{
	/* Session affinity by client address (Kubernetes' ClientIP), folded into the key. */
	return ((u64)p->t.family << 56) ^ ((u64)(p->t.src[0] ^ p->t.src[2]) << 32) ^
	       (p->t.src[1] ^ p->t.src[3]);
}

/* What Maglev hashes for a packet: its flow, i.e. the client's address and port (the
 * frontend, which nm_maglev_hash adds, is the rest of the 5-tuple; for a NodePort it is the
 * all-zero address, the same on every node). Every node computes the same value for a flow,
 * so a flow that ECMP moves to another node lands on the same backend there. */
static __always_inline u64 flow_identity(struct nm_pkt *p)
{
	u64 h = nm_mix64(((u64)p->t.src[0] << 32 | p->t.src[1]) ^ p->t.sport);
	return nm_mix64(h ^ ((u64)p->t.src[2] << 32 | p->t.src[3]) ^ ((u64)p->t.family << 48));
}

/* The SNAT port range of tc_config: [*lo, *lo + *range). */
static __always_inline void snat_range(u32 *lo, u32 *range)
{
	u32 zero = 0;
	struct nm_tc_config *cfg = tc_config.lookup(&zero);
	u32 l = cfg && cfg->snat_port_min ? cfg->snat_port_min : 32768;
	u32 h = cfg && cfg->snat_port_max >= l ? cfg->snat_port_max : 60999;
	*lo = l;
	*range = h - l + 1;
}

/* Where a flow's search for a SNAT port starts: a hash of its forward tuple, not a random
 * draw, so that the ports a flow tries are a function of its tuple and a flow whose forward
 * entry the LRU evicted can find its reply entry again (rebuild_forward()). */
static __always_inline u32 snat_start(struct nm_pkt *p)
{
	u64 h = nm_mix64(flow_identity(p) ^ ((u64)p->t.dst[0] << 32 | (u32)p->t.dport << 8 |
					     p->t.proto));
	h = nm_mix64(h ^ ((u64)p->t.dst[1] << 32 | p->t.dst[2]) ^ ((u64)p->t.dst[3] << 16));
	return (u32)(h ^ (h >> 32));
}

/* The i-th SNAT port a flow tries (network order): first the client's own port when the
 * range holds it (as the kernel's NAT and Cilium keep it; see new_flow), then ports from
 * snat_start(). */
static __always_inline u16 snat_try_port(struct nm_pkt *p, u32 i, u32 start, u32 lo, u32 range)
{
	u32 csport = bpf_ntohs(p->t.sport);
	int keep = csport >= lo && csport < lo + range;
	u32 off = i == 0 && keep ? csport - lo : (start + i) % range;
	return bpf_htons((u16)(lo + off));
}

/* A TCP packet other than a SYN, of a flow whose forward entry is gone while its reply entry
 * lives (the LRU evicts entries one by one). Find the reply entry: it is keyed by a backend of
 * the frontend (up to NM_CT_REBUILD_BACKENDS of its slots) and, with SNAT, by one of the first
 * NM_CT_REBUILD_PORTS ports the flow tried (snat_try_port), and it must name this packet's
 * tuple. Then put back the forward entry, its mirror: 1. 0 when there is none: a flow whose
 * backend has left the service, or whose port came later in its search, is not found. */
static __always_inline int rebuild_forward(struct __sk_buff *skb, struct nm_pkt *p)
{
	struct nm_svc_key key = {};
	struct nm_svc_value *master = frontend(skb, p, &key);
	if (!master)
		return 0;
	u32 zero = 0;
	struct nm_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return 0;
	int snat = !(master->flags & NM_SVC_F_EXT_LOCAL);
	u32 n = master->count;
	u16 bank = (u16)master->bank << NM_SLOT_BANK_SHIFT;
	u32 lo, range;
	snat_range(&lo, &range);
	u32 start = snat_start(p);
	struct nm_ct_key *rk = &sc->rkey;
	int found = 0;
#pragma nounroll
	for (u32 b = 0; b < NM_CT_REBUILD_BACKENDS && b < n && !found; b++) {
		key.slot = bank | (u16)((b + 1) & NM_SLOT_INDEX_MASK);
		struct nm_svc_value *slot = services.lookup(&key);
		if (!slot)
			continue;
		u32 backend_id = slot->backend_id;
		struct nm_backend *be = backends.lookup(&backend_id);
		if (!be)
			continue;
		__builtin_memset(rk, 0, sizeof(*rk));
		rk->proto = p->t.proto;
		rk->family = p->t.family;
		__builtin_memcpy(rk->src, be->addr, 16);
		rk->sport = be->port;
		if (snat) {
			if (snat_address(skb, p, be->addr, rk->dst, &sc->fib) < 0)
				__builtin_memcpy(rk->dst, p->t.dst, 16);
		} else {
			__builtin_memcpy(rk->dst, p->t.src, 16);
			rk->dport = p->t.sport;
		}
#pragma nounroll
		for (u32 i = 0; i < NM_CT_REBUILD_PORTS; i++) {
			if (snat)
				rk->dport = snat_try_port(p, i, start, lo, range);
			struct nm_ct_value *rv = ct.lookup(rk);
			if (rv && rv->kind == NM_CT_REPLY && ct_points_back(rv, &p->t)) {
				ct_mirror(rk, rv, bpf_ktime_get_ns(), &sc->fwd);
				found = 1;
				break;
			}
			if (!snat)
				break;
		}
	}
	if (!found)
		return 0;
	/* An expired reply entry is no flow (checked here, out of the loops: the verifier's
	 * budget). rk still holds its key. */
	struct nm_ct_value *rv = ct.lookup(rk);
	if (!rv || ct_expired(rk, rv, sc->fwd.last_seen_ns))
		return 0;
	ct.insert(&p->t, &sc->fwd);
	tc_event(NM_TC_EV_CT_REBUILT);
	return 1;
}

/* A new flow to a frontend: choose, remember, translate, send on. */
static __always_inline int new_flow(struct __sk_buff *skb, struct nm_pkt *p)
{
	struct nm_svc_key key = {};
	struct nm_svc_value *master = frontend(skb, p, &key);
	if (!master)
		return verdict(skb, NM_TC_INGRESS, NM_TC_PASS, TC_ACT_OK);
	int snat = !(master->flags & NM_SVC_F_EXT_LOCAL);
	int is_service = 0;
	u32 svc_id = 0;
	struct nm_backend *be = select_backend(client_identity(p), flow_identity(p), &key, NULL,
					       &is_service, &svc_id);
	if (!is_service)
		return verdict(skb, NM_TC_INGRESS, NM_TC_PASS, TC_ACT_OK);
	account(svc_id, be != NULL);
	if (!be)
		return drop(skb, NM_TC_INGRESS, NM_DROP_NO_BACKEND);

	u32 zero = 0;
	struct nm_scratch *sc = scratch.lookup(&zero);
	if (!sc)
		return drop(skb, NM_TC_INGRESS, NM_DROP_REWRITE_FAILED);
	struct nm_ct_value *fwdp = &sc->fwd, *revp = &sc->rev;
	struct nm_ct_key *rkeyp = &sc->rkey;
	__builtin_memset(fwdp, 0, sizeof(*fwdp));
	__builtin_memset(revp, 0, sizeof(*revp));
	__builtin_memset(rkeyp, 0, sizeof(*rkeyp));
#define fwd (*fwdp)
#define rev (*revp)
#define rkey (*rkeyp)
	u64 now = bpf_ktime_get_ns();
	u8 state = p->t.proto == IPPROTO_TCP ? NM_CT_SYN_SENT : NM_CT_DATAGRAM;
	fwd.kind = NM_CT_FORWARD;
	fwd.state = state;
	fwd.svc_id = svc_id;
	fwd.last_seen_ns = now;
	fwd.flags = snat ? NM_CT_F_SNAT : 0;
	__builtin_memcpy(fwd.nat_dst, be->addr, 16);
	fwd.nat_dport = be->port;
	__builtin_memcpy(fwd.nat_src, p->t.src, 16);
	fwd.nat_sport = p->t.sport;

	rkey.proto = p->t.proto;
	rkey.family = p->t.family;
	__builtin_memcpy(rkey.src, be->addr, 16);
	rkey.sport = be->port;
	rev.kind = NM_CT_REPLY;
	rev.state = state;
	rev.svc_id = svc_id;
	rev.last_seen_ns = now;
	rev.flags = fwd.flags;
	__builtin_memcpy(rev.nat_src, p->t.dst, 16);
	rev.nat_sport = p->t.dport;
	__builtin_memcpy(rev.nat_dst, p->t.src, 16);
	rev.nat_dport = p->t.sport;

	if (!snat) {
		/* Local: the client's address is kept; replies come back from the backend to it. */
		__builtin_memcpy(rkey.dst, p->t.src, 16);
		rkey.dport = p->t.sport;
		if (ct.update(&rkey, &rev))
			return drop(skb, NM_TC_INGRESS, NM_DROP_CT_FULL);
	} else {
		u32 saddr[4] = {};
		if (snat_address(skb, p, be->addr, saddr, &sc->fib) < 0)
			__builtin_memcpy(saddr, p->t.dst, 16); /* no route: the address it came to */
		__builtin_memcpy(rkey.dst, saddr, 16);
		__builtin_memcpy(fwd.nat_src, saddr, 16);
		u32 lo, range;
		snat_range(&lo, &range);
		u32 start = snat_start(p);
		int stored = 0;
		int syn = p->t.proto == IPPROTO_TCP &&
			  (p->tcp_flags & (NM_TCP_SYN | NM_TCP_ACK | NM_TCP_RST)) == NM_TCP_SYN;
		struct nm_ct_key *okeyp = &sc->okey;
		/* Try the client's own port, then ports from a start hashed from the flow's
		 * tuple (snat_start); a taken one is a
		 * collision, unless its flow has expired or, for a SYN, is over: FIN both ways or
		 * RST, and silent 100 ms.
		 *
		 * Why a closed flow's port can go to a new SYN at once, without waiting out the
		 * closing timeout: the backend may still hold (node:port, backend) in TIME_WAIT
		 * (60 s when it closed first). Linux's TIME_WAIT takes a SYN whose timestamp is
		 * newer than the old flow's last one, or without timestamps one whose sequence
		 * number is higher (tcp_timewait_state_process, RFC 6191). Otherwise it answers
		 * with an ACK; the client resets the TIME_WAIT with an RST and sends its SYN again
		 * (Linux: after TCP_TIMEOUT_MIN, about 10 ms; others: their SYN timeout), which
		 * then goes through. Nothing is delivered to the wrong flow either way, and the
		 * kernel's own conntrack reopens such a tuple for a SYN without any wait. Where a
		 * client's timestamp offset is per address pair, its later flows carry later
		 * timestamps and are taken at once; on the lab's kernel (6.18) a capture shows
		 * unrelated timestamps per connection (per 4-tuple), so about half of the tuples
		 * reused by another client tuple were refused once: hence the client's own port
		 * first (below), and bench/tc.py counts the client's SYN retransmits. The 100 ms
		 * let the old flow's last ACK go by first, and are 100 ticks of a 1 ms timestamp
		 * clock. At
		 * 100 ms a port serves up to 10 new flows a second per (backend, node address):
		 * 282,320 a second with the default range. Other packets (a late FIN, a stray
		 * ACK) take only free or expired ports. */
		/* The first try is the client's own port when the range holds it (as the
		 * kernel's NAT and Cilium keep it): the same client tuple then gets the same
		 * backend tuple again, and a client's timestamps on one tuple always grow, so
		 * the backend's TIME_WAIT from that tuple's last flow takes the new SYN. */
		for (u32 i = 0; i < NM_SNAT_TRIES; i++) {
			u16 port = snat_try_port(p, i, start, lo, range);
			rkey.dport = port;
			if (ct.insert(&rkey, &rev) == 0) {
				stored = 1;
				fwd.nat_sport = port;
				break;
			}
			struct nm_ct_value *old = ct.lookup(&rkey);
			if (old && ct_snat_reusable(&rkey, old, now, syn)) {
				/* Read the old flow's forward key before the update replaces `old`. */
				ct_partner_key(&rkey, old, okeyp);
				if (ct.update(&rkey, &rev) == 0) {
					/* The old flow's forward entry still names this port: delete it,
					 * so that a late packet of the old flow is a miss rather than
					 * translated into the new one (ct_lookup checks it too). Unless
					 * it now belongs to another flow (its client reused the tuple). */
					struct nm_ct_value *of = ct.lookup(okeyp);
					if (of && ct_points_back(of, &rkey))
						ct.delete(okeyp);
					stored = 1;
					fwd.nat_sport = port;
					break;
				}
			}
			tc_event(NM_TC_EV_SNAT_COLLISION);
		}
		if (!stored)
			return drop(skb, NM_TC_INGRESS, NM_DROP_SNAT_EXHAUSTED);
	}
	if (ct.update(&p->t, &fwd)) {
		ct.delete(&rkey);
		return drop(skb, NM_TC_INGRESS, NM_DROP_CT_FULL);
	}
	if (nat_rewrite(skb, p, &fwd) < 0)
		return drop(skb, NM_TC_INGRESS, NM_DROP_REWRITE_FAILED);
	verdict(skb, NM_TC_INGRESS, NM_TC_DNAT, 0);
	return forward(skb, p, fwdp);
#undef fwd
#undef rev
#undef rkey
}

static __always_inline int handle(struct __sk_buff *skb, u8 dir)
{
	if (dir == NM_TC_EGRESS && (skb->tc_index & NM_TC_INDEX_F_REDIRECTED)) {
		/* Our ingress translated it and sent it here: nothing to look up, and it was
		 * counted there (bpf_stats: about 240 ns a packet saved, see bench/results). */
		skb->tc_index &= ~NM_TC_INDEX_F_REDIRECTED;
		return TC_ACT_OK;
	}
	struct nm_pkt p = {};
	u32 outer_src[4] = {}, outer_dst[4] = {};
	switch (parse(skb, &p, outer_src, outer_dst)) {
	case PARSE_OK:
		break;
	case PARSE_FRAGMENT:
		return verdict(skb, dir, NM_TC_FRAGMENT, TC_ACT_OK);
	case PARSE_UNKNOWN:
		return verdict(skb, dir, NM_TC_UNKNOWN_PROTO, TC_ACT_OK);
	default:
		return verdict(skb, dir, NM_TC_PASS, TC_ACT_OK);
	}
	struct nm_ct_value *v = ct_lookup(&p.t, p.icmp_error ? 0 : p.tcp_flags);
	if (!v && dir == NM_TC_INGRESS && !p.icmp_error && p.t.proto == IPPROTO_TCP &&
	    (p.tcp_flags & (NM_TCP_SYN | NM_TCP_ACK | NM_TCP_RST | NM_TCP_FIN)) != NM_TCP_SYN) {
		/* Only a SYN starts a TCP flow. Anything else without an entry is either a flow
		 * whose forward entry the LRU evicted (found again from its reply entry) or no
		 * flow of ours: it takes no SNAT port and no backend and goes to the stack as it
		 * came (the stack answers an ACK for a NodePort with an RST, as it would without
		 * nodemesh). The kernel's conntrack never makes state of an RST either. */
		if (!rebuild_forward(skb, &p))
			return verdict(skb, dir, NM_TC_PASS, TC_ACT_OK);
		v = ct_lookup(&p.t, p.tcp_flags);
	}
	if (v) {
		struct nm_ct_value copy = *v;
		u8 what;
		if (p.icmp_error) {
			u32 zero = 0;
			struct nm_scratch *sc = scratch.lookup(&zero);
			if (!sc || nat_icmp_error(skb, &p, &copy, outer_src, outer_dst, sc->quote,
						  sc->old) < 0)
				return drop(skb, dir, NM_DROP_REWRITE_FAILED);
			what = NM_TC_ICMP_ERROR;
		} else {
			if (nat_rewrite(skb, &p, &copy) < 0)
				return drop(skb, dir, NM_DROP_REWRITE_FAILED);
			what = copy.kind == NM_CT_REPLY ? NM_TC_REVERSE : NM_TC_DNAT;
		}
		verdict(skb, dir, what, 0);
		if (dir == NM_TC_EGRESS)
			return TC_ACT_OK; /* already on its way out */
		return forward(skb, &p, &copy);
	}
	if (dir == NM_TC_EGRESS || p.icmp_error)
		return verdict(skb, dir, NM_TC_PASS, TC_ACT_OK);
	return new_flow(skb, &p);
}

int nm_tc_ingress(struct __sk_buff *skb)
{
	return handle(skb, NM_TC_INGRESS);
}

int nm_tc_egress(struct __sk_buff *skb)
{
	return handle(skb, NM_TC_EGRESS);
}
