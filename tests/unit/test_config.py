"""Config validation: every bad input names the file, line and field path."""
import pytest

from nodemesh import config, reserved
from nodemesh.model import Backend, ServicePort

GOOD = """\
services:
  - name: web
    namespace: demo
    vip: 10.96.0.10
    ports:
      - {name: http, port: 80, targetPort: 8080, protocol: TCP}
      - {name: dns, port: 53, protocol: UDP}
    algorithm: round_robin
    sessionAffinity: {clientIP: {timeoutSeconds: 60}}
    healthCheck: {type: http, path: /healthz, intervalSeconds: 2}
    backends:
      - {address: 10.200.1.2, weight: 1}
      - {address: 10.200.1.3, weight: 3, node: node-a, zone: zone-a}
  - name: web6
    vip: "fd00:96::10"
    ports: [{port: 80}]
    backends: [{address: "fd00:200::2"}]
"""


def test_a_valid_file_becomes_the_model():
    web, web6 = config.parse(GOOD, "good.yaml")
    assert web.key == ("demo", "web") and web.algorithm == "round_robin"
    assert web.ports == (ServicePort(80, 8080, "TCP", "http"), ServicePort(53, 53, "UDP", "dns"))
    assert web.backends[1] == Backend("10.200.1.3", 3, node="node-a", zone="zone-a")
    assert web.session_affinity.timeout_seconds == 60
    assert web.health_check.type == "http" and web.health_check.path == "/healthz"
    assert web6.namespace == "default" and web6.vip == "fd00:96::10"
    assert web6.ports[0].target_port == 80 and web6.algorithm == "random"


def test_addresses_are_stored_canonically():
    (svc,) = config.parse("services: [{name: a, vip: 'FD00:0:0::10', ports: [{port: 1}], "
                          "backends: [{address: 'fd00::0002'}]}]")
    assert svc.vip == "fd00::10" and svc.backends[0].address == "fd00::2"


def test_empty_file_means_no_services():
    assert config.parse("") == [] and config.parse("services: []") == []


def problems(text):
    with pytest.raises(config.ConfigError) as e:
        config.parse(text, "bad.yaml")
    return str(e.value)


def one(**fields):
    base = {"name": "web", "vip": "10.96.0.10", "ports": "[{port: 80}]",
            "backends": "[{address: 10.200.1.2}]"}
    base.update(fields)
    body = "\n".join(f"    {k}: {v}" for k, v in base.items() if v is not None)
    return "services:\n  - " + body.lstrip() + "\n"


@pytest.mark.parametrize("text, expected", [
    (one(ports="[{port: 70000}]"),
     "bad.yaml:4: services[0].ports[0].port: 70000 is not a port (1-65535)"),
    (one(ports="[{port: 0}]"), "services[0].ports[0].port: 0 is not a port (1-65535)"),
    (one(ports="[{port: '80'}]"), "services[0].ports[0].port: '80' is not a port"),
    (one(ports="[{port: 80, targetPort: -1}]"), "services[0].ports[0].targetPort: -1 is not"),
    (one(ports="[{port: 80, protocol: SCTP}]"),
     "services[0].ports[0].protocol: 'SCTP' is not a protocol (TCP or UDP)"),
    (one(vip="10.96.0.300"), "bad.yaml:3: services[0].vip: '10.96.0.300' is not an IPv4 or "
                             "IPv6 address"),
    (one(vip="0.0.0.0"), "services[0].vip: 0.0.0.0 cannot be a virtual IP: it is unspecified"),
    (one(vip="0.0.0.1"), "services[0].vip: 0.0.0.1 cannot be a virtual IP: 0.0.0.0/8"),
    (one(vip="240.0.0.1"), "services[0].vip: 240.0.0.1 cannot be a virtual IP: 240.0.0.0/4 is "
                           "reserved"),
    (one(vip="255.255.255.255"), "255.255.255.255 cannot be a virtual IP: it is the broadcast"),
    (one(vip="224.0.0.1"), "services[0].vip: 224.0.0.1 cannot be a virtual IP: multicast"),
    (one(vip="'ff02::1'", backends="[{address: 'fd00::2'}]"), "ff02::1 cannot be a virtual IP"),
    (one(vip="'::'", backends="[]"), "services[0].vip: :: cannot be a virtual IP: it is "
                                     "unspecified"),
    # The datapath reads ::ffff:a.b.c.d as IPv4: such a VIP would never match.
    (one(vip="'::ffff:10.96.0.20'", backends="[{address: 'fd00::2'}]"),
     "services[0].vip: ::ffff:a60:14 cannot be a virtual IP: IPv4-mapped addresses are IPv4 to "
     "the datapath: write 10.96.0.20"),
    (one(vip="'fd00::10'", backends="[{address: '::ffff:10.0.0.2'}]"),
     "services[0].backends[0].address: ::ffff:a00:2 cannot be a backend: IPv4-mapped"),
    # inet_pton (the datapath's encoding) refuses a zone: the agent crash-looped on these.
    (one(vip="'fd00::10%eth0'", backends="[]"),
     "bad.yaml:3: services[0].vip: 'fd00::10%eth0' is a scoped IPv6 address"),
    (one(vip="'fd00::10'", backends="[{address: 'fe80::2%lo'}]"),
     "services[0].backends[0].address: 'fe80::2%lo' is a scoped IPv6 address"),
    (one(vip="'fd00::10'", backends="[{address: 'fe80::2'}]"),
     "services[0].backends[0].address: fe80::2 cannot be a backend: IPv6 link-local needs an "
     "interface"),
    (one(backends="[{address: 0.0.0.0}]"),
     "services[0].backends[0].address: 0.0.0.0 cannot be a backend: it is unspecified"),
    (one(backends="[{address: 255.255.255.255}]"),
     "services[0].backends[0].address: 255.255.255.255 cannot be a backend: it is the "
     "broadcast address"),
    (one(backends="[{address: 224.0.0.1}]"),
     "services[0].backends[0].address: 224.0.0.1 cannot be a backend: a connection cannot go "
     "to a multicast group"),
    (one(vip="'fd00::10'", backends="[{address: '::'}]"),
     "services[0].backends[0].address: :: cannot be a backend: it is unspecified"),
    (one(backends="[{address: 10.200.1.2, weight: 0}, {address: 10.200.1.3, weight: 0}]"),
     "services[0].backends: every backend has weight 0: the service would refuse every "
     "connection"),
    (one(backends="[{address: 10.200.1}]"),
     "services[0].backends[0].address: '10.200.1' is not an IPv4 or IPv6 address"),
    (one(backends="[{address: 10.200.1.2, weight: -1}]"),
     "services[0].backends[0].weight: -1 is not a weight (0-65535)"),
    (one(backends="[{address: 10.200.1.2, weight: 65536}]"),
     "services[0].backends[0].weight: 65536 is not a weight (0-65535)"),
    (one(backends="[{address: 'fd00::2'}]"),
     "services[0].backends[0].address: fd00::2 is IPv6 but the VIP 10.96.0.10 is IPv4"),
    (one(backends="[{address: 10.200.1.2}, {address: 10.200.1.2}]"),
     "services[0].backends[1].address: 10.200.1.2 is listed twice"),
    (one(algorithm="fastest"), "services[0].algorithm: 'fastest' is not an algorithm "
                               "(one of: random, round_robin, maglev, least_connections)"),
    (one(name="Web_1"), "services[0].name: 'Web_1' is not a DNS-1123 label"),
    (one(name=None), "services[0].name: is required"),
    (one(vip=None), "services[0].vip: is required"),
    (one(ports=None), "services[0].ports: is required"),
    (one(ports="[]"), "services[0].ports: must be a non-empty list of ports"),
    (one(colour="blue"), "bad.yaml:6: services[0].colour: unknown field"),
    (one(ports="[{port: 80, tagetPort: 8080}]"), "services[0].ports[0].tagetPort: unknown "
                                                 "field"),
    (one(healthCheck="{type: icmp}"), "services[0].healthCheck.type: 'icmp' is not a health "
                                      "check type"),
    (one(healthCheck="{type: http, path: '/a b'}"),
     "services[0].healthCheck.path: '/a b' must be an absolute HTTP path"),
    (one(outlierDetection="{consecutiveFailures: 0}"),
     "services[0].outlierDetection.consecutiveFailures: 0 is not a count (1-1000)"),
    (one(trafficPolicy="{internal: Node}"),
     "services[0].trafficPolicy.internal: 'Node' is not a traffic policy (Cluster or Local)"),
    (one(panicThresholdPercent=101), "services[0].panicThresholdPercent: 101 is not a "
                                     "percentage (0-100)"),
    (one(backends="[{address: 10.200.1.2, ready: maybe}]"),
     "services[0].backends[0].ready: 'maybe' must be true or false"),
    (one(sessionAffinity="{clientIP: {timeoutSeconds: 0}}"),
     "services[0].sessionAffinity.clientIP.timeoutSeconds: 0 is not a timeout"),
    ("servics: []\n", "bad.yaml:1: servics: unknown field"),
    ("services: {a: 1}\n", "services: must be a list, not a mapping"),
])
def test_bad_input_names_the_field_and_the_problem(text, expected):
    assert expected in problems(text)


@pytest.mark.parametrize("vip, why", [
    ("127.0.0.53", "loopback"), ("127.255.255.254", "loopback"), ("'::1'", "loopback"),
    ("169.254.20.10", "link-local"), ("'fe80::1'", "link-local"),
])
def test_vips_that_would_capture_local_traffic_are_refused_unless_allowed(vip, why):
    backend = "fd00::2" if ":" in vip else "10.200.1.2"
    text = one(vip=vip, backends=f"[{{address: '{backend}'}}]")
    message = problems(text)
    assert f"bad.yaml:3: services[0].vip: {vip.strip(chr(39))} is a reserved VIP: it is " \
           f"{'a loopback address' if why == 'loopback' else why}" in message
    assert "allowReservedVIP: true" in message
    # The explicit override, for a node-local DNS cache on 169.254.20.10, say.
    (svc,) = config.parse(one(vip=vip, backends=f"[{{address: '{backend}'}}]",
                              allowReservedVIP="true"))
    assert svc.vip == vip.strip("'")


def test_an_address_of_this_node_is_refused_as_a_vip():
    node = sorted(a for a in reserved.node_addresses() if "." in a and not a.startswith("127."))
    if not node:
        pytest.skip("this machine has no IPv4 address besides loopback")
    message = problems(one(vip=node[0]))
    assert f"services[0].vip: {node[0]} is a reserved VIP: it is an address of this node" \
        in message
    (svc,) = config.parse(one(vip=node[0], allowReservedVIP="true"))
    assert svc.vip == node[0]
    assert "services[0].allowReservedVIP: 'yes' must be true or false" in \
        problems(one(allowReservedVIP="'yes'"))


def test_empty_and_partly_drained_services_are_valid():
    (svc,) = config.parse(one(backends="[]"))
    assert svc.backends == ()
    (svc,) = config.parse(one(backends="[{address: 10.200.1.2, weight: 0}, "
                                       "{address: 10.200.1.3}]"))
    assert [b.weight for b in svc.backends] == [0, 1]


def test_no_more_weighted_backends_than_a_frontend_has_slots():
    from nodemesh.selection import MAX_SLOTS  # the datapath's limit, from one place

    def backends(n, weight=1):
        return [f"{{address: 10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}, weight: {weight}}}"
                for i in range(n)]

    full = backends(MAX_SLOTS)
    drained = ["{address: 10.9.9.9, weight: 0}"]  # weight 0 takes no slot
    (svc,) = config.parse(one(backends="[" + ", ".join(full + drained) + "]"))
    assert len(svc.backends) == MAX_SLOTS + 1
    too_many = "[" + ", ".join(backends(MAX_SLOTS + 1)) + "]"
    assert (f"services[0].backends: {MAX_SLOTS + 1} backends with a weight are more than the "
            f"{MAX_SLOTS} slots of a frontend") in problems(one(backends=too_many))


def test_every_address_check_accepts_is_one_the_datapath_encodes():
    from nodemesh.datapath.maps import encode_addr

    for vip, backend in (("' 10.96.0.1 '", "10.0.0.1"), ("'FD00:0:0::10'", "'fd00::0002'"),
                         ("'::1.2.3.4'", "'0:0:0:0:0:0:0:2'"), ("'2001:db8::1'", "'2001:db8::2'")):
        (svc,) = config.parse(one(vip=vip, backends=f"[{{address: {backend}}}]"))
        encode_addr(svc.vip)
        encode_addr(svc.backends[0].address)


def test_yaml_syntax_error_gives_the_line():
    msg = problems("services:\n  - name: web\n    vip: [10.96.0.10\n")
    assert msg.startswith("bad.yaml:") and "YAML syntax error" in msg and "line" in msg


def test_duplicate_frontends_across_services_are_refused():
    text = ("services:\n"
            "  - {name: a, vip: 10.96.0.1, ports: [{port: 80}]}\n"
            "  - {name: b, vip: 10.96.0.1, ports: [{port: 80}]}\n"
            "  - {name: c, vip: 10.96.0.1, ports: [{port: 80, protocol: UDP}]}\n")
    msg = problems(text)
    assert "services[1].vip: 10.96.0.1:80/TCP is already used by services[0] (default/a)" in msg
    assert "services[2]" not in msg  # UDP on the same port is another frontend


def test_duplicate_service_names_and_keys_are_refused():
    msg = problems("services:\n  - {name: a, vip: 10.96.0.1, ports: [{port: 80}]}\n"
                   "  - {name: a, vip: 10.96.0.2, ports: [{port: 80}]}\n")
    assert "services[1].name: service default/a is defined twice" in msg
    msg = problems("services:\n  - name: a\n    name: b\n")
    assert "services[0].name: is given twice" in msg


def test_every_problem_is_reported_at_once():
    msg = problems(one(vip="nope", algorithm="x", ports="[{port: 99999}]"))
    assert len(msg.splitlines()) == 3


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.load(str(tmp_path / "missing.yaml"))
    assert "missing.yaml: cannot read the file" in str(e.value)
