/* lib/observe.h — the agent's switches for the observability features (flow events, kernel
 * latency per backend), one array element the agent writes at start.
 *
 * The datapath reads it once per hook call; with everything off, a hook pays one array
 * lookup for all of this (bench/observability.py measures the difference).
 */
#ifndef NM_LIB_OBSERVE_H
#define NM_LIB_OBSERVE_H

struct nm_observe_config {
	__u64 flow_cost_ns;  /* token-bucket cost of one flow event: 1e9 / events per second per
			      * CPU; 0 turns flow events off */
	__u64 flow_burst_ns; /* bucket depth, in the same unit (cost * burst events) */
	__u32 latency;       /* 1: connect duration, RTT, bytes and retransmits per backend */
	__u32 pad;
};

BPF_TABLE_PINNED("array", u32, struct nm_observe_config, observe_config, 1,
		 NM_PIN_DIR "/observe_config");

static __always_inline struct nm_observe_config *nm_observe(void)
{
	u32 zero = 0;
	return observe_config.lookup(&zero);
}

#endif
