/* lib/latency.h — what only the kernel knows about each backend: TCP connect duration (SYN to
 * established), smoothed RTT, bytes each way and retransmits, per (frontend, backend endpoint).
 *
 * Hook: sockops on the same cgroup, for the connections the connect hook translated and
 * lib/conn_count.h counts (their socket storage, created at connect, names the frontend and the
 * backend):
 *   ACTIVE_ESTABLISHED_CB connect duration (the handshake's RTT sample) -> log2 histogram
 *   STATE_CB to CLOSE     srtt, bytes_acked, bytes_received and total_retrans, read once at the
 *                         end of the connection -> RTT histogram and counters
 * Why these and not RTT_CB: RTT_CB runs on every ACK; the state callback runs a handful of
 * times per connection, and the socket's final srtt is the smoothed value over its life.
 * Cost: nothing of its own per socket. Connection counting already enables the state
 * callbacks and looks the socket's storage up; latency adds one switch read and one stats
 * lookup at ESTABLISHED and at CLOSE, and no revnat lookup (bench/observability.py).
 *
 * Histograms are log2 buckets of microseconds: bucket i counts values below 2^i µs (bucket 0:
 * below 1 µs); the last bucket takes everything larger. The agent turns them into Prometheus
 * histograms at scrape time. The stats map is an LRU: memory is bounded, and a backend idle
 * long enough to be evicted restarts from zero (a counter reset, which Prometheus handles).
 */
#ifndef NM_LIB_LATENCY_H
#define NM_LIB_LATENCY_H

#include "lib/observe.h"

#define NM_LAT_BUCKETS 24 /* up to 2^22 µs (4.2 s) in buckets, and one for larger */

struct nm_latency_key {
	__u32 addr[4]; /* backend */
	__u16 port;    /* network order */
	__u8 family;
	__u8 pad;
	__u32 svc_id;
};

struct nm_latency_stats {
	__u64 connect_us[NM_LAT_BUCKETS];
	__u64 rtt_us[NM_LAT_BUCKETS];
	__u64 connect_sum_us;
	__u64 rtt_sum_us;
	__u64 bytes_sent;     /* bytes_acked: what the backend received */
	__u64 bytes_received;
	__u64 retransmits;    /* total_retrans of closed connections */
	__u64 closed;         /* connections whose end was counted */
};

BPF_TABLE_PINNED("lru_hash", struct nm_latency_key, struct nm_latency_stats, backend_latency,
		 NM_MAX_LATENCY, NM_PIN_DIR "/backend_latency");
/* Zeroes to create a stats entry from: the struct is too large for the 512-byte stack. */
BPF_ARRAY(latency_zero, struct nm_latency_stats, 1);

static __always_inline u32 nm_log2_bucket(u64 v)
{
	/* floor(log2(v)) + 1 without a loop; 0 for v == 0 */
	u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	r = v ? r + 1 : 0;
	return r < NM_LAT_BUCKETS ? r : NM_LAT_BUCKETS - 1;
}

/* The stats entry of a counted socket's (frontend, backend endpoint), created on first use.
 * The socket's own storage (lib/conn_count.h) names both: no revnat lookup. */
static __always_inline struct nm_latency_stats *nm_latency_stats_of(struct nm_conn_ref *ref)
{
	struct nm_latency_key k = {};
	k.addr[0] = ref->backend.addr[0];
	k.addr[1] = ref->backend.addr[1];
	k.addr[2] = ref->backend.addr[2];
	k.addr[3] = ref->backend.addr[3];
	k.port = ref->backend.port;
	k.family = ref->backend.family;
	k.svc_id = ref->svc_id;
	struct nm_latency_stats *st = backend_latency.lookup(&k);
	if (st)
		return st;
	u32 idx = 0;
	struct nm_latency_stats *zero = latency_zero.lookup(&idx);
	if (!zero)
		return NULL;
	backend_latency.insert(&k, zero); /* BPF_NOEXIST: a racing CPU's entry wins */
	return backend_latency.lookup(&k);
}

static __always_inline int nm_latency_on(void)
{
#ifdef NM_COST_NO_LATENCY /* measuring builds only (bench/sock_cost.py) */
	return 0;
#endif
	struct nm_observe_config *cfg = nm_observe();
	return cfg && cfg->latency;
}

/* ACTIVE_ESTABLISHED_CB of a socket that nm_conn_sockops has just counted as active: the
 * connect duration. Its state callbacks are on already (counting needs them to its close).
 *
 * The duration is the kernel's first RTT sample, which for an active open is SYN to SYN-ACK:
 * srtt holds exactly that sample when the connection becomes established, so nothing needs
 * to be stamped at connect. A retransmitted SYN is timed from its last copy: each earlier copy
 * waited one initial RTO (1 s, doubling), which is added back. */
static __always_inline void nm_latency_established(struct bpf_sock_ops *skops,
						   struct nm_conn_ref *ref)
{
	if (!nm_latency_on())
		return;
	struct nm_latency_stats *st = nm_latency_stats_of(ref);
	if (!st)
		return;
	u64 us = skops->srtt_us >> 3; /* the kernel keeps srtt << 3 */
	u32 syn_retrans = skops->total_retrans;
	if (syn_retrans > 6)
		syn_retrans = 6; /* net.ipv4.tcp_syn_retries' default: 1+2+4+8+16+32 s */
	us += ((1ULL << syn_retrans) - 1) * 1000000ULL;
	u32 b = nm_log2_bucket(us);
	if (b < NM_LAT_BUCKETS)
		__sync_fetch_and_add(&st->connect_us[b], 1);
	__sync_fetch_and_add(&st->connect_sum_us, us);
}

/* STATE_CB to CLOSE, called before nm_conn_sockops forgets the socket: a socket counted as
 * active that leaves a state after the handshake (counting starts at the SYN, so SYN_SENT and
 * SYN_RECV are not) was established through the connect hook's translation: count its end. */
static __always_inline void nm_latency_closed(struct bpf_sock_ops *skops,
					      struct nm_conn_ref *ref, u32 old_state)
{
	if (*ref->state != NM_SOCK_ACTIVE || old_state == 2 /* SYN_SENT */ ||
	    old_state == 3 /* SYN_RECV */ || !nm_latency_on())
		return;
	struct nm_latency_stats *st = nm_latency_stats_of(ref);
	if (!st)
		return;
	u64 rtt_us = skops->srtt_us >> 3; /* the kernel keeps srtt << 3 */
	u32 b = nm_log2_bucket(rtt_us);
	if (b < NM_LAT_BUCKETS)
		__sync_fetch_and_add(&st->rtt_us[b], 1);
	__sync_fetch_and_add(&st->rtt_sum_us, rtt_us);
	/* bytes_acked counts sequence space: the SYN's one, and the FIN's once it was acked
	 * (we leave FIN_WAIT2 or LAST_ACK only after that). The rest is payload. */
	u64 acked = skops->bytes_acked;
	u64 control = 1 + (old_state == 5 /* FIN_WAIT2 */ || old_state == 9 /* LAST_ACK */);
	__sync_fetch_and_add(&st->bytes_sent, acked > control ? acked - control : 0);
	__sync_fetch_and_add(&st->bytes_received, skops->bytes_received);
	u32 retrans = skops->total_retrans;
	if (retrans) /* most connections have none: skip the shared cache line's atomic */
		__sync_fetch_and_add(&st->retransmits, retrans);
	__sync_fetch_and_add(&st->closed, 1);
}

#endif
