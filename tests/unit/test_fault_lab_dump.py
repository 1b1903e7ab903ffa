"""The fault tests' map checker must be able to fail: each kind of stale entry it exists to
catch, planted in an otherwise whole dump, is named."""
from fault_lab import MapDump

from nodemesh.datapath import maps

WEB = b"w" * 20  # a frontend's key prefix


def whole():
    # One frontend (svc_id 7) in bank 1 with two slots, backends 1 and 2, counters of both.
    return MapDump(masters={WEB: (7, 2, 1)},
                   slots={WEB: {maps.slot_number(1, 1): 1, maps.slot_number(1, 2): 2}},
                   backends={1: 7, 2: 7}, svc_stats={7}, backend_stats={1, 2},
                   revnat_svc_ids=[7, 7], affinity=[(7, 1)])


def test_a_whole_dump_has_nothing_stale():
    assert whole().stale() == []


def test_every_kind_of_stale_entry_is_named():
    cases = {
        "slots of a frontend with no master": lambda d: d.slots.update({b"x" * 20: {1: 1}}),
        "but the master says bank 1 x 2": lambda d: d.slots[WEB].update(
            {maps.slot_number(0, 1): 1}),  # the old bank left behind
        "is in no slot": lambda d: d.backends.update({3: 7}),
        "which does not exist": lambda d: d.backends.pop(2),
        "svc_stats 9 of no frontend": lambda d: d.svc_stats.add(9),
        "backend_stats 5 of no backend": lambda d: d.backend_stats.add(5),
        "revnat entry for frontend 9": lambda d: d.revnat_svc_ids.append(9),
        "affinity entry for frontend 9": lambda d: d.affinity.append((9, 1)),
        "count 2 but no slot": lambda d: d.slots.pop(WEB) and d.backends.clear(),
    }
    for expected, plant in cases.items():
        d = whole()
        plant(d)
        assert any(expected in p for p in d.stale()), (expected, d.stale())
