/* lib/conntrack.h — BPF conntrack of the TC path: lifetimes per protocol and state, TCP state
 * from FIN and RST, and the partner entry of each direction.
 *
 * The includer declares `ct` (lru_hash nm_ct_key -> nm_ct_value) and `tc_config`. An entry
 * holds the backend's address itself, not its id: a flow stays on its backend until it ends,
 * whatever happens to the service's backend set meanwhile. Expiry is checked on lookup (an
 * expired entry is a miss); the agent sweeps expired entries, and LRU eviction bounds memory.
 */
#ifndef NM_LIB_CONNTRACK_H
#define NM_LIB_CONNTRACK_H

#define NM_CT_DEFAULT_TCP_SYN_S 60
#define NM_CT_DEFAULT_TCP_ESTABLISHED_S 21600
#define NM_CT_DEFAULT_TCP_CLOSING_S 10
#define NM_CT_DEFAULT_UDP_S 60

#define NM_TCP_FIN 0x01
#define NM_TCP_SYN 0x02
#define NM_TCP_RST 0x04

static __always_inline u64 ct_lifetime_ns(u8 proto, u8 state)
{
	u32 zero = 0;
	struct nm_tc_config *cfg = tc_config.lookup(&zero);
	u32 s = 0;
	if (proto == IPPROTO_UDP) {
		s = cfg ? cfg->udp_s : 0;
		if (!s)
			s = NM_CT_DEFAULT_UDP_S;
	} else if (state == NM_CT_ESTABLISHED) {
		s = cfg ? cfg->tcp_established_s : 0;
		if (!s)
			s = NM_CT_DEFAULT_TCP_ESTABLISHED_S;
	} else if (state == NM_CT_CLOSING) {
		s = cfg ? cfg->tcp_closing_s : 0;
		if (!s)
			s = NM_CT_DEFAULT_TCP_CLOSING_S;
	} else {
		s = cfg ? cfg->tcp_syn_s : 0;
		if (!s)
			s = NM_CT_DEFAULT_TCP_SYN_S;
	}
	return (u64)s * 1000000000ULL;
}

static __always_inline int ct_expired(struct nm_ct_key *k, struct nm_ct_value *v, u64 now)
{
	return now - v->last_seen_ns > ct_lifetime_ns(k->proto, v->state);
}

/* The key of the other direction of the flow v belongs to. */
static __always_inline void ct_partner_key(struct nm_ct_key *k, struct nm_ct_value *v,
					   struct nm_ct_key *out)
{
	out->src[0] = v->nat_dst[0];
	out->src[1] = v->nat_dst[1];
	out->src[2] = v->nat_dst[2];
	out->src[3] = v->nat_dst[3];
	out->dst[0] = v->nat_src[0];
	out->dst[1] = v->nat_src[1];
	out->dst[2] = v->nat_src[2];
	out->dst[3] = v->nat_src[3];
	out->sport = v->nat_dport;
	out->dport = v->nat_sport;
	out->proto = k->proto;
	out->family = k->family;
	out->pad = 0;
}

/* TCP: the next state after a packet with these flags, seen in direction `kind`. */
static __always_inline u8 ct_next_state(u8 proto, u8 state, u8 kind, u8 tcp_flags)
{
	if (proto != IPPROTO_TCP)
		return NM_CT_DATAGRAM;
	if (tcp_flags & (NM_TCP_FIN | NM_TCP_RST))
		return NM_CT_CLOSING;
	if (state == NM_CT_SYN_SENT && kind == NM_CT_REPLY)
		return NM_CT_ESTABLISHED;
	/* A new SYN on a closing tuple reuses it (a client that reuses its port quickly). */
	if (state == NM_CT_CLOSING && (tcp_flags & NM_TCP_SYN) && kind == NM_CT_FORWARD)
		return NM_CT_SYN_SENT;
	return state;
}

/* Look up the entry for this packet's tuple. Returns it (refreshed, its state and its
 * partner's advanced) or NULL for a miss; an expired flow is removed and is a miss. */
static __always_inline struct nm_ct_value *ct_lookup(struct nm_ct_key *k, u8 tcp_flags)
{
	struct nm_ct_value *v = ct.lookup(k);
	if (!v)
		return NULL;
	u64 now = bpf_ktime_get_ns();
	struct nm_ct_key pk = {};
	ct_partner_key(k, v, &pk);
	if (ct_expired(k, v, now)) {
		ct.delete(&pk);
		ct.delete(k);
		return NULL;
	}
	u8 next = ct_next_state(k->proto, v->state, v->kind, tcp_flags);
	v->last_seen_ns = now;
	v->state = next;
	struct nm_ct_value *pv = ct.lookup(&pk);
	if (pv) {
		pv->last_seen_ns = now;
		pv->state = next;
	}
	return v;
}

#endif /* NM_LIB_CONNTRACK_H */
