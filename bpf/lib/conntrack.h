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
#define NM_TCP_ACK 0x10

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

/* Signed: another CPU may have refreshed the entry after `now` was read. */
static __always_inline s64 ct_age_ns(struct nm_ct_value *v, u64 now)
{
	return (s64)(now - v->last_seen_ns);
}

static __always_inline int ct_expired(struct nm_ct_key *k, struct nm_ct_value *v, u64 now)
{
	return ct_age_ns(v, now) > (s64)ct_lifetime_ns(k->proto, v->state);
}

/* Whether v (the entry of the other direction) belongs to the same flow as key k, i.e. v's
 * partner key is k. Not so for a forward entry whose SNAT port a new flow has taken over. */
static __always_inline int ct_points_back(struct nm_ct_value *v, struct nm_ct_key *k)
{
	return v->nat_dport == k->sport && v->nat_sport == k->dport &&
	       v->nat_dst[0] == k->src[0] && v->nat_dst[1] == k->src[1] &&
	       v->nat_dst[2] == k->src[2] && v->nat_dst[3] == k->src[3] &&
	       v->nat_src[0] == k->dst[0] && v->nat_src[1] == k->dst[1] &&
	       v->nat_src[2] == k->dst[2] && v->nat_src[3] == k->dst[3];
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

/* The entry of the other direction of the flow whose entry at key k is v: each names the
 * other's tuple, so one is the mirror of the other. For rebuilding an entry the LRU evicted. */
static __always_inline void ct_mirror(struct nm_ct_key *k, struct nm_ct_value *v, u64 now,
				      struct nm_ct_value *out)
{
	__builtin_memcpy(out->nat_src, k->dst, 16);
	__builtin_memcpy(out->nat_dst, k->src, 16);
	out->nat_sport = k->dport;
	out->nat_dport = k->sport;
	out->kind = v->kind == NM_CT_FORWARD ? NM_CT_REPLY : NM_CT_FORWARD;
	out->state = v->state;
	out->flags = v->flags;
	out->pad = 0;
	out->svc_id = v->svc_id;
	out->last_seen_ns = now;
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

/* TCP: which sides have ended the flow (NM_CT_F_FIN_*), after a packet seen in direction
 * `kind`. An RST ends it both ways; a SYN that reopens a closing tuple starts it afresh. */
static __always_inline u8 ct_next_flags(u8 proto, u8 flags, u8 kind, u8 tcp_flags, u8 next)
{
	if (proto != IPPROTO_TCP)
		return flags;
	if (tcp_flags & NM_TCP_RST)
		return flags | NM_CT_F_OVER;
	if (tcp_flags & NM_TCP_FIN)
		return flags | (kind == NM_CT_FORWARD ? NM_CT_F_FIN_CLIENT : NM_CT_F_FIN_BACKEND);
	if (next == NM_CT_SYN_SENT)
		return flags & ~NM_CT_F_OVER;
	return flags;
}

/* Look up the entry for this packet's tuple. Returns it (refreshed, its state and its
 * partner's advanced) or NULL for a miss; an expired flow is removed and is a miss. */
static __always_inline struct nm_ct_value *ct_lookup(struct nm_ct_key *k, u8 tcp_flags)
{
	struct nm_ct_value *v = ct.lookup(k);
	if (!v)
		return NULL;
	u64 now = bpf_ktime_get_ns();
	/* The common case, a packet of an established TCP flow that changes nothing (no SYN, FIN
	 * or RST): only this entry is refreshed. Its partner is refreshed by the packets of the
	 * other direction (an established flow has both), its port cannot have been taken over
	 * (only flows that are over or expired give theirs up), and each entry stays warm in the
	 * LRU by its own direction's packets (should the LRU evict one anyway, the flow's next SYN,
	 * FIN or RST rebuilds it, below). Everything else takes the full path below. This saves
	 * about a quarter of the ingress program's time per packet (bpf_stats: 1,068 -> 807 ns). */
	if (v->state == NM_CT_ESTABLISHED &&
	    !(tcp_flags & (NM_TCP_SYN | NM_TCP_FIN | NM_TCP_RST)) && !ct_expired(k, v, now)) {
		v->last_seen_ns = now;
		return v;
	}
	struct nm_ct_key pk = {};
	ct_partner_key(k, v, &pk);
	struct nm_ct_value *pv = ct.lookup(&pk);
	if (pv && !ct_points_back(pv, k)) {
		/* The partner is another flow's: this is the forward entry of a flow whose SNAT
		 * port was taken over (normally deleted then, but a racing CPU or an LRU eviction
		 * can leave it). A late packet of it must not be translated into the new flow. */
		ct.delete(k);
		return NULL;
	}
	if (ct_expired(k, v, now)) {
		if (pv)
			ct.delete(&pk);
		ct.delete(k);
		return NULL;
	}
	if (!pv) {
		/* The LRU evicted the other direction's entry while this one lived (entries are
		 * evicted one by one). Without it the flow is half-translated: a client's SYN that
		 * reopens this closing tuple would reach the backend, and the answer would come
		 * back untranslated and be lost. Rebuild it: each entry names its partner's tuple
		 * and its partner names this one, so one is the mirror of the other. */
		struct nm_ct_value mirror = {};
		ct_mirror(k, v, now, &mirror);
		ct.insert(&pk, &mirror); /* BPF_NOEXIST: a flow that took the tuple meanwhile wins */
		pv = ct.lookup(&pk);
		if (pv && !ct_points_back(pv, k)) {
			ct.delete(k);
			return NULL;
		}
	}
	u8 next = ct_next_state(k->proto, v->state, v->kind, tcp_flags);
	u8 flags = ct_next_flags(k->proto, v->flags, v->kind, tcp_flags, next);
	v->last_seen_ns = now;
	v->state = next;
	v->flags = flags;
	if (pv) {
		pv->last_seen_ns = now;
		pv->state = next;
		pv->flags = flags;
	}
	return v;
}

/* Whether a new flow may take over the SNAT port whose reply entry (key k) is v: the entry has
 * expired, or (for a new TCP SYN) its flow is over both ways and has been silent for
 * NM_SNAT_REUSE_AFTER_NS. The reasons for the second are at the allocation loop. */
static __always_inline int ct_snat_reusable(struct nm_ct_key *k, struct nm_ct_value *v, u64 now,
					    int syn)
{
	if (ct_expired(k, v, now))
		return 1;
	return syn && k->proto == IPPROTO_TCP && v->state == NM_CT_CLOSING &&
	       (v->flags & NM_CT_F_OVER) == NM_CT_F_OVER &&
	       ct_age_ns(v, now) >= (s64)NM_SNAT_REUSE_AFTER_NS;
}

#endif /* NM_LIB_CONNTRACK_H */
