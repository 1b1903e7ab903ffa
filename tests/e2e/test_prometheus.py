"""A real Prometheus (Debian's package) scrapes a real agent: rate() and histogram_quantile()
over nodemesh metrics agree with the test's own traffic, and every query of the Grafana
dashboard parses in that Prometheus and names only metrics the agent exports.

Prometheus listens on 127.0.0.1 only, keeps its data in the test's temporary folder and
scrapes every second; it is stopped in a finally."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from helpers import ROOT, TIME_SCALE, config_yaml, free_port, service_yaml

pytestmark = pytest.mark.root

SCRAPE = 1  # seconds
DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "nodemesh.json")


class Prometheus:
    def __init__(self, workdir, target):
        self.port = free_port()
        self.workdir = workdir
        conf = os.path.join(workdir, "prometheus.yml")
        with open(conf, "w") as f:
            f.write(f"""global: {{scrape_interval: {SCRAPE}s, evaluation_interval: {SCRAPE}s}}
scrape_configs:
  - job_name: nodemesh
    static_configs:
      - targets: ["{target}"]
        labels: {{node: test-node}}
""")
        self.log = open(os.path.join(workdir, "prometheus.log"), "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}",
             f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self):
        deadline = time.monotonic() + 30 * TIME_SCALE
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("prometheus not ready in 30 s")

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    def query(self, expr, at=None):
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)

    def scalar(self, expr, at=None):
        res = self.query(expr, at)
        assert res["status"] == "success", res
        values = res["data"]["result"]
        assert len(values) == 1, (expr, values)
        return float(values[0]["value"][1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(agent, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run make setup")
    p = Prometheus(str(tmp_path), f"127.0.0.1:{agent.metrics_port}")
    try:
        yield p
    finally:
        p.stop()


def wait_scraped(prom, expr, want, timeout=15):
    deadline = time.monotonic() + timeout * TIME_SCALE
    got = None
    while time.monotonic() < deadline:
        res = prom.query(expr)
        if res["status"] == "success" and res["data"]["result"]:
            got = float(res["data"]["result"][0]["value"][1])
            if got == want:
                return time.time()
        time.sleep(0.25)
    raise AssertionError(f"{expr} = {got}, waited for {want}")


def _crossing(buckets, q):
    """Where rank q x total falls in cumulative [(le, count)], le ascending: the rank and the
    bucket's (lower bound, count below it, upper bound, count up to it)."""
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            return rank, prev_le, prev_count, le, count
        prev_le, prev_count = le, count
    raise AssertionError("unreachable")


def quantile(buckets, q):
    """Prometheus' histogram_quantile over cumulative [(le, count)], le ascending."""
    rank, prev_le, prev_count, le, count = _crossing(buckets, q)
    if le == float("inf"):
        return prev_le
    return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)


def quantile_bucket(buckets, q):
    """The bounds (lower, upper) of the bucket histogram_quantile(q) interpolates in, over
    cumulative [(le, count)]; for the +Inf bucket both are the last finite bound."""
    _, prev_le, _, le, _ = _crossing(buckets, q)
    return (prev_le, prev_le if le == float("inf") else le)


def test_prometheus_rate_and_histogram_quantile_agree_with_the_test_traffic(lab, agent,
                                                                           prometheus):
    web = service_yaml("web", lab.vip4(), [b.ipv4 for b in lab.backends])
    agent.write_config(config_yaml(web))
    agent.start()
    prometheus.wait_ready()
    svc = 'nodemesh_service_connections_total{service="web"}'
    # A few connections first: the kernel creates a backend's latency entry at its first
    # connection, and rate() needs a sample of each bucket from before the measured traffic.
    warm = 10
    assert lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(warm)])["ok"] == warm
    wait_scraped(prometheus, 'sum(nodemesh_backend_rtt_seconds_count{service="web"})', warm)
    wait_scraped(prometheus, svc, warm)
    before = agent.metrics()
    time.sleep(8 * SCRAPE)  # samples before the measured traffic: the window starts among them
    start = time.time()
    n = 400
    r = lab.client(["tcp", "--target", f"{lab.vip4()}:80", "--count", str(n),
                    "--concurrency", "2"])
    assert r["ok"] == n
    wait_scraped(prometheus, 'sum(nodemesh_backend_rtt_seconds_count{service="web"})', warm + n)
    wait_scraped(prometheus, svc, warm + n)
    time.sleep(SCRAPE)
    end = time.time()
    # seconds: from samples before the traffic (after the warm-up's) to its last sample
    window = int(end - start) + 6
    # rate() over a window holding all the traffic: n connections over `window` seconds.
    # Prometheus extrapolates the increase towards the window's edges by at most about one
    # scrape interval on each side, so rate x window lies in [n, n x window / (window - 2)].
    rate = prometheus.scalar(f"rate({svc}[{window}s])", at=end)
    assert n * 0.999 <= rate * window <= n * window / (window - 2 * SCRAPE) * 1.001, \
        (rate, window)
    # Per backend, the same bound around what the client saw that backend get.
    for b in lab.backends:
        backend = f"{b.ipv4}:8080"
        got = prometheus.scalar(
            f'rate(nodemesh_backend_connections_total{{backend="{backend}"}}[{window}s])', at=end)
        c = r["backends"].get(b.name, 0)
        assert c * 0.999 <= got * window <= c * window / (window - 2 * SCRAPE) * 1.001, \
            (backend, got, c)
    # histogram_quantile() over rate() of the kernel's connect-duration buckets is the
    # quantile of what the agent exported for exactly this traffic (the difference of two
    # scrapes of the agent itself), up to rate()'s extrapolation. That scales each bucket by
    # its own factor within the bounds above, so the share of the traffic under any bound moves
    # by at most that factor either way: the answer lies in a bucket between those of the
    # exact quantiles at q / factor and q x factor, anywhere inside it (Prometheus interpolates
    # on the scaled counts). A fixed "within 2x" failed at q = 0.99, whose rank sits among the
    # few connections of the tail's sparse buckets.
    factor = window / (window - 2 * SCRAPE) * 1.001 / 0.999
    after = agent.metrics()
    merged = {}
    for (name, ls), v in after.items():
        if name == "nodemesh_backend_connect_duration_seconds_bucket":
            le = float(dict(ls)["le"])
            merged[le] = merged.get(le, 0) + v - before.get((name, ls), 0)
    cumulative = sorted(merged.items())
    assert cumulative[-1][1] == n
    for q in (0.5, 0.99):
        got = prometheus.scalar(
            f"histogram_quantile({q}, sum by (le) (rate("
            f'nodemesh_backend_connect_duration_seconds_bucket{{service="web"}}[{window}s])))',
            at=end)
        want = quantile(cumulative, q)
        low = quantile_bucket(cumulative, q / factor)[0]
        high = quantile_bucket(cumulative, min(q * factor, 1.0))[1]
        assert low <= got <= high, (q, got, want, low, high)
        assert 0 < got < 1.0  # a connect over a veth: microseconds to milliseconds


# -- the dashboard ---------------------------------------------------------------------------

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan", "le"}


def dashboard_queries():
    with open(DASHBOARD) as f:
        d = json.load(f)
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return d, exprs


def concrete(expr):
    """A dashboard query with Grafana's variables as Prometheus would receive them."""
    expr = expr.replace("$__rate_interval", "1m").replace("${datasource}", "")
    return re.sub(r"\$\{?(node|namespace|service)\}?", ".*", expr)


def metric_names(expr):
    """Metric names in a PromQL expression: identifiers outside label matchers and strings,
    not followed by '(' (functions, aggregations) and not in a by/without list."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]|\boffset\s+-?[0-9a-z]+", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = m.group(0)
        if expr[m.end():].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d.*|e\d+", word):
            continue
        names.add(word)
    return names


def exported_families(text):
    """Sample names the agent's /metrics declares (a family declares its _total, _bucket ...)."""
    out = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", text, flags=re.M):
        out.add(name)
        if kind == "counter":
            out.add(name if name.endswith("_total") else name + "_total")
        if kind == "histogram":
            out.update({name + "_bucket", name + "_sum", name + "_count"})
    return out


def test_every_dashboard_query_parses_in_prometheus_and_names_only_exported_metrics(
        lab, agent, prometheus):
    d, exprs = dashboard_queries()
    assert d["uid"] == "nodemesh-overview"
    assert {"node", "service"} <= {v["name"] for v in d["templating"]["list"]}
    agent.write_config(config_yaml(service_yaml("web", lab.vip4(), [lab.backends[0].ipv4])))
    agent.start()
    prometheus.wait_ready()
    with urllib.request.urlopen(agent.url("/metrics"), timeout=5) as resp:
        exported = exported_families(resp.read().decode())
    assert "nodemesh_backend_connect_duration_seconds_bucket" in exported
    for expr in exprs:
        if expr.startswith("label_values("):  # Grafana's function, not PromQL: its argument is
            inner = expr[len("label_values("):].rsplit(",", 1)[0]
            expr = inner
        res = prometheus.query(concrete(expr))
        assert res["status"] == "success", f"{expr}: {res.get('error')}"
        unknown = metric_names(concrete(expr)) - exported
        assert not unknown, f"{expr} names {unknown}, which the agent does not export"


def test_metric_names_finds_the_metrics_and_only_them():
    expr = ('1e9 * sum by (node, le) (rate(nodemesh_a_total{node=~".*",x="y(z)"}[1m])) '
            '/ on (node) histogram_quantile(0.5, nodemesh_b_bucket) + nodemesh_c offset 5m')
    assert metric_names(expr) == {"nodemesh_a_total", "nodemesh_b_bucket", "nodemesh_c"}
