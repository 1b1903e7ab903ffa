"""The byte packers the reconciler uses produce exactly the ctypes mirrors' bytes."""
import ctypes

from nodemesh.datapath import maps as m


def test_svc_key_packer_matches_the_struct():
    family, words = m.encode_addr("fd00:96::10")
    k = m.SvcKey()
    k.addr[:] = words
    k.port, k.proto, k.family, k.slot = m.port_be(443), 17, family, 0x8003
    packed = m.pack_svc_key(m.key_prefix(family, words, 443, 17), 0x8003)
    assert packed == bytes(k) and len(packed) == ctypes.sizeof(m.SvcKey)


def test_value_packers_match_the_structs():
    v = m.SvcValue()
    v.svc_id, v.count, v.bank, v.algorithm, v.revision = 7, 300, 1, m.ALG_ROUND_ROBIN, 99
    assert m.pack_master_value(7, 300, 1, m.ALG_ROUND_ROBIN, 99) == bytes(v)
    s = m.SvcValue()
    s.backend_id = 123456
    assert m.pack_slot_value(123456) == bytes(s)


def test_backend_packer_matches_the_struct():
    family, words = m.encode_addr("10.1.2.3")
    e = m.BackendEntry()
    e.addr[:] = words
    e.port, e.proto, e.family, e.svc_id, e.state = m.port_be(8080), 6, family, 42, 0
    assert m.pack_backend("10.1.2.3", 8080, 6, 42, 0) == bytes(e)


def test_addresses_round_trip_in_network_byte_order():
    for addr in ("10.96.0.10", "255.1.2.3", "fd00::1", "2001:db8::ffff:1"):
        family, words = m.encode_addr(addr)
        assert m.decode_addr(family, words) == addr
    family, words = m.encode_addr("1.2.3.4")
    assert ctypes.c_uint32(words[0]).value.to_bytes(4, "little") == bytes([1, 2, 3, 4])
