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

    def __init__(self, bpffs, cgroup=None, *args, **kwargs):
        self.cgroup = cgroup

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


def test_nodemesh_run_starts_the_compile_before_it_imports_the_agent():
    """`nodemesh run` starts the compile (loader.start) before it imports nodemesh.daemon and
    what that brings (~0.1-0.2 s of the agent's CPU at start): the compile, on the critical
    path of every start, runs meanwhile. A fresh interpreter, so that nothing is imported yet;
    loader.start is replaced by one that says what was imported and ends the start."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from nodemesh import cli\n"
        "from nodemesh.datapath import loader\n"
        "def start(*args):\n"
        "    print('daemon imported' if 'nodemesh.daemon' in sys.modules else 'daemon not yet')\n"
        "    raise loader.DatapathError('stop here')\n"
        "loader.start = start\n"
        "sys.exit(cli.main(['run', '--source', 'kubernetes']))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(daemon.__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "daemon not yet", done.stderr
    assert done.returncode == 2 and "stop here" in done.stderr  # the same clear error


def test_a_start_that_fails_after_the_early_compile_ends_it(recorded, monkeypatch):
    """What fails between the compile's start and Agent.run (the agent's construction, its
    imports) ends the compile and gives the process's signal handlers back."""
    import signal

    from nodemesh import cli

    def broken_agent(*args):
        recorded.append("agent failed")
        raise SystemExit("nodemesh run: something is wrong")

    monkeypatch.setattr(cli, "_make_agent", broken_agent)
    # (the process-wide settings of a real start are not this test's)
    monkeypatch.setattr(cli, "lean_log_records", lambda: None)
    monkeypatch.setattr(daemon, "tune_allocator", lambda: False)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    args = cli.build_parser().parse_args(["run", "--cgroup", "/sys/fs/cgroup/x"])
    with pytest.raises(SystemExit, match="something is wrong"):
        cli.cmd_run(args)
    assert recorded == ["compile started", "agent failed", "compile abandoned",
                        "datapath closed"]
    assert {sig: signal.getsignal(sig) for sig in before} == before
