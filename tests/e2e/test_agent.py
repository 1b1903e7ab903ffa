"""The agent as users run it: a process with a config file, signals, metrics and the CLI,
serving real connections from a client netns in the lab's cgroup."""
import json
import os
import signal
import threading
import time

import pytest
from helpers import TIME_SCALE, bpftool_json, cli, config_yaml, service_yaml

pytestmark = pytest.mark.root


def web(lab, backends=None, weights=None, **kw):
    backends = lab.backends if backends is None else backends
    return service_yaml("web", lab.vip4(), [b.ipv4 for b in backends], weights=weights,
                        extra_ports="      - {port: 53, targetPort: 5353, protocol: UDP}", **kw)


def tcp(lab, count=60, **kw):
    args = ["tcp", "--target", f"{lab.vip4()}:80", "--count", str(count)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return lab.client(args)


class Load:
    """Connections to the VIP from the lab client, until stopped (bounded: 60 s x the time
    scale, and 100,000 connections)."""

    def __init__(self, lab, tmp_path, concurrency=4):
        self.stop_file = str(tmp_path / "stop-load")
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(lab, concurrency))

    def _run(self, lab, concurrency):
        self.result = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", "100000",
                                  "--concurrency", str(concurrency), "--stop-file",
                                  self.stop_file, "--max-seconds", str(60 * TIME_SCALE)],
                                 timeout=90 * TIME_SCALE)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        open(self.stop_file, "w").close()
        self.thread.join(timeout=90 * TIME_SCALE)


def test_agent_balances_and_reports_through_metrics_and_cli(lab, agent):
    agent.write_config(config_yaml(web(lab, weights=[1, 1, 2])))
    agent.start()
    r = tcp(lab, count=200)
    assert r["ok"] == 200
    m = agent.metrics()
    key = ("nodemesh_service_connections_total",
           (("namespace", "test"), ("port", "80"), ("protocol", "TCP"), ("service", "web")))
    assert m[key] == 200
    per_backend = {dict(k[1])["backend"]: v for k, v in m.items()
                   if k[0] == "nodemesh_backend_connections_total" and
                   dict(k[1])["backend"].endswith(":8080")}
    assert sum(per_backend.values()) == 200
    assert per_backend[f"{lab.backends[0].ipv4}:8080"] == r["backends"]["b1"]
    assert m[("nodemesh_services", ())] == 1
    assert m[("nodemesh_backend_healthy", (("backend", f"{lab.backends[2].ipv4}:8080"),
                                           ("namespace", "test"), ("service", "web")))] == 1
    assert m[("nodemesh_bpf_map_entries", (("map", "services"),))] == 2 + 4 + 4  # 2 masters + 4 slots (1:1:2) per frontend
    assert m[("nodemesh_bpf_map_capacity", (("map", "services"),))] > 0
    assert any(k[0] == "nodemesh_build_info" for k in m)

    st = cli("status", "--admin-socket", lab.admin_socket, "-o", "json", check=True)
    status = json.loads(st.stdout)
    assert status["ready"] and status["services"] == 1 and status["frontends"] == 2
    assert {h["hook"] for h in status["datapath"]["hooks"]} >= {"connect4", "recvmsg6"}
    table = cli("services", "--admin-socket", lab.admin_socket, check=True).stdout
    assert "test/web" in table and f"{lab.vip4()}:80/TCP" in table
    assert cli("status", "--admin-socket", lab.admin_socket, check=True).stdout.count("ready")
    assert oct(os.stat(lab.admin_socket).st_mode & 0o777) == "0o600"


def _wait_backends(lab, agent, want, timeout=1.0):
    """Seconds until connections reach exactly the `want` backends, or fail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout + 2:
        r = tcp(lab, count=30)
        if set(r["backends"]) == set(want):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"backends {r['backends']} never became {want}")


def test_config_file_changes_are_applied_within_a_second(lab, agent):
    agent.write_config(config_yaml(web(lab, backends=lab.backends[:1])))
    agent.start()
    assert set(tcp(lab)["backends"]) == {"b1"}
    t0 = time.monotonic()
    agent.write_config(config_yaml(web(lab, backends=lab.backends[1:])))
    _wait_backends(lab, agent, {"b2", "b3"})
    assert time.monotonic() - t0 < 1.5  # 0.25 s poll + apply; the client round adds a bit


def test_sighup_rereads_the_config(lab, agent):
    agent.write_config(config_yaml(web(lab, backends=lab.backends[:1])))
    agent.start()
    loads = agent.status()["source"]["loads"]
    agent.send(signal.SIGHUP)
    agent.wait_for(lambda: agent.status()["source"]["loads"] > loads, what="a reload")


def test_a_bad_config_is_rejected_counted_and_the_old_state_keeps_serving(lab, agent):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    agent.write_config(config_yaml(web(lab)).replace("port: 80,", "port: 70000,"))
    agent.wait_for(lambda: agent.metric("nodemesh_config_reload_failures_total",
                                        source="file") == 1, what="the failure counter")
    status = agent.status()
    assert status["source"]["ok"] is False
    assert "services[0].ports[0].port: 70000 is not a port (1-65535)" in status["source"]["error"]
    assert "70000 is not a port" in agent.log_text()
    r = tcp(lab, count=60)
    assert r["ok"] == 60 and set(r["backends"]) == {"b1", "b2", "b3"}
    # and the next good config is applied
    agent.write_config(config_yaml(web(lab, backends=lab.backends[:1])))
    _wait_backends(lab, agent, {"b1"})
    assert agent.status()["source"]["ok"] is True


def test_changing_the_backend_set_under_load_fails_no_connection(lab, agent, tmp_path):
    b1, b2, b3 = lab.backends
    agent.write_config(config_yaml(web(lab, backends=[b1, b2])))
    agent.start()
    steps = [[b1, b2, b3], [b3], [b2, b3], [b1], [b1, b2, b3]]
    with Load(lab, tmp_path) as load:
        for i, backends in enumerate(steps * 2):
            weights = [1 + (i + j) % 3 for j in range(len(backends))]
            agent.write_config(config_yaml(web(lab, backends=backends, weights=weights)))
            time.sleep(0.6)
    r = load.result
    assert r["ok"] > 500, r
    assert r["failed"] == 0, r
    assert set(r["backends"]) == {"b1", "b2", "b3"}


@pytest.mark.slow
def test_sigkill_under_load_fails_no_connection_and_the_next_agent_adopts_the_pins(
        lab, agent, tmp_path):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    before = {h["hook"]: h for h in agent.status()["datapath"]["hooks"]}
    with Load(lab, tmp_path) as load:
        agent.stop(signal.SIGKILL)
        time.sleep(1.0)  # no agent at all: the kernel keeps balancing
        agent.start()
    r = load.result
    assert r["failed"] == 0 and r["ok"] > 200, r
    assert set(r["backends"]) == {"b1", "b2", "b3"}
    st = agent.status()
    assert st["datapath"]["adopted_pins"] is True
    assert st["last_apply"]["writes"] == 0 and st["last_apply"]["unchanged"] == 2
    after = {h["hook"]: h for h in st["datapath"]["hooks"]}
    for hook, h in after.items():
        assert h["link_id"] == before[hook]["link_id"]    # the same link ...
        assert h["prog_id"] != before[hook]["prog_id"]    # ... with the new program swapped in


def test_sigterm_stops_the_agent_and_leaves_the_datapath_serving(lab, agent):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    assert agent.stop(signal.SIGTERM) == 0
    r = tcp(lab, count=60)
    assert r["ok"] == 60 and len(r["backends"]) == 3


def _our_programs(lab):
    cg = bpftool_json("cgroup", "show", lab.cgroup) or []
    return cg


def test_cleanup_detaches_everything_and_removes_every_pin_idempotently(lab, agent):
    agent.write_config(config_yaml(web(lab)))
    agent.start()
    prog_ids = {h["prog_id"] for h in agent.status()["datapath"]["hooks"]}
    assert len(_our_programs(lab)) == 10  # 8 sock_addr hooks, sockops and getsockopt
    agent.stop()
    res = cli("cleanup", "--bpffs", lab.bpffs, check=True)
    assert "detached connect4" in res.stdout
    assert _our_programs(lab) == []
    assert not os.path.exists(lab.bpffs)
    live = {p["id"] for p in bpftool_json("prog", "show") or []}
    assert not prog_ids & live  # the programs are gone from the kernel, not just detached
    again = cli("cleanup", "--bpffs", lab.bpffs, check=True)
    assert "nothing to clean" in again.stdout
    r = tcp(lab, count=3)
    assert r["ok"] == 0  # the VIP is blackholed in the lab: untranslated, nothing gets out


def test_an_invalid_first_config_exits_with_the_problem_and_changes_nothing(lab, agent):
    agent.write_config("services:\n  - name: web\n    vip: 10.96.0.1\n    ports: []\n")
    agent.start(wait=False)
    assert agent.proc.wait(timeout=60) == 1
    assert "services[0].ports: must be a non-empty list of ports" in agent.log_text()
    assert _our_programs(lab) == []


def test_run_says_plainly_what_is_wrong_instead_of_a_traceback(lab, tmp_path):
    import socket
    import subprocess

    from helpers import ROOT

    cfg = tmp_path / "ok.yaml"
    cfg.write_text("services: []\n")
    cfg.chmod(0o644)
    tmp_path.chmod(0o755)
    base = ["run", "--config", str(cfg), "--bpffs", lab.bpffs, "--admin-socket",
            str(tmp_path / "a.sock")]
    res = cli(*base, "--cgroup", "/tmp", "--metrics-addr", "127.0.0.1:0")
    assert res.returncode == 2 and "--cgroup /tmp: not inside a cgroup v2 mount" in res.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli(*base, "--cgroup", lab.cgroup, "--metrics-addr", f"127.0.0.1:{port}")
    assert res.returncode == 2 and "Address already in use" in res.stderr
    res = subprocess.run(["su", "nobody", "-s", "/bin/sh", "-c",
                          f"{ROOT}/.venv/bin/nodemesh " + " ".join(base) +
                          f" --cgroup {lab.cgroup} --metrics-addr 127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "BPF is not usable: permission denied" in res.stderr
    for r in (res,):
        assert "Traceback" not in r.stderr
    assert not os.path.exists(lab.bpffs)  # nothing was pinned by the failed starts
