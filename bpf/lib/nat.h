/* lib/nat.h — rewriting a packet's addresses and ports with correct L3 and L4 checksums, and
 * translating the packet quoted inside an ICMP error.
 *
 * Everything goes through bpf_skb_load_bytes / bpf_skb_store_bytes and the kernel's checksum
 * helpers, which also keep CHECKSUM_PARTIAL packets (veth, offload) right: no direct packet
 * access, so no bounds juggling for the verifier, and IPv4 options are just an offset.
 */
#ifndef NM_LIB_NAT_H
#define NM_LIB_NAT_H

#define NM_ETH_HLEN 14
#define NM_IP4_CSUM_OFF (NM_ETH_HLEN + 10)
#define NM_IP4_SRC_OFF (NM_ETH_HLEN + 12)
#define NM_IP4_DST_OFF (NM_ETH_HLEN + 16)
#define NM_IP6_SRC_OFF (NM_ETH_HLEN + 8)
#define NM_IP6_DST_OFF (NM_ETH_HLEN + 24)

/* A parsed packet: its tuple (as on the wire) and where its L4 header and checksum are. */
struct nm_pkt {
	struct nm_ct_key t;
	u32 l4_off;
	u32 csum_off;   /* the L4 checksum (TCP 16, UDP 6, ICMP 2 bytes into L4) */
	u8 tcp_flags;
	u8 icmp_error;  /* an ICMP(v6) error: t is the *quoted* packet's tuple, reversed */
};

/* One's-complement arithmetic for the bytes we rewrite ourselves (the quoted packet of an ICMP
 * error). Values are taken as they lie in memory, so byte order does not matter. */
static __always_inline u16 csum_fold32(u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (u16)s;
}

static __always_inline u16 csum_replace32(u16 check, u32 from, u32 to)
{
	/* RFC 1624: HC' = ~(~HC + ~m + m') */
	u32 s = (u16)~check;
	s += (u16)~(from & 0xffff);
	s += (u16)~(from >> 16);
	s += to & 0xffff;
	s += to >> 16;
	return (u16)~csum_fold32(s);
}

static __always_inline u16 csum_replace16(u16 check, u16 from, u16 to)
{
	u32 s = (u16)~check;
	s += (u16)~from;
	s += to;
	return (u16)~csum_fold32(s);
}

static __always_inline int l4_csum_flags(struct nm_pkt *p)
{
	/* An IPv4 UDP checksum of 0 means "none": leave it 0 (MANGLED_0 also turns a computed 0
	 * into 0xffff). */
	return p->t.proto == IPPROTO_UDP && p->t.family == NM_FAMILY_V4 ? BPF_F_MARK_MANGLED_0 : 0;
}

/* Rewrite the source or destination address (`off`: its offset) from old to new. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, struct nm_pkt *p, u32 off,
					u32 *old, u32 *new)
{
	if (p->t.family == NM_FAMILY_V4) {
		if (old[0] == new[0])
			return 0;
		/* ICMPv4's checksum has no pseudo-header: only the IP header's changes. */
		if (p->t.proto != IPPROTO_ICMP &&
		    bpf_l4_csum_replace(skb, p->csum_off, old[0], new[0],
					BPF_F_PSEUDO_HDR | l4_csum_flags(p) | 4) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, NM_IP4_CSUM_OFF, old[0], new[0], 4) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, off, &new[0], 4, 0);
	}
	if (old[0] == new[0] && old[1] == new[1] && old[2] == new[2] && old[3] == new[3])
		return 0;
	/* IPv6 has no header checksum; TCP, UDP and ICMPv6 cover the addresses. */
	s64 diff = bpf_csum_diff(old, 16, new, 16, 0);
	if (bpf_l4_csum_replace(skb, p->csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, new, 16, 0);
}

/* The one's-complement sum of the difference from old to new, n 32-bit words, in the form
 * bpf_csum_diff returns (what the csum_replace helpers take with size 0), computed here rather
 * than by a helper call. */
static __always_inline u32 csum_diff_words(u32 *old, u32 *new, int n)
{
	u64 s = 0;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < n)
			s += (u32)~old[i] + (u64)new[i];
	}
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	return (u32)s;
}

/* A TCP or UDP packet becomes nat_src:nat_sport -> nat_dst:nat_dport. Both addresses are one
 * store and one checksum difference, both ports another: at most five helper calls for IPv4
 * (four for IPv6, which has no header checksum), where an address or port at a time took up
 * to ten. The ports' difference goes in without BPF_F_PSEUDO_HDR: for a CHECKSUM_PARTIAL
 * packet the kernel then leaves the field alone (it holds only the pseudo-header's sum; the
 * device sums the ports), while the addresses' difference is applied to it. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct nm_pkt *p,
				       struct nm_ct_value *v)
{
	u32 old_ports, new_ports;
	__builtin_memcpy(&old_ports, &p->t.sport, 4); /* sport, dport: adjacent as on the wire */
	__builtin_memcpy(&new_ports, &v->nat_sport, 4);
	if (p->t.family == NM_FAMILY_V4) {
		u32 old_a[2] = {p->t.src[0], p->t.dst[0]};
		u32 new_a[2] = {v->nat_src[0], v->nat_dst[0]};
		if (old_a[0] != new_a[0] || old_a[1] != new_a[1]) {
			u32 d = csum_diff_words(old_a, new_a, 2);
			if (bpf_l4_csum_replace(skb, p->csum_off, 0, d,
						BPF_F_PSEUDO_HDR | l4_csum_flags(p)) < 0 ||
			    bpf_l3_csum_replace(skb, NM_IP4_CSUM_OFF, 0, d, 0) < 0 ||
			    bpf_skb_store_bytes(skb, NM_IP4_SRC_OFF, new_a, 8, 0) < 0)
				return -1;
		}
	} else {
		/* src[4] then dst[4] lead both structs, as the addresses lie in the header */
		u32 *old_a = (u32 *)&p->t, *new_a = (u32 *)v;
		int same = 1;
#pragma unroll
		for (int i = 0; i < 8; i++)
			same &= old_a[i] == new_a[i];
		if (!same) {
			u32 d = csum_diff_words(old_a, new_a, 8);
			if (bpf_l4_csum_replace(skb, p->csum_off, 0, d, BPF_F_PSEUDO_HDR) < 0 ||
			    bpf_skb_store_bytes(skb, NM_IP6_SRC_OFF, new_a, 32, 0) < 0)
				return -1;
		}
	}
	if (old_ports != new_ports &&
	    (bpf_l4_csum_replace(skb, p->csum_off, old_ports, new_ports, l4_csum_flags(p) | 4) < 0 ||
	     bpf_skb_store_bytes(skb, p->l4_off, &new_ports, 4, 0) < 0))
		return -1;
	return 0;
}

/* The quoted packet of an ICMP(v6) error, up to its ports: IPv4 20 + 8 bytes, IPv6 40 + 8. */
#define NM_QUOTE4 28
#define NM_QUOTE6 48

/* q and old: NM_QUOTE6 bytes of scratch each.
 * An ICMP error about a translated flow. p->t is the quoted packet's tuple reversed, i.e. the
 * tuple of the flow's packets coming towards us, and v its conntrack entry: the quoted packet
 * was sent as (v->nat_src... reversed) and must read as the client sent it or saw it, the outer
 * header must go to the client. The quoted packet's own IP and UDP checksums are kept right,
 * then the ICMP checksum is adjusted by the difference of the quoted bytes. */
static __always_inline int nat_icmp_error(struct __sk_buff *skb, struct nm_pkt *p,
					  struct nm_ct_value *v, u32 outer_src[4], u32 outer_dst[4],
					  u32 *q, u32 *old)
{
	u32 quote_off = p->l4_off + 8;
	/* Outer header: to the client; from the service address if the backend itself sent it. */
	u32 new_dst[4] = {v->nat_dst[0], v->nat_dst[1], v->nat_dst[2], v->nat_dst[3]};
	u32 new_src[4] = {outer_src[0], outer_src[1], outer_src[2], outer_src[3]};
	if (outer_src[0] == p->t.src[0] && outer_src[1] == p->t.src[1] &&
	    outer_src[2] == p->t.src[2] && outer_src[3] == p->t.src[3]) {
		new_src[0] = v->nat_src[0];
		new_src[1] = v->nat_src[1];
		new_src[2] = v->nat_src[2];
		new_src[3] = v->nat_src[3];
	}
	struct nm_pkt outer = *p;
	outer.t.proto = p->t.family == NM_FAMILY_V4 ? IPPROTO_ICMP : IPPROTO_ICMPV6;
	outer.csum_off = p->l4_off + 2;
	if (p->t.family == NM_FAMILY_V4) {
		if (bpf_skb_load_bytes(skb, quote_off, q, NM_QUOTE4) < 0)
			return -1;
		__builtin_memcpy(old, q, NM_QUOTE4);
		/* quoted: src = our side of the flow (p->t.dst), dst = the peer (p->t.src) */
		u16 *w = (u16 *)q;
		u16 ipcsum = w[5];
		ipcsum = csum_replace32(ipcsum, q[3], v->nat_dst[0]);
		ipcsum = csum_replace32(ipcsum, q[4], v->nat_src[0]);
		w[5] = ipcsum;
		u32 qs = q[3], qd = q[4];
		q[3] = v->nat_dst[0];
		q[4] = v->nat_src[0];
		u16 osp = w[10], odp = w[11];
		w[10] = v->nat_dport;
		w[11] = v->nat_sport;
		if (p->t.proto == IPPROTO_UDP && w[13] != 0) {
			u16 c = w[13];
			c = csum_replace32(c, qs, q[3]);
			c = csum_replace32(c, qd, q[4]);
			c = csum_replace16(c, osp, w[10]);
			c = csum_replace16(c, odp, w[11]);
			w[13] = c ? c : 0xffff;
		}
		if (bpf_skb_store_bytes(skb, quote_off, q, NM_QUOTE4, 0) < 0)
			return -1;
		s64 diff = bpf_csum_diff(old, NM_QUOTE4, q, NM_QUOTE4, 0);
		if (bpf_l4_csum_replace(skb, outer.csum_off, 0, diff, 0) < 0)
			return -1;
		if (rewrite_addr(skb, &outer, NM_IP4_SRC_OFF, outer_src, new_src) < 0 ||
		    rewrite_addr(skb, &outer, NM_IP4_DST_OFF, outer_dst, new_dst) < 0)
			return -1;
		return 0;
	}
	if (bpf_skb_load_bytes(skb, quote_off, q, NM_QUOTE6) < 0)
		return -1;
	__builtin_memcpy(old, q, NM_QUOTE6);
	u16 *w = (u16 *)q;
	/* quoted src at words 2..5, dst at 6..9, ports at u16 20 and 21, UDP checksum at 23 */
	u16 c = w[23];
	int fix_udp = p->t.proto == IPPROTO_UDP;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (fix_udp) {
			c = csum_replace32(c, q[2 + i], v->nat_dst[i]);
			c = csum_replace32(c, q[6 + i], v->nat_src[i]);
		}
		q[2 + i] = v->nat_dst[i];
		q[6 + i] = v->nat_src[i];
	}
	if (fix_udp) {
		c = csum_replace16(c, w[20], v->nat_dport);
		c = csum_replace16(c, w[21], v->nat_sport);
		w[23] = c ? c : 0xffff;
	}
	w[20] = v->nat_dport;
	w[21] = v->nat_sport;
	if (bpf_skb_store_bytes(skb, quote_off, q, NM_QUOTE6, 0) < 0)
		return -1;
	s64 diff = bpf_csum_diff(old, NM_QUOTE6, q, NM_QUOTE6, 0);
	if (bpf_l4_csum_replace(skb, outer.csum_off, 0, diff, 0) < 0)
		return -1;
	if (rewrite_addr(skb, &outer, NM_IP6_SRC_OFF, outer_src, new_src) < 0 ||
	    rewrite_addr(skb, &outer, NM_IP6_DST_OFF, outer_dst, new_dst) < 0)
		return -1;
	return 0;
}

#endif /* NM_LIB_NAT_H */
