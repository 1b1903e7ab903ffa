/* nodemesh.h — every struct and map shared between the datapath and the agent.
 *
 * The agent mirrors these structs in agent/nodemesh/datapath/maps.py; tests/datapath/test_layout.py
 * proves the mirror matches what BCC generated from this file. Change both together, and bump
 * NM_ABI_VERSION when a pinned map's layout changes (the loader then refuses stale pins).
 *
 * Byte order: addresses and ports are stored in network byte order, exactly as the socket
 * hooks see them in struct bpf_sock_addr, so the hot path never swaps bytes.
 */
#ifndef NODEMESH_H
#define NODEMESH_H

#define NM_ABI_VERSION 3

/* Map sizes: compile-time settings, passed by the loader as -D flags. The defaults hold
 * 100,000 single-port services with 3 backends each (400,000 masters and slots, plus the idle
 * bank of frontends being changed); the hash maps are not preallocated, so a small node pays
 * only for what it uses. */
#ifndef NM_MAX_SERVICE_ENTRIES
#define NM_MAX_SERVICE_ENTRIES 524288  /* masters + slots of all frontends */
#endif
#ifndef NM_MAX_FRONTENDS
#define NM_MAX_FRONTENDS 131072        /* svc_id space: (VIP, port, protocol) triples */
#endif
#ifndef NM_MAX_BACKENDS
#define NM_MAX_BACKENDS 524288         /* backend_id space */
#endif
#ifndef NM_MAX_REVNAT
#define NM_MAX_REVNAT 65536            /* per-socket reverse translations (LRU, preallocated) */
#endif
#ifndef NM_MAX_AFFINITY
#define NM_MAX_AFFINITY 65536          /* session-affinity entries (LRU, preallocated) */
#endif
#ifndef NM_MAX_ENDPOINTS
#define NM_MAX_ENDPOINTS 262144        /* backend endpoints watched for failures */
#endif
#ifndef NM_MAX_LATENCY
#define NM_MAX_LATENCY 16384           /* (frontend, backend) pairs with kernel latency stats
					* (lib/latency.h; LRU, preallocated) */
#endif
#ifndef NM_PIN_DIR
#error "NM_PIN_DIR must name the bpffs folder for pinned maps"
#endif

/* A pinned BPF_SK_STORAGE map `name` of `value_type` values: BCC's own BPF_SK_STORAGE has no pin
 * path. The table struct is BCC's, so `name.sk_storage_get(sk, 0, flags)` works as with its
 * macro; storage is created on use and freed with the socket. */
#define NM_PINNED_SK_STORAGE(name, value_type)                                                \
	struct name##_table_t {                                                            \
		int key;                                                                   \
		value_type leaf;                                                           \
		void *(*sk_storage_get)(void *, void *, int);                              \
		int (*sk_storage_delete)(void *);                                          \
		u32 flags;                                                                 \
	};                                                                                 \
	__attribute__((section("maps/sk_storage:" NM_PIN_DIR "/" #name)))                 \
	struct name##_table_t name = {.flags = BPF_F_NO_PREALLOC};                         \
	BPF_ANNOTATE_KV_PAIR(name, int, value_type)

#define NM_FAMILY_V4 4
#define NM_FAMILY_V6 6

/* Selection slots. A frontend's master entry (slot 0) holds the slot count and the active
 * bank; its slots live at (bank << 15) | index, index 1..count. An update writes the other
 * bank, flips the master in one map write, then deletes the old bank: a new connection sees
 * the whole old set or the whole new set, never a mix and never an empty half-written set. */
#define NM_SLOT_BANK_SHIFT 15
#define NM_SLOT_INDEX_MASK 0x7fff

enum nm_algorithm {
	NM_ALG_RANDOM = 0,      /* uniform over slots; weights are expanded into slots */
	NM_ALG_ROUND_ROBIN = 1, /* slots hold a smooth weighted sequence, walked by a counter */
	NM_ALG_MAGLEV = 2,      /* the frontend's Maglev table (lib/maglev.h); slots as fallback */
	NM_ALG_LEAST_CONNECTIONS = 3, /* two weighted draws, the less loaded wins (lib/conn_count.h) */
};

struct nm_svc_key {
	__u32 addr[4]; /* VIP; IPv4 in addr[0], the rest zero */
	__u16 port;    /* VIP port, network order */
	__u8 proto;    /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;   /* NM_FAMILY_V4 / NM_FAMILY_V6 */
	__u16 slot;    /* 0: master; else bank << 15 | index */
	__u16 pad;
};

struct nm_svc_value {
	__u32 backend_id; /* slot entries: the chosen backend; maglev master: table rows */
	__u32 svc_id;     /* master: index of this frontend in svc_stats / rr_state */
	__u16 count;      /* master: number of slots in the active bank (0: no backend) */
	__u8 bank;        /* master: active bank, 0 or 1 */
	__u8 algorithm;   /* master: enum nm_algorithm */
	__u16 flags;      /* master: NM_SVC_F_* */
	__u16 proxy_port; /* master: redirect TCP to this local proxy port (network order); 0: the
			   * node default (bpf/lib/proxy.h) unless NM_SVC_F_PROXY_OFF */
	__u32 revision;   /* master: bumped by the agent on every change, for debugging */
	__u32 affinity_timeout; /* master: seconds a client keeps its backend (NM_SVC_F_AFFINITY) */
	__u32 max_conns_per_backend; /* master: connectionLimits (0: none), lib/conn_count.h */
	__u32 max_conns;             /* master: active + pending connections of the frontend */
};

#define NM_SVC_F_AFFINITY 0x1 /* session affinity: a client keeps its backend */
#define NM_SVC_F_EXT_LOCAL 0x2 /* TC path: externalTrafficPolicy Local (no SNAT, local backends) */
#define NM_SVC_F_PROXY_OFF 0x4 /* never redirect to the node-local proxy (per-service opt-out) */

/* Session affinity. The client is its network namespace: at connect() a socket often has no
 * source address yet, and a pod is one netns with one IP (Cilium's socket LB does the same). */
struct nm_affinity_key {
	__u64 client; /* bpf_get_netns_cookie() */
	__u32 svc_id;
	__u32 pad;
};

struct nm_affinity_value {
	__u32 backend_id;
	__u32 pad;
	__u64 last_used_ns; /* bpf_ktime_get_ns() */
};

/* Passive health: outcomes of TCP connects to each backend endpoint, seen by sockops. The
 * agent creates an entry for every endpoint it programs; the datapath only updates them. */
struct nm_endpoint_key {
	__u32 addr[4];
	__u16 port;   /* network order */
	__u8 family;
	__u8 pad;
};

struct nm_endpoint_health {
	/* u64: BCC's default target has no 32-bit fetch-and-add */
	__u64 consecutive_failures; /* reset by an established connection (or the agent) */
	__u64 failures;             /* connects that closed before establishing */
	__u64 successes;            /* connects that established */
	__u64 last_failure_ns;
};

/* Sent on the ring buffer for every failed connect to a watched endpoint. */
struct nm_failure_event {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 old_state; /* TCP state before the close: SYN_SENT (2) for refused/reset/timeout */
	__u32 consecutive_failures;
	__u32 pad;
	__u64 ts_ns;
};

struct nm_backend {
	__u32 addr[4]; /* IPv4 in addr[0] */
	__u16 port;    /* target port, network order */
	__u8 proto;
	__u8 family;
	__u32 svc_id;  /* the frontend this backend id belongs to */
	__u8 state;    /* enum nm_backend_state; only ACTIVE backends sit in slots today */
	__u8 pad[3];
};

enum nm_backend_state {
	NM_BACKEND_ACTIVE = 0,
	NM_BACKEND_TERMINATING = 1,
	NM_BACKEND_QUARANTINED = 2,
};

/* Reverse translation, keyed by socket: lets recvmsg and getpeername report the VIP. */
struct nm_revnat_key {
	__u64 cookie;  /* bpf_get_socket_cookie() of the client socket */
	__u32 addr[4]; /* backend address */
	__u16 port;    /* backend port, network order */
	__u8 family;
	__u8 pad[5];
};

struct nm_revnat_value {
	__u32 addr[4]; /* VIP */
	__u16 port;    /* VIP port, network order */
	__u16 pad;
	__u32 svc_id;
};

/* The same for a connected socket (TCP, or UDP after connect()), in the socket's own storage
 * (sock_revnat): written at connect(), freed with the socket, no cookie and no shared hash.
 * For TCP it is also what sockops counts the connection by (lib/conn_count.h): one storage a
 * socket, not two. state and flags sit in what was padding, so older pins keep their layout
 * (and ABI): an older agent's connect hook left both zero and kept its count state in
 * sock_conn, which sockops still reads for such sockets. */
struct nm_sock_revnat {
	__u32 backend[4]; /* backend address */
	__u32 vip[4];     /* VIP */
	__u16 backend_port; /* network order */
	__u16 vip_port;     /* network order */
	__u32 svc_id;
	__u8 family;      /* of the backend address (NM_FAMILY_V4 for a v4-mapped peer) */
	__u8 state;       /* enum nm_sock_conn_state (lib/conn_count.h), if NM_SOCK_F_COUNTS */
	__u8 flags;       /* NM_SOCK_F_* (lib/conn_count.h); BPF-only, the agent reads neither */
	__u8 pad;
};

/* Per-CPU counters, summed by the agent at scrape time. */
struct nm_svc_stats {
	__u64 connections; /* backend selected (connect, or unconnected UDP sendmsg) */
	__u64 no_backend;  /* refused with ECONNREFUSED: the frontend has no backend */
	__u64 proxy_redirects; /* connects sent to the node-local proxy instead (lib/proxy.h) */
};

struct nm_backend_stats {
	__u64 connections; /* times this backend was selected */
	__u64 reserved;    /* room for a failure count without a layout change */
};

/* Written once by the loader; lets a later agent recognise pins it can adopt. */
struct nm_info {
	__u32 abi_version;
	__u32 pad;
	__u64 created_unix;
};

/* Datapath events without a service label, named by reason (like Cilium's drop reasons). */
enum nm_counter {
	NM_CTR_SLOT_MISS = 0,       /* a racing update removed the slot we chose; retried */
	NM_CTR_BACKEND_MISS = 1,    /* a slot named a backend that is gone; retried */
	NM_CTR_REVNAT_FAILED = 2,   /* reverse-translation entry could not be stored */
	NM_CTR_REVNAT_HIT = 3,      /* recvmsg/getpeername translated back to the VIP */
	NM_CTR_UDP_SENDMSG = 4,     /* unconnected UDP datagram translated */
	NM_CTR_V4_IN_V6 = 5,        /* IPv4-mapped IPv6 destination translated */
	NM_CTR_AFFINITY_HIT = 6,    /* a client kept its backend (session affinity) */
	NM_CTR_CONNECT_FAILED = 7,  /* a TCP connect to a watched backend failed */
	NM_CTR_MAGLEV_MISS = 8,     /* no Maglev table or row for a maglev frontend; used slots */
	NM_CTR_MAX = 9,
};

#endif /* NODEMESH_H */
