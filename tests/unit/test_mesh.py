"""The proxy redirect's control plane without root: the `proxy:` config field, what the
reconciler writes into the master entry (and reads back on adoption), the node-wide
mesh_config, and the run options."""
import argparse

import pytest
from fakemaps import FakeMaps

from nodemesh import cli, config
from nodemesh.datapath import maps as m
from nodemesh.datapath.loader import cgroup2_root
from nodemesh.mesh import NO_UID, MeshOptions, mesh_config
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.reconciler import FrontendKey, Reconciler


def service_with(proxy_line: str) -> str:
    return f"""services:
  - name: web
    vip: 10.96.0.10
    ports: [{{port: 80, targetPort: 8080}}, {{port: 53, protocol: UDP}}]
    backends: [{{address: 10.200.1.2}}]
{proxy_line}"""


@pytest.mark.parametrize("line, want", [
    ("", None),
    ("    proxy: {port: 15001}\n", 15001),
    ("    proxy: {enabled: false}\n", 0),
    ("    proxy: {enabled: true}\n", None),
    ("    proxy: {}\n", None),
])
def test_proxy_field_becomes_the_services_proxy_port(line, want):
    svc, = config.parse(service_with(line))
    assert svc.proxy_port == want


@pytest.mark.parametrize("line, error", [
    ("    proxy: {port: 0}\n", "services[0].proxy.port: 0 is not a port (1-65535)"),
    ("    proxy: {port: 70000}\n", "services[0].proxy.port: 70000 is not a port"),
    ("    proxy: {enabled: maybe}\n", "services[0].proxy.enabled: 'maybe' must be true or false"),
    ("    proxy: {port: 15001, enabled: false}\n",
     "services[0].proxy: port and enabled: false contradict each other"),
    ("    proxy: {prot: 15001}\n", "services[0].proxy.prot: unknown field"),
    ("    proxy: 15001\n", "services[0].proxy"),
])
def test_a_bad_proxy_field_is_refused_naming_the_field(line, error):
    with pytest.raises(config.ConfigError) as e:
        config.parse(service_with(line), "bad.yaml")
    assert error in str(e.value)


def _svc(proxy_port):
    return Service(name="web", namespace="default", vip="10.96.0.10",
                   ports=(ServicePort(80, 8080), ServicePort(53, 53, "UDP")),
                   backends=(Backend("10.200.1.2"),), proxy_port=proxy_port)


def _master(maps, port, proto="TCP"):
    key = FrontendKey(4, "10.96.0.10", port, proto).map_key(0)
    return maps.lookup("services", key, m.SvcValue)


def test_the_master_carries_the_proxy_port_on_tcp_frontends_only():
    maps = FakeMaps()
    rec = Reconciler(maps)
    rec.apply([_svc(15001)])
    tcp, udp = _master(maps, 80), _master(maps, 53, "UDP")
    assert m.port_host(tcp.proxy_port) == 15001 and not tcp.flags & m.SVC_F_PROXY_OFF
    assert udp.proxy_port == 0 and udp.flags == 0


def test_changing_only_the_proxy_setting_rewrites_the_master():
    maps = FakeMaps()
    rec = Reconciler(maps)
    rec.apply([_svc(None)])
    assert _master(maps, 80).proxy_port == 0 and _master(maps, 80).flags == 0
    rec.apply([_svc(0)])
    assert _master(maps, 80).flags & m.SVC_F_PROXY_OFF
    rec.apply([_svc(15002)])
    assert m.port_host(_master(maps, 80).proxy_port) == 15002
    assert not _master(maps, 80).flags & m.SVC_F_PROXY_OFF


@pytest.mark.parametrize("proxy_port", [None, 0, 15001])
def test_an_adopted_frontend_keeps_its_proxy_setting_with_no_write(proxy_port):
    maps = FakeMaps()
    Reconciler(maps).apply([_svc(proxy_port)])
    rec = Reconciler(maps)
    rec.adopt()
    before = maps.writes()
    rec.apply([_svc(proxy_port)])
    assert maps.writes() == before


def test_mesh_config_holds_the_node_settings():
    cfg = mesh_config(MeshOptions(proxy_port=15001, proxy_uid=1337, accelerate_local=True))
    assert (m.port_host(cfg.proxy_port), cfg.proxy_uid, cfg.accelerate) == (15001, 1337, 1)
    assert cfg.proxy_cgroup_id == 0
    assert mesh_config(MeshOptions(proxy_uid=None)).proxy_uid == NO_UID


def test_the_proxy_cgroup_is_identified_by_id_and_depth():
    root = cgroup2_root()
    cfg = mesh_config(MeshOptions(proxy_cgroup=root))
    import os
    assert (cfg.proxy_cgroup_level, cfg.proxy_cgroup_id) == (0, os.stat(root).st_ino)


def test_a_proxy_cgroup_that_is_no_cgroup_is_refused_by_name(tmp_path):
    from nodemesh.datapath.loader import DatapathError
    with pytest.raises(DatapathError, match="--proxy-cgroup"):
        mesh_config(MeshOptions(proxy_cgroup=str(tmp_path)))


def test_run_options_parse():
    p = argparse.ArgumentParser()
    cli.mesh_args(p)
    a = p.parse_args(["--proxy-port", "15001", "--proxy-uid", "-1", "--accelerate-local"])
    assert (a.proxy_port, a.proxy_uid, a.accelerate_local) == (15001, -1, True)
    a = p.parse_args([])
    assert (a.proxy_port, a.proxy_uid, a.accelerate_local) == (0, 1337, False)
    with pytest.raises(SystemExit):
        p.parse_args(["--proxy-port", "70000"])
