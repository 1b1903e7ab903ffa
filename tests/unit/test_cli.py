"""The CLI without a kernel: `check`, and what status says when no agent runs."""
import json

from helpers import cli


def test_check_accepts_a_good_file_and_exits_zero(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("services: [{name: a, vip: 10.96.0.1, ports: [{port: 80}], "
                 "backends: [{address: 10.0.0.1}]}]\n")
    res = cli("check", "--config", str(f))
    assert res.returncode == 0, res.stderr
    assert "valid (1 services, 1 frontends)" in res.stdout


def test_check_names_file_line_field_and_problem_and_exits_one(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("services:\n  - name: a\n    vip: 10.96.0.1\n    ports:\n"
                 "      - {port: 70000}\n")
    res = cli("check", "--config", str(f))
    assert res.returncode == 1
    assert f"{f}:5: services[0].ports[0].port: 70000 is not a port (1-65535)" in res.stderr


def test_check_json_lists_problems_for_machines(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("services: [{name: a, vip: x, ports: [{port: 80}]}]\n")
    res = cli("check", "--config", str(f), "-o", "json")
    out = json.loads(res.stdout)
    assert res.returncode == 1 and out["valid"] is False
    assert out["problems"][0]["path"] == "services[0].vip"


def test_status_without_an_agent_says_so_plainly(tmp_path):
    res = cli("status", "--admin-socket", str(tmp_path / "none.sock"))
    assert res.returncode == 1
    assert "no agent is running" in res.stderr and "Traceback" not in res.stderr


def test_options_read_the_environment(monkeypatch):
    from nodemesh.cli import build_parser

    monkeypatch.setenv("NODEMESH_METRICS_ADDR", "0.0.0.0:9999")
    monkeypatch.setenv("NODEMESH_BPFFS", "/sys/fs/bpf/x")
    args = build_parser().parse_args(["run", "--config", "c.yaml"])
    assert args.metrics_addr == "0.0.0.0:9999" and args.bpffs == "/sys/fs/bpf/x"
    args = build_parser().parse_args(["run", "--config", "c.yaml", "--bpffs", "/y"])
    assert args.bpffs == "/y"  # the flag wins


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`nodemesh check ... | head -1`: the reader leaves; no traceback, exit 141 (SIGPIPE)."""
    import subprocess
    import sys

    cfg = tmp_path / "svc.yaml"
    cfg.write_text("services:\n" + "".join(
        f"  - {{name: s{i}, vip: 10.96.0.{i}, ports: [{{port: 80}}], backends: []}}\n"
        for i in range(1, 200)))
    proc = subprocess.Popen([sys.executable, "-m", "nodemesh.cli", "check", "--config", str(cfg),
                             "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the writer writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=30) == 141 and "Traceback" not in err, err


def test_the_agents_log_records_skip_what_its_format_never_prints(monkeypatch):
    """A line a round: the caller's frame, thread and process are not looked up, and the
    line reads the same."""
    import logging

    from nodemesh import cli

    for name in ("logThreads", "logProcesses", "logMultiprocessing", "_srcfile"):
        monkeypatch.setattr(logging, name, getattr(logging, name))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("nodemesh.test-lean-records")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("reconciled: %d", 1)
        cli.lean_log_records()
        logger.warning("reconciled: %d", 1)
    finally:
        logger.removeHandler(handler)
    before, after = records
    assert before.thread is not None and before.pathname.endswith("test_cli.py")
    assert after.thread is None and after.process is None and after.processName is None
    assert after.pathname == "(unknown file)"
    formatter = logging.Formatter(cli.LOG_FORMAT)
    after.created, after.msecs = before.created, before.msecs
    assert formatter.format(after) == formatter.format(before)
