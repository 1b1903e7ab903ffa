/* lib/flow.h — flow events: one ring-buffer record per translated (or refused) TCP connection
 * and per new UDP flow, for `nodemesh flows`.
 *
 * Called from: the connect and sendmsg hooks (sock_lb.c pick()), through nm_flow_emit().
 * Reads:  observe_config (rate), flow_udp_seen (UDP flows already reported)
 * Writes: flow_events (ring buffer), flow_budget (per-CPU token bucket and loss counters)
 *
 * Flood control is a token bucket per CPU, in nanoseconds of credit: a flood of connects
 * costs each one a lookup and a compare, never a ring-buffer reservation, and what the bucket
 * refuses is counted, not lost silently. Unconnected UDP is reported once per (socket,
 * VIP:port, backend): the LRU remembers what was already sent.
 */
#ifndef NM_LIB_FLOW_H
#define NM_LIB_FLOW_H

#include "lib/observe.h"

enum nm_flow_verdict {
	NM_FLOW_TRANSLATED = 1,     /* VIP -> backend */
	NM_FLOW_NO_BACKEND = 2,     /* refused with ECONNREFUSED: no backend */
	NM_FLOW_PROXY_REDIRECT = 3, /* sent to a local proxy */
	NM_FLOW_DENIED = 4,         /* refused by policy */
	NM_FLOW_DROPPED = 5,        /* dropped; `reason` says why */
};

/* Why a NM_FLOW_DROPPED flow was refused (flows.py REASONS names them). */
enum nm_flow_reason {
	NM_FLOW_REASON_CONNECTION_LIMIT = 1, /* connectionLimits: ECONNREFUSED (lib/conn_count.h) */
};

struct nm_flow_event {
	__u64 ts_ns;       /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u64 cgroup_id;   /* the calling task's cgroup v2 id */
	__u64 netns;       /* the socket's network namespace cookie: the client when no address */
	__u64 cookie;      /* the socket cookie */
	__u32 pid;         /* thread group id */
	__u32 svc_id;      /* the frontend (0: none) */
	char comm[16];
	__u32 client[4];   /* the socket's bound address, when it has one */
	__u32 vip[4];
	__u32 backend[4];  /* zero when there is no backend */
	__u16 client_port; /* host order (0: not bound yet) */
	__u16 vip_port;    /* network order */
	__u16 backend_port;/* network order */
	__u8 family;       /* NM_FAMILY_V4 / V6, of the VIP */
	__u8 proto;
	__u8 verdict;      /* enum nm_flow_verdict */
	__u8 reason;       /* NM_FLOW_DROPPED: the feature's drop reason */
	__u8 client_family;/* NM_FAMILY_V4 / V6 of `client` (0: unknown) */
	__u8 pad;
};

/* Per-CPU: no atomics, no sharing of cache lines between CPUs. */
struct nm_flow_budget {
	__u64 credit_ns;
	__u64 last_ns;
	__u64 lost_rate_limit; /* refused by the token bucket */
	__u64 lost_ring_full;  /* the agent was not reading fast enough */
	__u64 sent;
};

/* A UDP flow: a socket, the VIP:port it sent to and the backend it reached (unconnected
 * sockets choose a backend per datagram, so each backend they reach is a flow). */
struct nm_flow_udp_key {
	__u64 cookie;
	__u32 vip[4];
	__u32 backend[4];
	__u16 vip_port;
	__u16 backend_port;
	__u8 family;
	__u8 pad[3];
};

BPF_RINGBUF_OUTPUT(flow_events, 64); /* 64 pages: 256 KiB, about 1,900 events */
BPF_TABLE_PINNED("percpu_array", u32, struct nm_flow_budget, flow_budget, 1,
		 NM_PIN_DIR "/flow_budget");
BPF_TABLE("lru_hash", struct nm_flow_udp_key, __u8, flow_udp_seen, 16384);

static __always_inline int nm_flow_take(struct nm_observe_config *cfg,
					 struct nm_flow_budget *b, u64 now)
{
	u64 cost = cfg->flow_cost_ns;
	u64 credit = b->credit_ns + (now - b->last_ns);
	if (credit > cfg->flow_burst_ns)
		credit = cfg->flow_burst_ns;
	b->last_ns = now;
	if (credit < cost) {
		b->credit_ns = credit;
		b->lost_rate_limit += 1;
		return 0;
	}
	b->credit_ns = credit - cost;
	return 1;
}

/* Report one flow. ctx is the sock_addr context of the hook; vip the frontend key (addr,
 * port, proto, family); be the chosen backend or NULL. Features that refuse or redirect a
 * connection call it with their verdict (and a reason for NM_FLOW_DROPPED). */
static __always_inline void nm_flow_emit(struct bpf_sock_addr *ctx, u8 verdict, u8 reason,
					 struct nm_svc_key *vip, struct nm_backend *be, u32 svc_id)
{
	struct nm_observe_config *cfg = nm_observe();
	if (!cfg || cfg->flow_cost_ns == 0)
		return;
	u64 cookie = 0;
	if (vip->proto == IPPROTO_UDP) {
		cookie = bpf_get_socket_cookie(ctx);
		struct nm_flow_udp_key uk = {.cookie = cookie, .vip_port = vip->port,
					     .family = vip->family};
		uk.vip[0] = vip->addr[0];
		uk.vip[1] = vip->addr[1];
		uk.vip[2] = vip->addr[2];
		uk.vip[3] = vip->addr[3];
		if (be) {
			uk.backend[0] = be->addr[0];
			uk.backend[1] = be->addr[1];
			uk.backend[2] = be->addr[2];
			uk.backend[3] = be->addr[3];
			uk.backend_port = be->port;
		}
		if (flow_udp_seen.lookup(&uk))
			return; /* this flow was reported */
		u8 seen = 1;
		flow_udp_seen.update(&uk, &seen);
	}
	u32 zero = 0;
	struct nm_flow_budget *b = flow_budget.lookup(&zero);
	u64 now = bpf_ktime_get_ns();
	if (!b || !nm_flow_take(cfg, b, now))
		return;
	/* Built on the stack and copied: 136 bytes, and no reserved record to zero. */
	struct nm_flow_event e = {};
	struct nm_flow_event *ev = &e;
	ev->ts_ns = now; /* the bucket's clock read: one helper call less an event */
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->netns = bpf_get_netns_cookie(ctx);
	ev->cookie = cookie ? cookie : bpf_get_socket_cookie(ctx);
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->svc_id = svc_id;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		ev->client_port = (u16)sk->src_port;
		if (sk->family == 2 /* AF_INET */) {
			ev->client[0] = sk->src_ip4;
			ev->client_family = NM_FAMILY_V4;
		} else {
			ev->client_family = NM_FAMILY_V6;
			ev->client[0] = sk->src_ip6[0];
			ev->client[1] = sk->src_ip6[1];
			ev->client[2] = sk->src_ip6[2];
			ev->client[3] = sk->src_ip6[3];
		}
	}
	ev->vip[0] = vip->addr[0];
	ev->vip[1] = vip->addr[1];
	ev->vip[2] = vip->addr[2];
	ev->vip[3] = vip->addr[3];
	ev->vip_port = vip->port;
	ev->family = vip->family;
	ev->proto = vip->proto;
	ev->verdict = verdict;
	ev->reason = reason;
	if (be) {
		ev->backend[0] = be->addr[0];
		ev->backend[1] = be->addr[1];
		ev->backend[2] = be->addr[2];
		ev->backend[3] = be->addr[3];
		ev->backend_port = be->port;
	}
	/* Waking the reader costs an irq_work per event; it polls every 100 ms anyway, so each
	 * CPU wakes it on every 64th event only (64 x CPUs events fit the ring many times). */
	u64 flags = (b->sent & 63) == 0 ? 0 : BPF_RB_NO_WAKEUP;
	if (flow_events.ringbuf_output(ev, sizeof(*ev), flags))
		b->lost_ring_full += 1;
	else
		b->sent += 1;
}

#endif
