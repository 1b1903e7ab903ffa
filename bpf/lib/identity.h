/* lib/identity.h — the workload identity of the calling task, from its cgroup.
 *
 * Reads: identities (cgroup id -> identity number and flags), written by the agent from the
 *        `workloads:` config or the Pods on this node.
 *
 * A pod's cgroup is registered; its containers are child cgroups. So the task's cgroup and
 * every ancestor are looked up, and the deepest registered one wins (a container registered
 * on its own beats its pod).
 */
#ifndef NM_LIB_IDENTITY_H
#define NM_LIB_IDENTITY_H

#ifndef NM_MAX_IDENTITIES
#define NM_MAX_IDENTITIES 65536 /* registered cgroups */
#endif
#define NM_MAX_CGROUP_DEPTH 16

#define NM_IDENTITY_F_NO_SOCKET_LB 0x1 /* socketLB: false: never translated at the socket */

struct nm_identity {
	__u32 identity; /* 0: none (the world) */
	__u32 flags;    /* NM_IDENTITY_F_* */
};

BPF_F_TABLE("hash:" NM_PIN_DIR "/identities", __u64, struct nm_identity, identities,
	    NM_MAX_IDENTITIES, BPF_F_NO_PREALLOC);
/* Agent only: identity number -> fingerprint of its (namespace, service account, labels), so
 * that a restarted agent hands out the same numbers. */
BPF_F_TABLE("hash:" NM_PIN_DIR "/identity_keys", u32, u64, identity_keys, NM_MAX_IDENTITIES,
	    BPF_F_NO_PREALLOC);

static __always_inline struct nm_identity nm_current_identity(void)
{
	struct nm_identity found = {};
#pragma unroll
	for (int level = 1; level <= NM_MAX_CGROUP_DEPTH; level++) {
		u64 cgid = bpf_get_current_ancestor_cgroup_id(level);
		if (!cgid)
			break; /* deeper than the task's own cgroup */
		struct nm_identity *id = identities.lookup(&cgid);
		if (id)
			found = *id;
	}
	return found;
}

#endif /* NM_LIB_IDENTITY_H */
