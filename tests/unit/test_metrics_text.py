"""The hand-written exposition of the large families must be byte for byte what
prometheus_client writes, or Prometheus would parse the two differently."""
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodemesh.metrics import _text
from nodemesh.snapshot import label_value

VALUES = {("default", 'we"ird\\name'): 3, ("default", "web"): 0, ("a\nb", "x"): 12345678,
          ("default", "idle"): 0}


def _reference(family) -> str:
    class One:
        def collect(self):
            yield family
    registry = CollectorRegistry()
    registry.register(One())
    return generate_latest(registry).decode()


def test_counters_are_written_as_prometheus_client_writes_them():
    fam = CounterMetricFamily("nodemesh_service_connections", "Connections", labels=["ns", "s"])
    for labels, v in VALUES.items():
        fam.add_metric(list(labels), v)
    assert _text("nodemesh_service_connections", "counter", "Connections",
                 _formatted(VALUES)) == _reference(fam)


def test_gauges_are_written_as_prometheus_client_writes_them():
    fam = GaugeMetricFamily("nodemesh_backend_healthy", "Healthy", labels=["ns", "s"])
    for labels, v in VALUES.items():
        fam.add_metric(list(labels), v)
    assert _text("nodemesh_backend_healthy", "gauge", "Healthy",
                 _formatted(VALUES)) == _reference(fam)


def _formatted(values):
    return {f'ns="{label_value(ns)}",s="{label_value(s)}"': v for (ns, s), v in values.items()}
