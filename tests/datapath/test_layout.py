"""The Python mirrors of bpf/nodemesh.h match what BCC compiled, field by field: every map's key
and value, the ring-buffer event, and every constant the header shares with the agent."""
import contextlib
import ctypes
import re
from typing import List

import pytest

from nodemesh.datapath import bpfsys, loader
from nodemesh.datapath import maps as m

pytestmark = pytest.mark.root

INCLUDE_GUARD = "NODEMESH_H"
BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_SOCKET_FILTER = 1


def _layout(t):
    """sizeof and each named field's (name, offset, size). BCC names the holes the compiler
    leaves (__pad_N) where ctypes leaves them implicit; sizeof and the offsets cover them."""
    if not hasattr(t, "_fields_"):
        return ctypes.sizeof(t)
    return ctypes.sizeof(t), [(name, getattr(t, name).offset, getattr(t, name).size)
                              for name, *_ in t._fields_ if not name.startswith("__pad_")]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import os

    bpffs = f"/sys/fs/bpf/nmt-layout-{os.getpid()}"
    dp = loader.Datapath(bpffs, None)
    try:  # a failed compile has already made the pin folder
        dp.load(in_process=True)
        yield dp
    finally:
        dp.close()
        loader.cleanup(bpffs)


# BCC's Python has no Table class for sk_storage; its value size is checked against the pin below.
@pytest.mark.parametrize("spec", [s for s in m.MAPS if s.map_type != bpfsys.MAP_TYPE_SK_STORAGE],
                         ids=lambda s: s.name)
def test_python_mirror_matches_bcc_generated_types(compiled, spec):
    if spec.map_type == bpfsys.MAP_TYPE_SOCKHASH:
        pytest.skip("BCC's Python has no table class for a sockhash; its key is checked in "
                    "tests/datapath/test_mesh_layout.py")
    table = compiled.bpf[spec.name.encode()]
    assert _layout(spec.key) == _layout(table.Key)
    leaf = table.Leaf
    if spec.percpu:  # BCC types a per-CPU leaf as an array of the value, one per CPU
        leaf = leaf._type_
    assert _layout(spec.value) == _layout(leaf)


@pytest.mark.parametrize("spec", m.MAPS, ids=lambda s: s.name)
def test_pinned_map_has_the_type_and_capacity_the_loader_expects(compiled, spec):
    info = bpfsys.map_info(compiled.maps.fd(spec.name))
    assert (info.type, info.key_size, info.value_size, info.max_entries) == (
        spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
        compiled.sizes.capacity(spec))


def test_pins_live_in_a_folder_only_root_can_enter(compiled):
    import os
    import stat

    assert stat.S_IMODE(os.stat(compiled.bpffs).st_mode) == 0o700


# -- the ring-buffer event and the constants: a probe program built from the header alone ----

def header_constant_names(text: str):
    """The header's object-like #defines and enum members, by name only: the compiler gives the
    values (so expressions, implicit enum values and macros built from macros all count as the
    datapath sees them), this only makes sure that a constant added to the header cannot go
    unmirrored."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
    names = re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(?![\w(])", text, flags=re.M)
    for body in re.findall(r"\benum\b[^{;]*\{(.*?)\}", text, flags=re.S):
        names += [re.match(r"\s*(\w+)", member).group(1)
                  for member in body.split(",") if member.strip()]
    return [n for n in dict.fromkeys(names) if n != INCLUDE_GUARD]


def python_constants():
    """Every constant the agent shares with the header, under its C name."""
    out = {
        "NM_ABI_VERSION": m.ABI_VERSION,
        "NM_FAMILY_V4": m.FAMILY_V4,
        "NM_FAMILY_V6": m.FAMILY_V6,
        "NM_SLOT_BANK_SHIFT": m.SLOT_BANK_SHIFT,
        "NM_SLOT_INDEX_MASK": m.SLOT_INDEX_MASK,
        "NM_SVC_F_AFFINITY": m.SVC_F_AFFINITY,
        "NM_SVC_F_EXT_LOCAL": m.SVC_F_EXT_LOCAL,
        "NM_SVC_F_PROXY_OFF": m.SVC_F_PROXY_OFF,
        "NM_BACKEND_ACTIVE": m.BACKEND_ACTIVE,
        "NM_BACKEND_TERMINATING": m.BACKEND_TERMINATING,
        "NM_BACKEND_QUARANTINED": m.BACKEND_QUARANTINED,
        "NM_CTR_MAX": m.COUNTER_SLOTS,
    }
    out.update({f"NM_ALG_{name.upper()}": i for name, i in m.ALGORITHM_IDS.items()})
    out.update({f"NM_CTR_{name.upper()}": i for i, name in m.COUNTER_NAMES.items()})
    # The loader always passes the sizes as -D flags; the header's defaults document them and
    # must not drift from MapSizes' defaults.
    sizes = m.MapSizes()
    out.update({s.size_setting: sizes.setting(s.size_setting) for s in m.MAPS if s.size_setting})
    return out


class _TestRunAttr(ctypes.Structure):  # union bpf_attr, BPF_PROG_TEST_RUN
    _fields_ = [("prog_fd", m.u32), ("retval", m.u32), ("data_size_in", m.u32),
                ("data_size_out", m.u32), ("data_in", m.u64), ("data_out", m.u64),
                ("repeat", m.u32), ("duration", m.u32)]


PROBE = """
#include "nodemesh.h"

BPF_ARRAY(nm_failure_event_layout, struct nm_failure_event, 1);

/* Never loaded: BCC records the fields of what is handed to ringbuf_output as it compiles. */
BPF_RINGBUF_OUTPUT(nm_failure_event_fields, 1);
int nm_submit_failure_event(struct __sk_buff *skb)
{
	struct nm_failure_event ev = {};
	nm_failure_event_fields.ringbuf_output(&ev, sizeof(ev), 0);
	return 0;
}
"""


# Appended to a program's own text by compiled_constants: stores constant i in slot i.
CONSTANTS_PROBE = """
BPF_ARRAY(nm_constants, u64, %(count)d);
int nm_store_constants(struct __sk_buff *skb)
{
	u32 i;
	u64 v;
%(stores)s
	return 0;
}
"""


@contextlib.contextmanager
def compiled_constants(text: str, names: List[str]):
    """(the BCC object, {name: value as compiled}) for `text` (which includes the headers,
    without the loader's -D size flags) followed by a program that stores each named
    constant in a map, run once."""
    from bcc import BPF

    src = loader.bpf_source_dir()
    stores = "\n".join(f"\ti = {i}; v = (u64)({name}); nm_constants.update(&i, &v);"
                       for i, name in enumerate(names))
    probe = CONSTANTS_PROBE % {"count": len(names), "stores": stores}
    bpf = BPF(text=(text + probe).encode(), cflags=[f"-I{src}", '-DNM_PIN_DIR="/nonexistent"'])
    try:
        fn = bpf.load_func(b"nm_store_constants", BPF_PROG_TYPE_SOCKET_FILTER)
        packet = ctypes.create_string_buffer(64)  # a socket filter's test run wants a frame
        bpfsys.bpf(BPF_PROG_TEST_RUN, _TestRunAttr(prog_fd=fn.fd, data_size_in=64,
                                                   data_in=ctypes.addressof(packet), repeat=1))
        table = bpf[b"nm_constants"]
        yield bpf, {name: table[ctypes.c_uint32(i)].value for i, name in enumerate(names)}
    finally:
        bpf.cleanup()


@pytest.fixture(scope="module")
def probe():
    """(the BCC object, {name: value as compiled}) for a program that includes only
    nodemesh.h and stores each constant the header defines in a map."""
    names = header_constant_names((loader.bpf_source_dir() / "nodemesh.h").read_text())
    with compiled_constants(PROBE, names) as result:
        yield result


def test_header_constant_names_finds_defines_and_enum_members():
    """The name scan the constants test relies on: a constant it missed would go unchecked."""
    text = """#ifndef NODEMESH_H
#define NODEMESH_H
#define NM_A 1 /* #define NM_COMMENTED 2 */
  #  define NM_B (NM_A << 3)
#define NM_FN(x) ((x) + 1)
// #define NM_LINE_COMMENT 3
enum nm_e {
	NM_E0,           /* implicit */
	NM_E1 = 5,
};
#endif"""
    assert header_constant_names(text) == ["NM_A", "NM_B", "NM_E0", "NM_E1"]


def test_every_shared_constant_has_the_value_the_compiler_gives_it(probe):
    _bpf, compiled_constants = probe
    assert python_constants() == compiled_constants


def test_failure_event_mirror_matches_the_header_struct(probe):
    bpf, _ = probe
    assert _layout(m.FailureEvent) == _layout(bpf[b"nm_failure_event_layout"].Leaf)


def _ringbuf_fields(bpf, name: bytes):
    from bcc import lib

    return [lib.bpf_perf_event_field(bpf.module, name, i).decode()
            for i in range(lib.bpf_perf_event_fields(bpf.module, name))]


def test_the_datapath_sends_a_failure_event_on_its_ring_buffer(compiled, probe):
    """What sock_lb.c hands to failure_events has the fields and C types of struct
    nm_failure_event, so the agent may read each record as a FailureEvent."""
    from nodemesh.datapath.compile import RINGBUF

    sent = _ringbuf_fields(compiled.bpf, RINGBUF.encode())
    assert sent == _ringbuf_fields(probe[0], b"nm_failure_event_fields")
    assert [f.split("#")[0] for f in sent] == [name for name, _ in m.FailureEvent._fields_]
