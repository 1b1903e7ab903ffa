"""connectionLimits and least_connections from the config to the master entry: no root."""
from dataclasses import replace

import pytest
from fakemaps import FakeMaps

from nodemesh import config
from nodemesh.datapath import maps as m
from nodemesh.model import Backend, ConnectionLimits, Service, ServicePort
from nodemesh.reconciler import FrontendKey, Reconciler

SVC = """services:
  - name: web
    vip: 10.96.0.10
    algorithm: least_connections
    ports: [{port: 80, targetPort: 8080}]
    connectionLimits: {maxConnectionsPerBackend: 3, maxConnections: 100}
    backends: [{address: 10.0.0.1}, {address: 10.0.0.2}]
"""


def test_connection_limits_parse():
    (svc,) = config.parse(SVC)
    assert svc.algorithm == "least_connections"
    assert svc.connection_limits == ConnectionLimits(3, 100)


@pytest.mark.parametrize("limits, problem", [
    ("{maxConnectionsPerBackend: -1}",
     "services[0].connectionLimits.maxConnectionsPerBackend: -1 is not a count"),
    ("{maxConnections: x}", "services[0].connectionLimits.maxConnections: 'x' is not a count"),
    ("{maxConn: 1}", "services[0].connectionLimits.maxConn: unknown field"),
])
def test_bad_limits_name_the_field(limits, problem):
    text = SVC.replace("{maxConnectionsPerBackend: 3, maxConnections: 100}", limits)
    with pytest.raises(config.ConfigError) as e:
        config.parse(text)
    assert problem in str(e.value)


def master(maps):
    key = FrontendKey(4, "10.96.0.10", 80, "TCP").map_key(0)
    return maps.lookup("services", key, m.SvcValue)


def test_limits_and_algorithm_reach_the_master_and_a_change_rewrites_it():
    maps = FakeMaps(m.MapSizes())
    rec = Reconciler(maps)
    svc = Service("web", "default", "10.96.0.10", (ServicePort(80, 8080),),
                  (Backend("10.0.0.1"), Backend("10.0.0.2")), algorithm="least_connections",
                  connection_limits=ConnectionLimits(3, 100))
    rec.apply([svc])
    got = master(maps)
    assert (got.algorithm, got.max_conns_per_backend, got.max_conns) == \
        (m.ALG_LEAST_CONNECTIONS, 3, 100)
    rec.apply([replace(svc, connection_limits=ConnectionLimits(5, 0))])
    got = master(maps)
    assert (got.max_conns_per_backend, got.max_conns) == (5, 0)
    # A restarted agent adopts the limits: an unchanged service costs no write.
    again = Reconciler(maps)
    again.adopt()
    assert again.programmed[FrontendKey(4, "10.96.0.10", 80, "TCP")].limits == (5, 0)
