"""The Python mirrors of bpf/nodemesh.h match what BCC compiled, field by field."""
import ctypes

import pytest

from nodemesh.datapath import loader
from nodemesh.datapath import maps as m

pytestmark = pytest.mark.root


def _layout(t):
    if not hasattr(t, "_fields_"):
        return ctypes.sizeof(t)
    return ctypes.sizeof(t), [(name, getattr(t, name).offset, getattr(t, name).size)
                              for name, *_ in t._fields_]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    import os

    bpffs = f"/sys/fs/bpf/nmt-layout-{os.getpid()}"
    dp = loader.Datapath(bpffs, None)
    dp.load(in_process=True)
    try:
        yield dp
    finally:
        dp.close()
        loader.cleanup(bpffs)


@pytest.mark.parametrize("spec", m.MAPS, ids=lambda s: s.name)
def test_python_mirror_matches_bcc_generated_types(compiled, spec):
    table = compiled.bpf[spec.name.encode()]
    assert _layout(spec.key) == _layout(table.Key)
    leaf = table.Leaf
    if spec.percpu:  # BCC types a per-CPU leaf as an array of the value, one per CPU
        leaf = leaf._type_
    assert _layout(spec.value) == _layout(leaf)


@pytest.mark.parametrize("spec", m.MAPS, ids=lambda s: s.name)
def test_pinned_map_has_the_type_and_capacity_the_loader_expects(compiled, spec):
    from nodemesh.datapath import bpfsys

    info = bpfsys.map_info(compiled.maps.fd(spec.name))
    assert (info.type, info.key_size, info.value_size, info.max_entries) == (
        spec.map_type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value),
        compiled.sizes.capacity(spec))


def test_pins_live_in_a_folder_only_root_can_enter(compiled):
    import os
    import stat

    assert stat.S_IMODE(os.stat(compiled.bpffs).st_mode) == 0o700
