"""Generate deploy/grafana/nodemesh.json with Grafana's own Python SDK (grafana-foundation-sdk).

    .venv/bin/python deploy/grafana/generate.py > deploy/grafana/nodemesh.json

Why the SDK rather than hand-written JSON: its builders are generated from Grafana's schema,
so a panel, a variable or a datasource reference cannot be misspelt into something Grafana
silently ignores, and the queries sit here as readable PromQL. tests/unit/test_dashboard.py
checks that the committed JSON is this script's output, and tests/e2e/test_prometheus.py that
every query parses in a real Prometheus and names only metrics the agent exports.
"""
from __future__ import annotations

import json
import sys
from typing import List, Tuple

from grafana_foundation_sdk.builders import dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

UID = "nodemesh-overview"
DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'node=~"$node"'
SVC = 'node=~"$node",namespace=~"$namespace",service=~"$service"'
RATE = "$__rate_interval"

# (title, unit, description, [(expr, legend)])
PANELS: List[Tuple[str, str, str, List[Tuple[str, str]]]] = [
    ("Connections/s by service", "cps", "New connections (and unconnected UDP datagrams) the "
     "kernel balanced, per service",
     [(f"sum by (namespace, service) (rate(nodemesh_service_connections_total{{{SVC}}}[{RATE}]))",
       "{{namespace}}/{{service}}")]),
    ("Connections/s by backend", "cps", "Needs --metrics-detail backend",
     [(f"sum by (service, backend) (rate(nodemesh_backend_connections_total{{{SVC}}}[{RATE}]))",
       "{{service}} {{backend}}")]),
    ("Backend health", "none", "1: ready, passing its checks and not ejected (needs "
     "--metrics-detail backend)",
     [(f"min by (service, backend) (nodemesh_backend_healthy{{{SVC}}})",
       "{{service}} {{backend}}")]),
    ("Ejections", "short", "Outlier ejections in the interval",
     [(f"sum by (service, reason) (increase(nodemesh_backend_ejections_total{{{SVC}}}[{RATE}]))",
       "{{service}} {{reason}}")]),
    ("Connect latency p50 / p99", "s", "SYN to established, measured by sockops",
     [(f"histogram_quantile(0.5, sum by (service, le) (rate("
       f"nodemesh_backend_connect_duration_seconds_bucket{{{SVC}}}[{RATE}])))",
       "p50 {{service}}"),
      (f"histogram_quantile(0.99, sum by (service, le) (rate("
       f"nodemesh_backend_connect_duration_seconds_bucket{{{SVC}}}[{RATE}])))",
       "p99 {{service}}")]),
    ("RTT p50 / p99", "s", "Smoothed RTT of connections as they close",
     [(f"histogram_quantile(0.5, sum by (service, le) (rate("
       f"nodemesh_backend_rtt_seconds_bucket{{{SVC}}}[{RATE}])))", "p50 {{service}}"),
      (f"histogram_quantile(0.99, sum by (service, le) (rate("
       f"nodemesh_backend_rtt_seconds_bucket{{{SVC}}}[{RATE}])))", "p99 {{service}}")]),
    ("Bytes/s", "Bps", "Payload of closed connections, each way",
     [(f"sum by (service, direction) (rate(nodemesh_backend_bytes_total{{{SVC}}}[{RATE}]))",
       "{{service}} {{direction}}"),
      (f"sum by (service) (rate(nodemesh_backend_retransmits_total{{{SVC}}}[{RATE}]))",
       "{{service}} retransmits")]),
    ("Refusals and datapath events by reason", "cps",
     "no_backend: connect() refused with ECONNREFUSED; the rest: datapath events by kind",
     [(f"sum by (service) (rate(nodemesh_service_no_backend_total{{{SVC}}}[{RATE}]))",
       "no_backend {{service}}"),
      (f"sum by (event) (rate(nodemesh_datapath_events_total{{{SEL}}}[{RATE}]))", "{{event}}")]),
    ("Flow events and loss", "short", "Events sent and refused by the per-CPU rate limit or "
     "lost to a full ring",
     [(f"sum(rate(nodemesh_flow_events_total{{{SEL}}}[{RATE}]))", "sent"),
      (f"sum by (reason) (rate(nodemesh_flow_events_lost_total{{{SEL}}}[{RATE}]))",
       "lost {{reason}}")]),
    ("Datapath cost: kernel ns per connection", "ns", "Kernel time of every nodemesh program "
     "(BPF_ENABLE_STATS) per balanced connection; empty unless the agent runs with --bpf-stats on",
     [(f"1e9 * sum by (node) (rate(nodemesh_bpf_program_run_seconds_total{{{SEL}}}[{RATE}])) "
       f"/ sum by (node) (rate(nodemesh_service_connections_total{{{SEL}}}[{RATE}]))",
       "{{node}}"),
      (f"sum by (program) (rate(nodemesh_bpf_program_run_seconds_total{{{SEL}}}[{RATE}]))"
       " * 1e9", "{{program}} ns/s")]),
    ("BPF map memory", "bytes", "What the kernel charges each map (memlock)",
     [(f"sum by (map) (nodemesh_bpf_map_memory_bytes{{{SEL}}})", "{{map}}")]),
    ("Agent CPU and memory", "short", "The agent process (psutil)",
     [(f"sum by (node) (rate(nodemesh_agent_cpu_seconds_total{{{SEL}}}[{RATE}]))",
       "CPU {{node}}"),
      (f"nodemesh_agent_resident_memory_bytes{{{SEL}}} / 2^20", "RSS MiB {{node}}")]),
]


def variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (dashboard.QueryVariable(name).label(label).query(query).datasource(DS)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True).include_all(True)
            .all_value(".*"))


def build() -> dashboard.Dashboard:
    d = (dashboard.Dashboard("nodemesh").uid(UID).tags(["nodemesh", "ebpf"])
         .refresh("30s").time("now-1h", "now")
         .with_variable(dashboard.DatasourceVariable("datasource").label("Data source")
                        .type("prometheus"))
         .with_variable(variable("node", "Node", "label_values(nodemesh_build_info, node)"))
         .with_variable(variable("namespace", "Namespace", "label_values("
                                 'nodemesh_service_connections_total{node=~"$node"}, namespace)'))
         .with_variable(variable("service", "Service", "label_values("
                                 'nodemesh_service_connections_total{node=~"$node",'
                                 'namespace=~"$namespace"}, service)')))
    for title, unit, description, targets in PANELS:
        p = (timeseries.Panel().title(title).unit(unit).description(description)
             .datasource(DS).height(8).span(12))
        for expr, legend in targets:
            p = p.with_target(prometheus.Dataquery().expr(expr).legend_format(legend)
                              .ref_id(chr(ord("A") + len(p.build().targets or []))))
        d = d.with_panel(p)
    return d


def render() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
