"""The agent's start: the datapath compile (a child process) starts before the source is
built, so that clang works on one CPU while the agent imports and configures its source on
the other; and a start that ends before the load ends the compile with it."""
import os
import uuid

import pytest

from nodemesh import daemon
from nodemesh.datapath import loader


class _RecordingDatapath:
    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def start_load(self):
        self.calls.append("compile started")

    def abandon_load(self):
        self.calls.append("compile abandoned")

    def close(self):
        self.calls.append("datapath closed")


@pytest.fixture
def recorded(monkeypatch):
    from nodemesh import preflight

    calls: list = []
    _RecordingDatapath.calls = calls
    monkeypatch.setattr(preflight, "_bpf_syscall", lambda: preflight.Check("bpf", True, ""))
    monkeypatch.setattr(loader, "check_cgroup", lambda path: path)
    monkeypatch.setattr(loader, "Datapath", _RecordingDatapath)
    return calls


def test_the_compile_starts_before_the_source_is_built(recorded, monkeypatch):
    def make_source(self):
        recorded.append("source built")
        raise SystemExit("nodemesh run --source kubernetes: kubeconfig /nowhere: not found")

    monkeypatch.setattr(daemon.Agent, "_make_source", make_source)
    agent = daemon.Agent(daemon.Options(source="kubernetes", cgroup="/sys/fs/cgroup/x",
                                        metrics_addr="127.0.0.1:0"))
    with pytest.raises(SystemExit, match="kubeconfig /nowhere"):
        agent.run()
    # A bad kubeconfig still ends the start with its message, and the compile with it.
    assert recorded == ["compile started", "source built", "compile abandoned",
                        "datapath closed"]


@pytest.mark.root
def test_a_start_abandoned_while_compiling_leaves_no_compiler_and_no_folder():
    folder = f"/sys/fs/bpf/nm-abandon-{uuid.uuid4().hex[:8]}"
    datapath = loader.Datapath(folder)
    try:
        datapath.start_load()
        child = datapath._compiling
        datapath.abandon_load()
        datapath.close()
        assert child is not None and child._proc.returncode is not None  # reaped, not left
        assert not os.path.exists(folder)  # nothing pinned by the failed start
    finally:
        datapath.close()
        if os.path.isdir(folder):
            loader.cleanup(folder, force=True)
