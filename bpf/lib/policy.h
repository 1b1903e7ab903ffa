/* lib/policy.h — L4 authorization of a connect() or unconnected sendto() to a frontend.
 *
 * Reads:  policy ((frontend, identity) -> verdict, compiled by the agent), identities,
 *         policy_config
 * Writes: per-CPU policy_stats (per frontend: denied, audited)
 *
 * The agent compiles the rules (Istio semantics: DENY wins; when an ALLOW applies to a
 * service, all else to it is denied; AUDIT allows and records) into one verdict per
 * (frontend, identity), plus the frontend's default under identity 0 for every identity not
 * listed. A frontend without a default entry has no policy: its connects cost one lookup.
 * A denied connect() fails at once with EPERM and no packet is sent.
 */
#ifndef NM_LIB_POLICY_H
#define NM_LIB_POLICY_H

#include "lib/identity.h"

#ifndef NM_MAX_POLICY
#define NM_MAX_POLICY 262144 /* compiled (frontend, identity) verdicts */
#endif

enum nm_verdict {
	NM_VERDICT_ALLOW = 0,
	NM_VERDICT_DENY = 1,
	NM_VERDICT_AUDIT = 2, /* allowed, and counted */
};

struct nm_policy_key {
	__u32 addr[4]; /* frontend: VIP, port, protocol, family as in nm_svc_key */
	__u16 port;
	__u8 proto;
	__u8 family;
	__u32 identity; /* 0: the frontend's default */
};

struct nm_policy_value {
	__u32 verdict; /* enum nm_verdict */
	__u32 rule;    /* index of the deciding rule in the compiled list (0: the default) */
};

struct nm_policy_stats {
	__u64 denied;
	__u64 audited;
};

struct nm_policy_config {
	__u32 opt_out_workloads; /* identities entries with NM_IDENTITY_F_NO_SOCKET_LB */
	__u32 pad;
};

BPF_F_TABLE("hash:" NM_PIN_DIR "/policy", struct nm_policy_key, struct nm_policy_value, policy,
	    NM_MAX_POLICY, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash:" NM_PIN_DIR "/policy_stats", struct nm_policy_key,
	    struct nm_policy_stats, policy_stats, NM_MAX_FRONTENDS, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", u32, struct nm_policy_config, policy_config, 1,
		 NM_PIN_DIR "/policy_config");

#define NM_POLICY_PASS 0    /* go on balancing */
#define NM_POLICY_DENIED 1  /* refuse with EPERM */
#define NM_POLICY_NO_LB 2   /* the workload opted out: leave the address alone */

/* key: the frontend as the hook built it (slot 0). */
static __always_inline int nm_policy_decide(struct nm_svc_key *key)
{
	struct nm_policy_key pk = {};
	pk.addr[0] = key->addr[0];
	pk.addr[1] = key->addr[1];
	pk.addr[2] = key->addr[2];
	pk.addr[3] = key->addr[3];
	pk.port = key->port;
	pk.proto = key->proto;
	pk.family = key->family;
	struct nm_policy_value *def = policy.lookup(&pk);
	u32 zero = 0;
	struct nm_policy_config *cfg = policy_config.lookup(&zero);
	int opt_outs = cfg && cfg->opt_out_workloads;
	if (!def && !opt_outs)
		return NM_POLICY_PASS; /* the common case: one lookup, no identity walk */
	struct nm_identity me = nm_current_identity();
	if (me.flags & NM_IDENTITY_F_NO_SOCKET_LB)
		return NM_POLICY_NO_LB;
	if (!def)
		return NM_POLICY_PASS;
	u32 verdict = def->verdict;
	if (me.identity) {
		pk.identity = me.identity;
		struct nm_policy_value *v = policy.lookup(&pk);
		if (v)
			verdict = v->verdict;
		pk.identity = 0;
	}
	if (verdict == NM_VERDICT_ALLOW)
		return NM_POLICY_PASS;
	struct nm_policy_stats zs = {};
	struct nm_policy_stats *st = policy_stats.lookup_or_try_init(&pk, &zs);
	if (verdict == NM_VERDICT_AUDIT) {
		if (st)
			st->audited += 1;
		return NM_POLICY_PASS;
	}
	if (st)
		st->denied += 1;
	return NM_POLICY_DENIED;
}

static __always_inline int nm_policy_reject(void)
{
	bpf_set_retval(-EPERM);
	return 0; /* SYS_REJECT */
}

#endif /* NM_LIB_POLICY_H */
