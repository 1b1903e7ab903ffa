/* lib/maglev.h — Maglev consistent hashing: a lookup table per frontend, built by the agent.
 *
 * Reads:  maglev (pinned ARRAY_OF_MAPS, index svc_id) -> that frontend's table, an ARRAY of
 *         backend ids, one per row (agent/nodemesh/maglev.py builds it).
 * Writes: nothing; the caller counts a miss and falls back to its slots.
 *
 * The table size is the frontend's own (`maglev.tableSize`): the template below carries
 * BPF_F_INNER_MAP so inner arrays of any size fit the outer map, and the size travels in the
 * master entry (nm_svc_value.backend_id of a maglev master). The agent swaps a whole new table
 * in with one write of the outer map, so a reader sees the old table or the new one, never a
 * mix (see agent/nodemesh/datapath/maglev_tables.py).
 *
 * Callers hash what identifies a client: the socket path uses the client's netns cookie (all
 * sockets of a pod reach the same backend), the TC path the flow's source address and port
 * (tc_nodeport.c's flow_identity(); the frontend is the rest of the 5-tuple).
 */
#ifndef NODEMESH_LIB_MAGLEV_H
#define NODEMESH_LIB_MAGLEV_H

#ifndef NM_MAGLEV_TEMPLATE_ROWS
#define NM_MAGLEV_TEMPLATE_ROWS 16381
#endif

/* Only the inner maps' shape matters (key, value, flags); the template itself stays empty. */
BPF_F_TABLE("array", u32, u32, maglev_template, NM_MAGLEV_TEMPLATE_ROWS, BPF_F_INNER_MAP);
BPF_TABLE("array_of_maps$maglev_template:" NM_PIN_DIR "/maglev", u32, int, maglev,
	  NM_MAX_FRONTENDS);
/* Each frontend's previous table, parked for the agent's next changed-rows write; no program
 * reads it. It lives here so that the kernel, not an agent's fds, keeps the spares alive. */
BPF_TABLE("array_of_maps$maglev_template:" NM_PIN_DIR "/maglev_spare", u32, int, maglev_spare,
	  NM_MAX_FRONTENDS);

/* A 64-bit finalizer (splitmix64): consecutive cookies and ports spread over all rows. */
static __always_inline u64 nm_mix64(u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return x;
}

/* The hash of a client at a frontend: the same client and frontend always give the same row,
 * and one client spreads over backends differently at each frontend. */
static __always_inline u32 nm_maglev_hash(u64 client, const struct nm_svc_key *fe)
{
	u64 h = nm_mix64(client ^ ((u64)fe->addr[0] << 32 | fe->addr[3]));
	h = nm_mix64(h ^ ((u64)fe->addr[1] << 32 | fe->addr[2]));
	h = nm_mix64(h ^ ((u64)fe->port << 16 | fe->proto));
	return (u32)(h ^ (h >> 32));
}

/* The backend id in row hash % rows of a frontend's table; 0 (never an id) if the row is beyond
 * the table (a size change in flight). `table` is what maglev.lookup(&svc_id) gave: BCC turns
 * map methods into map references only in the main .c file, so the caller does that lookup. */
static __always_inline u32 nm_maglev_backend(void *table, u32 rows, u32 hash)
{
	if (rows == 0)
		return 0;
	u32 row = hash % rows;
	u32 *backend_id = bpf_map_lookup_elem(table, &row);
	return backend_id ? *backend_id : 0;
}

#endif /* NODEMESH_LIB_MAGLEV_H */
