"""The Python mirrors of bpf/lib/flow.h match what BCC compiled: the flow event the datapath
hands to its ring buffer, field by field and type by type, and the verdict numbers. (The
observability maps' keys and values are checked with every other map in test_layout.py.)"""
import ctypes
import os
import shutil

import pytest

from nodemesh.datapath import bpfsys, loader
from nodemesh.datapath.compile import source_text
from nodemesh.datapath.observe import FLOW_RINGBUF, VERDICTS, FlowEvent

pytestmark = pytest.mark.root

BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_SOCKET_FILTER = 1

PROBE = """
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include "nodemesh.h"
#include "lib/flow.h"

/* Never loaded: BCC records the fields of what is handed to ringbuf_output as it compiles. */
BPF_RINGBUF_OUTPUT(nm_flow_event_fields, 1);
int nm_submit_flow_event(struct __sk_buff *skb)
{
	struct nm_flow_event ev = {};
	nm_flow_event_fields.ringbuf_output(&ev, sizeof(ev), 0);
	return 0;
}

BPF_ARRAY(nm_flow_event_layout, struct nm_flow_event, 1);
BPF_ARRAY(nm_verdicts, u64, 5);
int nm_store_verdicts(struct __sk_buff *skb)
{
	u32 i;
	u64 v;
	i = 0; v = NM_FLOW_TRANSLATED; nm_verdicts.update(&i, &v);
	i = 1; v = NM_FLOW_NO_BACKEND; nm_verdicts.update(&i, &v);
	i = 2; v = NM_FLOW_PROXY_REDIRECT; nm_verdicts.update(&i, &v);
	i = 3; v = NM_FLOW_DENIED; nm_verdicts.update(&i, &v);
	i = 4; v = NM_FLOW_DROPPED; nm_verdicts.update(&i, &v);
	return 0;
}
"""


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32)]


def _ringbuf_fields(bpf, name: bytes):
    from bcc import lib

    return [lib.bpf_perf_event_field(bpf.module, name, i).decode()
            for i in range(lib.bpf_perf_event_fields(bpf.module, name))]


def _layout(t):
    return ctypes.sizeof(t), [(name, getattr(t, name).offset, getattr(t, name).size)
                              for name, *_ in t._fields_ if not name.startswith("__pad_")]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from bcc import BPF

    src = loader.bpf_source_dir()
    probe_c = tmp_path_factory.mktemp("probe") / "probe.c"
    probe_c.write_text(PROBE)
    text = source_text(probe_c, root=src)  # lib/ headers inline, as the loader compiles them
    pins = f"/sys/fs/bpf/nmt-obsprobe-{os.getpid()}"  # flow.h's pinned maps land here
    os.makedirs(pins, mode=0o700, exist_ok=True)
    try:
        bpf = BPF(text=text.encode(), cflags=[f"-I{src}", f'-DNM_PIN_DIR="{pins}"'])
    except Exception:
        shutil.rmtree(pins, ignore_errors=True)
        raise
    try:
        fn = bpf.load_func(b"nm_store_verdicts", BPF_PROG_TYPE_SOCKET_FILTER)
        packet = ctypes.create_string_buffer(64)  # a socket filter's test run wants a frame
        bpfsys.bpf(BPF_PROG_TEST_RUN, _TestRunAttr(prog_fd=fn.fd, data_size_in=64,
                                                   data_in=ctypes.addressof(packet), repeat=1))
        table = bpf[b"nm_verdicts"]
        yield bpf, [table[ctypes.c_uint32(i)].value for i in range(5)]
    finally:
        bpf.cleanup()
        shutil.rmtree(pins, ignore_errors=True)


@pytest.fixture(scope="module")
def compiled():
    bpffs = f"/sys/fs/bpf/nmt-obslayout-{os.getpid()}"
    dp = loader.Datapath(bpffs, None)
    try:
        dp.load(in_process=True)
        yield dp
    finally:
        dp.close()
        loader.cleanup(bpffs)


def test_flow_event_mirror_matches_the_header_struct(probe):
    bpf, _ = probe
    assert _layout(FlowEvent) == _layout(bpf[b"nm_flow_event_layout"].Leaf)


def test_the_datapath_sends_flow_events_of_that_struct_on_its_ring_buffer(compiled, probe):
    sent = _ringbuf_fields(compiled.bpf, FLOW_RINGBUF.encode())
    assert sent == _ringbuf_fields(probe[0], b"nm_flow_event_fields")
    assert [f.split("#")[0] for f in sent] == [name for name, _ in FlowEvent._fields_]


def test_verdict_numbers_are_the_headers(probe):
    _, values = probe
    assert {VERDICTS[v] for v in values} == set(VERDICTS.values())
    assert values == sorted(VERDICTS)
    assert [VERDICTS[v] for v in values] == ["translated", "no_backend", "proxy_redirect",
                                             "denied", "dropped"]
