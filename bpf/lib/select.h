/* lib/select.h — backend selection, shared by the socket hooks (sock_lb.c) and the TC packet
 * path (tc_nodeport.c), so that both choose backends with the same code.
 *
 * The includer declares the maps this reads and writes (services, backends, rr_state, affinity,
 * backend_stats, counters, svc_stats), includes lib/maglev.h (the maglev tables) and defines
 * count(). `client` identifies the client for session affinity: the socket hooks pass the
 * netns cookie, the TC path the source address. `flow` is what Maglev hashes: the socket
 * hooks pass the netns cookie again, the TC path the flow (source address and port).
 */
#ifndef NM_LIB_SELECT_H
#define NM_LIB_SELECT_H

/* Maglev (lib/maglev.h, which the includer includes first): the row of `flow` in the
 * frontend's table. The socket hooks pass the client's netns cookie, so every socket of a pod
 * reaches the same backend; the TC path passes a hash of the source address and port, so
 * that one flow reaches the same backend through whichever node ECMP sends it to, and one
 * client's flows spread over the backends. 0 when the table has no live backend for it (the
 * caller falls back to the slots and counts a miss). */
static __always_inline u32 maglev_pick(u64 flow, struct nm_svc_key *key,
				       struct nm_svc_value *master)
{
	u32 svc_id = master->svc_id;
	void *table = maglev.lookup(&svc_id);
	u32 backend_id = table ? nm_maglev_backend(table, master->backend_id,
						   nm_maglev_hash(flow, key)) : 0;
	if (!backend_id || !backends.lookup(&backend_id)) {
		count(NM_CTR_MAGLEV_MISS);
		return 0;
	}
	return backend_id;
}

static __always_inline struct nm_backend *sticky_backend(u64 client, u32 svc_id, u64 timeout_s,
							  struct nm_affinity_key *ak)
{
	ak->client = client;
	ak->svc_id = svc_id;
	struct nm_affinity_value *av = affinity.lookup(ak);
	if (!av)
		return NULL;
	u64 now = bpf_ktime_get_ns();
	u32 backend_id = av->backend_id;
	struct nm_backend *be = backends.lookup(&backend_id);
	/* The backend left the set (its id was freed, maybe reused elsewhere) or the client was
	 * idle too long: forget it and choose afresh. */
	if (!be || be->svc_id != svc_id || now - av->last_used_ns > timeout_s * 1000000000ULL) {
		affinity.delete(ak);
		return NULL;
	}
	av->last_used_ns = now;
	struct nm_backend_stats zero = {};
	struct nm_backend_stats *bs = backend_stats.lookup_or_try_init(&backend_id, &zero);
	if (bs)
		bs->connections += 1;
	count(NM_CTR_AFFINITY_HIT);
	return be;
}

/* Pick a backend for key (slot must be 0 on entry). Returns the backend, or NULL with
 * *is_service telling whether key was a frontend at all (NULL + is_service: no backend;
 * is_service 2: over a connection limit). `master`: key's master entry if the caller has just
 * looked it up (the socket hooks, which needed it first), else NULL. */
static __always_inline struct nm_backend *select_backend(u64 client, u64 flow,
							  struct nm_svc_key *key,
							  struct nm_svc_value *master0,
							  int *is_service, u32 *svc_id_out)
{
	*is_service = 0;
	/* Two tries: a reader that loses a race with an update (its bank was just deleted)
	 * re-reads the master and then sees the new bank in full. */
#pragma unroll
	for (int attempt = 0; attempt < 2; attempt++) {
		key->slot = 0;
		struct nm_svc_value *master = attempt == 0 && master0 ? master0
								     : services.lookup(key);
		if (!master)
			return NULL;
		*is_service = 1;
		u32 svc_id = master->svc_id;
		u32 n = master->count;
		*svc_id_out = svc_id;
		if (n == 0)
			return NULL;
		struct nm_affinity_key ak = {};
		int sticky = master->flags & NM_SVC_F_AFFINITY;
		u64 timeout_s = master->affinity_timeout;
		if (sticky) {
			struct nm_backend *kept = sticky_backend(client, svc_id, timeout_s, &ak);
			if (kept)
				return kept;
		}
		u32 backend_id = 0;
		if (master->algorithm == NM_ALG_MAGLEV)
			backend_id = maglev_pick(flow, key, master);
		if (!backend_id) { /* random, round robin, or a maglev table miss */
			u32 index;
			if (master->algorithm == NM_ALG_ROUND_ROBIN) {
				u64 *pos = rr_state.lookup(&svc_id);
				index = pos ? (u32)(__sync_fetch_and_add(pos, 1) % n) : 0;
			} else {
				index = bpf_get_prandom_u32() % n;
			}
#ifdef NM_LIB_CONN_COUNT_H
			/* The socket path counts connections (lib/conn_count.h): least_connections
			 * and connection limits refine the draw. The TC path has no such counts. */
			if (nm_conn_choose(key, master->bank, master->algorithm, svc_id, n,
					   master->max_conns_per_backend, master->max_conns,
					   &index) < 0) {
				*is_service = 2; /* over a connection limit: refused, counted there */
				return NULL;
			}
#endif
			key->slot = ((u16)master->bank << NM_SLOT_BANK_SHIFT) |
				    (u16)((index + 1) & NM_SLOT_INDEX_MASK);
			struct nm_svc_value *slot = services.lookup(key);
			if (!slot) {
				count(NM_CTR_SLOT_MISS);
				continue;
			}
			backend_id = slot->backend_id;
		}
		struct nm_backend *be = backends.lookup(&backend_id);
		if (!be) {
			count(NM_CTR_BACKEND_MISS);
			continue;
		}
		struct nm_backend_stats zero = {};
		struct nm_backend_stats *bs = backend_stats.lookup_or_try_init(&backend_id, &zero);
		if (bs)
			bs->connections += 1;
		if (sticky) {
			struct nm_affinity_value av = {.backend_id = backend_id,
						       .last_used_ns = bpf_ktime_get_ns()};
			affinity.update(&ak, &av);
		}
		return be;
	}
	return NULL;
}

/* A frontend's per-CPU counters: a connection (or datagram) sent to a backend, or refused for
 * want of one. Both paths count into the same svc_stats. */
static __always_inline void account(u32 svc_id, int selected)
{
	struct nm_svc_stats zero = {};
	struct nm_svc_stats *st = svc_stats.lookup_or_try_init(&svc_id, &zero);
	if (!st)
		return;
	if (selected)
		st->connections += 1;
	else
		st->no_backend += 1;
}

#endif /* NM_LIB_SELECT_H */
