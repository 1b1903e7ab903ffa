"""The servers and clients of bench/run.py's workloads, each a real Debian tool.

Servers, all in the lab's backend netns b1 (no route off the machine), answering on every
endpoint address of both endpoint sets (a change moves the measured service between them):
  nginx    :8080  1 worker, answers `$server_addr` (the probe of a change reads it), keep-alive
                  without a request limit (nginx closes a connection after 1,000 by default)
  dnsmasq  :5353  UDP, answers `bench.test A` itself (--address), no upstream, no cache misses
  iperf3   :5201  the wildcard address of b1 (iperf3 matches its data connections to the test
                  by a cookie, so a service that spreads them over the three addresses works)

Clients (each in the variant's client netns, inside the hooked cgroup for nodemesh):
  conn         wrk -t1 -c32 -H "Connection: close": one new TCP connection per request
  ka-max       wrk -t1 -c32, keep-alive: the most requests/s over 32 held connections
  ka-paced     wrk -t1 -c32 -s bench/pace.lua -- RATE: a fixed request rate (see pace.lua for
               its limits), p50/p99/max of the response times
  udp-max      dnsperf -c1 -T1 -q64: queries/s, queries lost
  udp-paced    the same with -Q RATE: mean and max latency (dnsperf 2.10 has no percentiles)
  bulk1/bulk8  iperf3 -P1 / -P8, client -> server: received Gbit/s
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
PACE_LUA = os.path.join(HERE, "pace.lua")
HTTP_PORT, DNS_PORT, IPERF_PORT = 8080, 5353, 5201
DNS_NAME = "bench.test"
CONNECTIONS = 32  # wrk's connections in every HTTP workload
# CPU placement (run.py --cpus): role -> taskset CPU list. Every client tool (and haproxy, the
# client node's proxy) runs on the "client" CPU, every server on the "server" CPU, the same for
# every variant; empty: the scheduler places them (and moves them between runs).
CPUS: Dict[str, str] = {}


def pinned(role: str) -> List[str]:
    """The taskset prefix that puts a process of `role` on its CPU (none if unpinned)."""
    cpu = CPUS.get(role)
    return ["taskset", "-c", cpu] if cpu else []


@dataclass
class Client:
    """Where and how a variant's client runs."""
    lab: object              # nodemesh.lab.topology.Lab
    netns: str
    cgroup: Optional[str]    # the hooked cgroup it runs in (nodemesh's variants), or None
    host: str
    port: int


def spawn(lab, argv: Sequence[str], netns: str, cgroup: Optional[str], role: str = "client",
          **popen) -> subprocess.Popen:
    """Lab.spawn into any cgroup (a variant may have its own): the shell joins the cgroup
    before exec, so every socket the program makes is hooked. The lab kills it at teardown."""
    argv = [*pinned(role), *argv]
    cmd = f"exec ip netns exec {shlex.quote(netns)} " + " ".join(shlex.quote(a) for a in argv)
    if cgroup:
        cmd = f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && {cmd}"
    proc = subprocess.Popen(["sh", "-c", cmd], start_new_session=True, **popen)
    lab.processes.append(proc)
    return proc


def run(c: Client, argv: Sequence[str], timeout: float) -> str:
    proc = spawn(c.lab, argv, c.netns, c.cgroup, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        c.lab.processes.remove(proc)  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {(out + err).strip()[-400:]}")
    return out + err


# -- servers ----------------------------------------------------------------------------------
def start_servers(lab, netns: str, addresses: Sequence[str], workdir: str,
                  cgroup: Optional[str] = None) -> None:
    """nginx, dnsmasq and iperf3 in `netns`, on every address (already on its eth0), and in
    `cgroup` if given (nodemesh+sockmap's backends run in its hooked cgroup)."""
    tmp = os.path.join(workdir, "nginx")
    os.makedirs(tmp, exist_ok=True)
    listens = "\n".join(f"    listen {a}:{HTTP_PORT} reuseport backlog=4096;" for a in addresses)
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
worker_processes 1;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
{listens}
    location / {{ return 200 "$server_addr\\n"; }}
  }}
}}
""")
    nginx = spawn(lab, ["nginx", "-c", conf, "-g", "daemon off;"], netns, cgroup, "server")
    spawn(lab, ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--pid-file=", "--log-facility=-", f"--port={DNS_PORT}",
                "--bind-interfaces", "--listen-address=" + ",".join(addresses),
                f"--address=/{DNS_NAME}/192.0.2.1"], netns, cgroup, "server",
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spawn(lab, ["iperf3", "--server", "--port", str(IPERF_PORT)], netns, cgroup, "server",
          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30  # nginx took over 10 s at a load average of 15
    while not os.path.exists(f"{tmp}/nginx.pid"):
        if nginx.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start ({tmp}/error.log)")
        time.sleep(0.05)
    want = {f"{a}:{p}" for a in addresses for p in (HTTP_PORT, DNS_PORT)} | \
        {f"*:{IPERF_PORT}", f"0.0.0.0:{IPERF_PORT}", f"[::]:{IPERF_PORT}"}
    while True:  # every socket bound before the first measurement
        out = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htuln"],
                             capture_output=True, text=True).stdout
        bound = {line.split()[4] for line in out.splitlines() if len(line.split()) > 4}
        missing = {w for w in want if w.split(":")[-1] != str(IPERF_PORT)} - bound
        iperf = any(b.endswith(f":{IPERF_PORT}") for b in bound)
        if not missing and iperf:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"servers in {netns} not listening on {sorted(missing)}"
                               f"{'' if iperf else ' and iperf3'}")
        time.sleep(0.05)


# -- clients ----------------------------------------------------------------------------------
def url(c: Client) -> str:
    return f"http://{c.host}:{c.port}/"


def _wrk_rate(out: str) -> tuple:
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    reqs = re.search(r"(\d+) requests in", out)
    if not m or not reqs:
        raise RuntimeError(f"wrk printed no rate: {out[-400:]}")
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    note = " ".join(x.group(0) for x in (errors, non2xx) if x)
    return float(m.group(1)), int(reqs.group(1)), note


def conn(c: Client, seconds: float) -> tuple:
    """(new connections/s, requests, wrk's error note)."""
    out = run(c, ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-H", "Connection: close",
                  url(c)], timeout=seconds + 30)
    return _wrk_rate(out)


def conn_side_by_side(a: Client, b: Client, seconds: float) -> tuple:
    """Two conn runs at once, half the connections each, both on the client CPU: ((rate,
    requests, note) of a, the same of b). The scheduler shares the CPUs between them and
    whatever else runs hits both alike in the same instant, so the ratio of their rates
    is that of what a connection costs each, steady where the machine's load is not."""
    argv = ["wrk", "-t1", f"-c{CONNECTIONS // 2}", f"-d{seconds}s", "-H", "Connection: close"]
    procs = [spawn(c.lab, [*argv, url(c)], c.netns, c.cgroup, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True) for c in (a, b)]
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=seconds + 30)
            if proc.returncode != 0:
                raise RuntimeError(f"wrk failed ({proc.returncode}): "
                                   f"{(out + err).strip()[-400:]}")
            outs.append(_wrk_rate(out + err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            a.lab.processes.remove(proc)  # type: ignore[attr-defined]
    return outs[0], outs[1]


def keepalive_max(c: Client, seconds: float) -> tuple:
    """(requests/s over 32 kept-alive connections, requests, error note)."""
    out = run(c, ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", url(c)],
              timeout=seconds + 30)
    return _wrk_rate(out)


@dataclass
class Paced:
    rate: float     # achieved requests/s
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


def parse_paced(out: str) -> Paced:
    m = re.search(r"NMPACE requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) "
                  r"max_us=(\d+) errors=(\d+)", out)
    if not m:
        raise RuntimeError(f"wrk with pace.lua printed no summary: {out[-400:]}")
    reqs, dur, p50, p99, mx, errors = (int(x) for x in m.groups())
    return Paced(reqs / (dur / 1e6), p50 / 1000, p99 / 1000, mx / 1000, errors)


def keepalive_paced(c: Client, seconds: float, rate: float) -> Paced:
    out = run(c, ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", PACE_LUA, url(c),
                  "--", f"{rate:.0f}"], timeout=seconds + 30)
    return parse_paced(out)


@dataclass
class Udp:
    qps: float
    mean_ms: float
    max_ms: float
    sent: int
    lost: int


def parse_dnsperf(out: str) -> Udp:
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min [\d.]+, max ([\d.]+)\)", out)
    sent = re.search(r"Queries sent:\s+(\d+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if not (qps and lat and sent and lost):
        raise RuntimeError(f"dnsperf printed no summary: {out[-400:]}")
    return Udp(float(qps.group(1)), float(lat.group(1)) * 1000, float(lat.group(2)) * 1000,
               int(sent.group(1)), int(lost.group(1)))


def udp(c: Client, seconds: float, queries: str, rate: Optional[float] = None) -> Udp:
    """dnsperf at its maximum (64 queries outstanding), or paced to `rate` queries/s (-Q):
    at the maximum the mean latency is mostly queueing (64 outstanding / the rate), so the
    latency worth comparing is the paced one."""
    pace = ["-Q", f"{rate:.0f}"] if rate else []
    out = run(c, ["dnsperf", "-s", c.host, "-p", str(c.port), "-d", queries, "-l",
                  str(seconds), "-c", "1", "-T", "1", "-q", "64", "-t", "1", *pace],
              timeout=seconds + 30)
    return parse_dnsperf(out)


def write_queries(path: str) -> str:
    with open(path, "w") as f:
        f.write(f"{DNS_NAME} A\n")
    return path


def parse_iperf3(out: str) -> float:
    """Received Gbit/s from `iperf3 -J`."""
    start = out.find("{")
    data = json.loads(out[start:]) if start >= 0 else {}
    if "error" in data or "end" not in data:
        raise RuntimeError(f"iperf3: {data.get('error', out[-300:])}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def bulk(c: Client, seconds: float, streams: int) -> float:
    """Gbit/s received by the server over `streams` parallel TCP connections. iperf3's server
    runs one test at a time: a 'busy' answer (the previous test still closing) is retried."""
    last: Optional[Exception] = None
    for _ in range(5):
        try:
            out = run(c, ["iperf3", "-c", c.host, "-p", str(c.port), "-t", str(seconds),
                          "-P", str(streams), "-J", "--connect-timeout", "2000"],
                      timeout=seconds + 30)
            return parse_iperf3(out)
        except RuntimeError as e:
            last = e
            if "busy" not in str(e):
                raise
            time.sleep(0.3)
    raise RuntimeError(f"iperf3 server stayed busy: {last}")


# -- what a run cost, and what else ran meanwhile -----------------------------------------------
# A connection rate on a shared 2-CPU machine moves with everyone's load; the CPU a connection
# costs hardly does. Around each conn run: the CPU time of the client tool (the bench's
# children reaped meanwhile: wrk) and of every process resident in the variant's netns (nginx,
# haproxy), each including the softirq work done in its context (this kernel has no
# IRQ_TIME_ACCOUNTING: a softirq's time goes to the task it interrupted, and veth's receive
# path runs in the sender's context); and the whole machine's busy and steal time
# (/proc/stat), whose excess over the bench's own is other work that shared the CPUs.
CLK_TCK = os.sysconf("SC_CLK_TCK")


def netns_pids(names: Sequence[str]) -> List[int]:
    """The processes whose network namespace is one of `names` (/run/netns/NAME)."""
    inodes = set()
    for name in names:
        try:
            inodes.add(os.stat(f"/run/netns/{name}").st_ino)
        except OSError:
            pass
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ns = os.readlink(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            if ns.startswith("net:[") and int(ns[5:-1]) in inodes:
                pids.append(int(entry))
    return pids


def task_runtime(pid: int) -> float:
    """Seconds pid's threads have run (schedstat, ns exact; 0 once it has gone)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return total / 1e9


def machine_times(stat: str = "/proc/stat") -> tuple:
    """(busy, steal) seconds of all CPUs since boot: busy is user + nice + system + irq +
    softirq (guest time is inside user)."""
    with open(stat) as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


@dataclass
class Meter:
    """A snapshot taken before a run; cost() reads the same counters after it."""
    wall: float
    children: float
    resident: Dict[int, float]
    busy: float
    steal: float


@dataclass
class Cost:
    wall: float          # seconds the run took
    own: float           # CPU seconds of the client tool and the netns' resident processes
    client: float        # of which the client tool's (wrk: where the socket hooks run)
    others: float        # the rest of the machine's busy CPU seconds meanwhile (others' work)
    steal: float         # CPU seconds the hypervisor took meanwhile

    def others_share(self, cpus: int) -> float:
        """Other work's share of the machine during the run (0 .. 1)."""
        return (self.others + self.steal) / max(self.wall * cpus, 1e-9)


def children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def meter(netns: Sequence[str]) -> Meter:
    busy, steal = machine_times()
    return Meter(time.monotonic(), children_cpu(),
                 {pid: task_runtime(pid) for pid in netns_pids(netns)}, busy, steal)


def cost(m: Meter) -> Cost:
    busy, steal = machine_times()
    resident = sum(max(task_runtime(pid) - t, 0.0) for pid, t in m.resident.items())
    client = children_cpu() - m.children
    own = client + resident
    return Cost(time.monotonic() - m.wall, own, client, max(busy - m.busy - own, 0.0),
                steal - m.steal)
