"""No-root checks of the observability pieces: the flow filter and log, the log2 buckets as
Prometheus histograms, /v1/flows' bad input, and the dashboard being the generator's output."""
import importlib.util
import json
import os
import threading
import time

import yaml

from nodemesh import flows
from nodemesh.datapath import maps as m
from nodemesh.datapath.observe import FlowEvent, LatencyStats
from nodemesh.flowsapi import flows_view
from nodemesh.latency import BOUNDS, Totals, _buckets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def event(verdict=1, backend="10.0.0.2", port=8080, svc_id=7, proto=6):
    ev = FlowEvent(ts_ns=1, pid=42, svc_id=svc_id, comm=b"curl", verdict=verdict, proto=proto,
                   family=m.FAMILY_V4, vip_port=m.port_be(80))
    ev.vip[:] = m.encode_addr("10.96.0.10")[1]
    if backend:
        ev.backend[:] = m.encode_addr(backend)[1]
        ev.backend_port = m.port_be(port)
    return ev


def names(svc_id):
    return {7: ("demo", "web")}.get(svc_id, ("", ""))


def test_a_flow_shows_the_vip_beside_the_backend_and_names_the_service():
    f = flows.decode(event(), 1, names)
    assert (f.vip, f.backend, f.namespace, f.service, f.verdict, f.protocol, f.comm) == \
        ("10.96.0.10:80", "10.0.0.2:8080", "demo", "web", "translated", "TCP", "curl")
    refused = flows.decode(event(verdict=2, backend=None), 2, names)
    assert refused.backend == "" and refused.verdict == "no_backend"


def test_the_filter_matches_service_backend_address_or_endpoint_and_verdict():
    f = flows.decode(event(), 1, names)
    assert flows.Filter.parse("demo/web", None, None)(f)
    assert not flows.Filter.parse("demo/api", None, None)(f)
    assert flows.Filter.parse(None, "10.0.0.2", None)(f)
    assert flows.Filter.parse(None, "10.0.0.2:8080", None)(f)
    assert not flows.Filter.parse(None, "10.0.0.2:9090", None)(f)
    assert not flows.Filter.parse(None, None, "denied")(f)


def test_bad_filters_name_the_option():
    for args, word in [(("web", None, None), "--service"), ((None, " ", None), "--backend"),
                       ((None, None, "nope"), "--verdict")]:
        try:
            flows.Filter.parse(*args)
        except ValueError as e:
            assert word in str(e)
        else:
            raise AssertionError(f"{args} accepted")


def test_the_log_keeps_the_last_flows_and_wakes_a_waiting_reader():
    log = flows.FlowLog(size=3)
    for _ in range(5):
        log.add(flows.decode(event(), log.next_seq(), names))
    got, seq = log.since(0, lambda f: True)
    assert [f.seq for f in got] == [3, 4, 5] and seq == 5
    threading.Timer(0.1, lambda: log.add(flows.decode(event(), log.next_seq(), names))).start()
    t = time.monotonic()
    got, seq = log.since(5, lambda f: True, wait=2)
    assert [f.seq for f in got] == [6] and time.monotonic() - t < 1.5


def test_a_polls_worth_of_flows_reaches_a_waiting_reader_whole_and_in_order():
    # The reader decodes what one poll of the ring buffer returns and adds it under one lock,
    # so a follower woken by it sees the whole batch, not its first flow.
    log = flows.FlowLog(size=8)
    got = []
    reader = threading.Thread(target=lambda: got.append(log.since(0, lambda f: True, wait=5)))
    reader.start()
    time.sleep(0.05)
    log.extend([flows.decode(event(), log.next_seq() + i, names) for i in range(3)])
    reader.join(5)
    assert [f.seq for f in got[0][0]] == [1, 2, 3] and got[0][1] == 3


def test_the_reader_keeps_events_raw_and_readers_get_them_decoded_named_as_they_came():
    # The ring-buffer reader keeps each event as it came (decoding one cost ~10 us a
    # connection, for flows nearly nobody reads) and names its service at once: a reader
    # later gets the same Flow as decoding at once, even after the service went away.
    current = {7: ("demo", "web")}
    log = flows.FlowLog(size=8)
    log.extend([flows.raw(bytes(event()), log.next_seq(), lambda i: current.get(i, ("", "")))])
    assert type(log._flows[0]) is flows.RawFlow
    current.clear()  # the service is gone by the time someone reads
    got, seq = log.since(0, flows.Filter.parse("demo/web", None, None))
    assert got == [flows.decode(event(), 1, names)] and seq == 1


def test_a_v4_address_decodes_as_ipaddress_writes_it():
    import ipaddress
    import random

    rng = random.Random(8)
    for value in [0, 1, 0x0A000001, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(2000)]:
        text = str(ipaddress.IPv4Address(value))
        assert m.decode_addr(*m.encode_addr(text)) == text


def test_flows_api_refuses_bad_query_values_with_400():
    log = flows.FlowLog()
    assert flows_view(log, "/v1/flows?wait=60")[0] == 400
    assert flows_view(log, "/v1/flows?since=x")[0] == 400
    code, body = flows_view(log, "/v1/flows?service=web")
    assert code == 400 and "NAMESPACE/NAME" in body["error"]
    assert flows_view(log, "/v1/flows?since=0") == (200, {"flows": [], "seq": 0})


def test_log2_buckets_become_cumulative_prometheus_buckets_in_seconds():
    st = LatencyStats()
    st.connect_us[0] = 1   # below 1 µs
    st.connect_us[5] = 3   # 16..31 µs: below 2**5 µs
    st.connect_us[23] = 2  # beyond the last bound
    t = Totals()
    t.add(st)
    t.add(st)
    b = _buckets(t.connect)
    assert b[0] == ("1e-06", 2.0)
    assert b[5] == (str(32 / 1e6), 8.0)
    assert b[-1] == ("+Inf", 12.0) and BOUNDS[-1] == "+Inf"
    assert [float(x) for x in BOUNDS[:-1]] == sorted(float(x) for x in BOUNDS[:-1])


def test_the_committed_dashboard_is_the_generators_output():
    path = os.path.join(ROOT, "deploy", "grafana", "generate.py")
    spec = importlib.util.spec_from_file_location("nodemesh_dashboard", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    with open(os.path.join(ROOT, "deploy", "grafana", "nodemesh.json")) as f:
        committed = f.read()
    assert committed == gen.render(), "run: python deploy/grafana/generate.py > " \
                                      "deploy/grafana/nodemesh.json"
    d = json.loads(committed)
    assert d["uid"] == "nodemesh-overview"
    assert [v["name"] for v in d["templating"]["list"]] == \
        ["datasource", "node", "namespace", "service"]


def test_scrape_configs_label_every_series_with_its_node():
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus.yml")) as f:
        conf = yaml.safe_load(f)
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    assert any(r.get("target_label") == "node" for r in jobs["nodemesh"]["relabel_configs"])
    with open(os.path.join(ROOT, "deploy", "prometheus", "servicemonitor.yaml")) as f:
        docs = list(yaml.safe_load_all(f))
    sm = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["relabelings"][0]["targetLabel"] == "node"
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["ports"][0]["port"] == 9464


class _Maps:
    def __init__(self, entries):
        self.entries = entries

    def items(self, name):
        assert name == "backend_latency"
        return iter(self.entries)


def _latency_entry(svc_id, address, port, connects):
    from nodemesh.datapath.observe import LatencyKey

    k = LatencyKey(svc_id=svc_id, port=m.port_be(port), family=m.FAMILY_V4)
    k.addr[:] = m.encode_addr(address)[1]
    st = LatencyStats(closed=connects, bytes_sent=10 * connects)
    st.connect_us[6] = connects
    return k, st


def _agent_with(entries, generation=1):
    from types import SimpleNamespace

    from nodemesh.reconciler import DesiredFrontend, FrontendKey, ProgrammedFrontend, Status
    from nodemesh.snapshot import Snapshot, frontend_view

    key = FrontendKey(m.FAMILY_V4, "10.96.0.10", 80, "TCP")
    desired = DesiredFrontend(key, "demo", "web", "http", "random",
                              (("10.0.0.1", 8080, 1), ("10.0.0.2", 8080, 1)), "all", 2)
    programmed = ProgrammedFrontend(key, 7, 0, "random", 1, (1, 2),
                                    {("10.0.0.1", 8080): 1, ("10.0.0.2", 8080): 2})
    view = frontend_view(key, desired, programmed, Status("done"))
    snap = Snapshot(generation=generation).with_frontends({key: view})
    return SimpleNamespace(maps=_Maps(entries), snapshot=snap)


def test_latency_series_are_per_backend_or_summed_per_service_by_detail_level():
    from nodemesh.latency import LatencyCollector

    entries = [_latency_entry(7, "10.0.0.1", 8080, 3), _latency_entry(7, "10.0.0.2", 8080, 4),
               _latency_entry(7, "10.0.0.9", 8080, 50),   # a backend no longer in the set
               _latency_entry(99, "10.0.0.1", 8080, 50)]  # a frontend id no longer in use
    per_backend = LatencyCollector(_agent_with(entries), per_backend=True).totals()
    assert {k: t.closed for k, t in per_backend.items()} == {
        ("demo", "web", "10.0.0.1:8080"): 3, ("demo", "web", "10.0.0.2:8080"): 4}
    per_service = LatencyCollector(_agent_with(entries), per_backend=False).totals()
    assert {k: (t.closed, t.sent, t.connect[6]) for k, t in per_service.items()} == {
        ("demo", "web"): (7, 70, 7)}
