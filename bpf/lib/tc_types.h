/* lib/tc_types.h — structs, maps sizes and enums of the TC packet path (tc_nodeport.c) that the
 * agent shares: conntrack, the per-interface settings and the packet/drop counters.
 *
 * Mirrored in agent/nodemesh/datapath/tc.py; tests/datapath/test_tc_layout.py proves it,
 * constants included. Byte
 * order as in nodemesh.h: addresses and ports in network order.
 */
#ifndef NM_LIB_TC_TYPES_H
#define NM_LIB_TC_TYPES_H

#ifndef NM_MAX_CT
#define NM_MAX_CT 131072 /* conntrack entries, two per flow (LRU: preallocated) */
#endif
#ifndef NM_MAX_NODE_ADDRS
#define NM_MAX_NODE_ADDRS 4096 /* (interface, address) pairs that take NodePorts */
#endif
#define NM_SNAT_TRIES 32 /* source ports tried before a new flow is dropped (snat_exhausted) */
/* A TCP packet whose forward entry the LRU evicted finds its reply entry among this many of the
 * service's backends and, with SNAT, this many of the first ports its flow tried. */
#define NM_CT_REBUILD_BACKENDS 32
#define NM_CT_REBUILD_PORTS 4
/* A new SYN may take over the SNAT port of a flow that is over (FIN both ways, or RST) once the
 * flow has been silent this long; see the allocation loop in tc_nodeport.c for why. */
#define NM_SNAT_REUSE_AFTER_NS 100000000ULL /* 100 ms */

/* One conntrack entry per direction of a flow, keyed by the tuple as it arrives. The value is
 * what the packet becomes: translating is the same two rewrites either way. The other
 * direction's key is {src = nat_dst, dst = nat_src, sport = nat_dport, dport = nat_sport}. */
struct nm_ct_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

struct nm_ct_value {
	__u32 nat_src[4];
	__u32 nat_dst[4];
	__u16 nat_sport;
	__u16 nat_dport;
	__u8 kind;  /* enum nm_ct_kind */
	__u8 state; /* enum nm_ct_state */
	__u8 flags; /* NM_CT_F_* */
	__u8 pad;
	__u32 svc_id;
	__u64 last_seen_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
};

#define NM_CT_F_SNAT 0x1       /* the client address was replaced (externalTrafficPolicy Cluster) */
#define NM_CT_F_FIN_CLIENT 0x2 /* TCP: the client sent FIN (or either side RST) */
#define NM_CT_F_FIN_BACKEND 0x4 /* TCP: the backend sent FIN (or either side RST) */
#define NM_CT_F_OVER (NM_CT_F_FIN_CLIENT | NM_CT_F_FIN_BACKEND) /* both: the flow is over */

enum nm_ct_kind {
	NM_CT_FORWARD = 0, /* client -> service: becomes (snat address) -> backend */
	NM_CT_REPLY = 1,   /* backend -> (snat address or client): becomes service -> client */
};

enum nm_ct_state {
	NM_CT_SYN_SENT = 0,    /* TCP: no reply seen yet */
	NM_CT_ESTABLISHED = 1, /* TCP: the backend answered */
	NM_CT_CLOSING = 2,     /* TCP: FIN or RST seen */
	NM_CT_DATAGRAM = 3,    /* UDP */
};

/* Settings the agent writes (index 0). Zero fields take the defaults in conntrack.h. */
struct nm_tc_config {
	__u32 tcp_syn_s;         /* TCP before the backend answers */
	__u32 tcp_established_s; /* TCP after */
	__u32 tcp_closing_s;     /* TCP after FIN or RST */
	__u32 udp_s;             /* UDP since the last datagram */
	__u16 snat_port_min;     /* host order, inclusive */
	__u16 snat_port_max;
	__u32 pad;
};

/* An address the node owns on an attached interface: NodePorts answer on it. */
struct nm_node_addr_key {
	__u32 addr[4];
	__u32 ifindex;
	__u8 family;
	__u8 pad[3];
};

struct nm_tc_stats_key {
	__u32 ifindex;
	__u8 direction; /* NM_TC_INGRESS / NM_TC_EGRESS */
	__u8 verdict;   /* enum nm_tc_verdict */
	__u16 pad;
};

#define NM_TC_IFACE_F_CLSACT 0x1 /* tc_ifaces: nodemesh created this interface's clsact */
/* tc_ifaces: a veth whose peer is in another netns and no bridge's port there (a pod's end),
 * so bpf_redirect_peer can hand a packet straight to the peer's ingress: no veth transmit and
 * no backlog queue on the way */
#define NM_TC_IFACE_F_PEER 0x2

/* A bit of skb->tc_index: the ingress program translated this packet and redirected it to the
 * egress of an interface, whose egress program then lets it go without a second lookup (a
 * translated tuple never has an entry of its own). tc_index lives in the skb and survives the
 * redirect (Cilium's TC_INDEX_F_SKIP_NODEPORT is the same idea); the egress clears it. */
#define NM_TC_INDEX_F_REDIRECTED 0x0100

#define NM_TC_INGRESS 0
#define NM_TC_EGRESS 1

enum nm_tc_verdict {
	NM_TC_PASS = 0,          /* not a service's traffic: left to the stack */
	NM_TC_DNAT = 1,          /* a client's packet sent to its backend */
	NM_TC_REVERSE = 2,       /* a reply translated back to the service address */
	NM_TC_ICMP_ERROR = 3,    /* an ICMP error about a translated flow, translated back */
	NM_TC_FRAGMENT = 4,      /* an IP fragment: passed untouched */
	NM_TC_UNKNOWN_PROTO = 5, /* neither TCP, UDP nor ICMP (or IPv6 extension headers) */
	NM_TC_DROP = 6,          /* dropped; the reason is counted in tc_drops */
	NM_TC_VERDICT_MAX = 7,
};

enum nm_drop_reason {
	NM_DROP_NO_BACKEND = 0,     /* the service has no backend (Local: none on this node) */
	NM_DROP_SNAT_EXHAUSTED = 1, /* NM_SNAT_TRIES source ports in a row were taken */
	NM_DROP_CT_FULL = 2,        /* a conntrack entry could not be stored */
	NM_DROP_REWRITE_FAILED = 3, /* the packet could not be rewritten */
	NM_DROP_MAX = 4,
};

enum nm_tc_event {
	NM_TC_EV_SNAT_COLLISION = 0, /* a source port tried for SNAT was taken; the next is tried */
	NM_TC_EV_CT_REBUILT = 1,     /* a flow's evicted forward entry rebuilt from its reply entry */
	NM_TC_EV_MAX = 2,
};

#endif /* NM_LIB_TC_TYPES_H */
