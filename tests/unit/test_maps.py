"""The byte packers the reconciler uses produce exactly the ctypes mirrors' bytes."""
import ctypes

import pytest

from nodemesh.datapath import maps as m

# Every field gets a value no other field has, so a packer that swaps, drops or shifts a field
# produces other bytes. The IPv6 address sets all four address words.
ADDRESSES = ("fd00:96::10:2:3", "10.1.2.3")


def _filled(mirror, **values):
    obj = mirror()
    for name, value in values.items():
        if name == "addr":
            obj.addr[:] = value
        else:
            setattr(obj, name, value)
    return bytes(obj)


@pytest.mark.parametrize("address", ADDRESSES)
def test_svc_key_packers_match_the_struct(address):
    family, words = m.encode_addr(address)
    prefix = m.key_prefix(family, words, 443, 17)
    expected = _filled(m.SvcKey, addr=words, port=m.port_be(443), proto=17, family=family,
                       slot=0x8003)
    assert m.pack_svc_key(prefix, 0x8003) == expected
    assert prefix == expected[:m.SvcKey.slot.offset]


def test_master_value_packer_matches_the_struct():
    expected = _filled(m.SvcValue, svc_id=7, count=300, bank=1, algorithm=m.ALG_ROUND_ROBIN,
                       flags=m.SVC_F_AFFINITY, revision=99, affinity_timeout=10800)
    assert m.pack_master_value(7, 300, 1, m.ALG_ROUND_ROBIN, 99, m.SVC_F_AFFINITY,
                               10800) == expected


def test_slot_value_packer_matches_the_struct():
    assert m.pack_slot_value(123456) == _filled(m.SvcValue, backend_id=123456)


@pytest.mark.parametrize("address", ADDRESSES)
def test_backend_packer_matches_the_struct(address):
    family, words = m.encode_addr(address)
    expected = _filled(m.BackendEntry, addr=words, port=m.port_be(8080), proto=6, family=family,
                       svc_id=42, state=m.BACKEND_QUARANTINED)
    assert m.pack_backend(address, 8080, 6, 42, m.BACKEND_QUARANTINED) == expected


@pytest.mark.parametrize("address", ADDRESSES)
def test_endpoint_key_packer_matches_the_struct(address):
    family, words = m.encode_addr(address)
    expected = _filled(m.EndpointKey, addr=words, port=m.port_be(8080), family=family)
    assert m.pack_endpoint_key(address, 8080) == expected


def test_u32_packer_matches_the_map_key_type():
    assert m.pack_u32(0x01020304) == bytes(m.u32(0x01020304))


def test_generated_formats_follow_holes_arrays_and_trailing_padding():
    """A mirror with compiler-inserted holes and tail padding (none of today's structs has one,
    a future one may): the generated packer still lays each field at its ctypes offset."""

    class Holey(ctypes.Structure):
        _fields_ = [("a", m.u8), ("b", m.u32), ("c", m.u16 * 3), ("pad", m.u8), ("d", m.u64),
                    ("e", m.u8)]

    obj = Holey(a=0x11, b=0x22334455, d=0x66778899AABBCCDD, e=0xEE)
    obj.c[:] = (0x0102, 0x0304, 0x0506)
    packer = m._packer(Holey)
    assert packer.size == ctypes.sizeof(Holey)
    assert packer.pack(0x11, 0x22334455, 0x0102, 0x0304, 0x0506, 0x66778899AABBCCDD,
                       0xEE) == bytes(obj)
    # A slice of the fields, as key_prefix uses: from b up to (not including) pad.
    assert m._packer(Holey, "b", "pad").pack(0x22334455, 0x0102, 0x0304, 0x0506) == \
        bytes(obj)[Holey.b.offset:Holey.c.offset + Holey.c.size]

def test_addresses_round_trip_in_network_byte_order():
    for addr in ("10.96.0.10", "255.1.2.3", "fd00::1", "2001:db8::ffff:1"):
        family, words = m.encode_addr(addr)
        assert m.decode_addr(family, words) == addr
    family, words = m.encode_addr("1.2.3.4")
    assert (family, bytes((m.u32 * 4)(*words))) == (m.FAMILY_V4, bytes([1, 2, 3, 4] + [0] * 12))


@pytest.mark.parametrize("address", ADDRESSES)
def test_a_frontends_keys_packed_from_its_address_match_the_struct(address):
    # The reconciler packs a frontend's keys from its VIP string and cached slot tails; they
    # must be the bytes the field-by-field packers give, past the cached tails too (70 slots).
    family, words = m.encode_addr(address)
    prefix = m.address_key_prefix(address, 443, 17)
    assert prefix == m.key_prefix(family, words, 443, 17)
    assert m.pack_master_key(prefix) == m.pack_svc_key(prefix, 0)
    for bank in (0, 1):
        for count in (3, 70):
            assert m.pack_slot_keys(prefix, bank, count) == \
                [m.pack_svc_key(prefix, m.slot_number(bank, i)) for i in range(1, count + 1)]
    assert m.pack_slot_values([7, 123456]) == [m.pack_slot_value(7), m.pack_slot_value(123456)]


@pytest.mark.parametrize("count", [0, 1, 3, 64, 65, 12_288])
def test_joined_slot_values_are_each_slot_value_end_to_end_at_any_count(count):
    ids = [(i * 2_654_435_761) % 524_287 + 1 for i in range(count)]
    joined = m.pack_slot_values_joined(ids)
    assert joined == b"".join(m.pack_slot_value(i) for i in ids)
    assert [m.SvcValue.from_buffer_copy(joined, at).backend_id
            for at in range(0, len(joined), ctypes.sizeof(m.SvcValue))] == ids
