"""From services to datapath frontends (pure)."""
from nodemesh.model import Backend, Service, ServicePort
from nodemesh.reconciler import FrontendKey, desired_frontends


def test_each_vip_port_protocol_is_one_frontend_with_its_target_ports():
    svc = Service("web", "demo", "10.96.0.10",
                  (ServicePort(80, 8080, "TCP", "http"), ServicePort(53, 5353, "UDP", "dns")),
                  (Backend("10.0.0.1", 2), Backend("10.0.0.2", ports=(("http", 9090),))))
    fes = desired_frontends([svc])
    http = fes[FrontendKey(4, "10.96.0.10", 80, "TCP")]
    assert http.backends == (("10.0.0.1", 8080, 2), ("10.0.0.2", 9090, 1))
    assert http.port_name == "http" and http.namespace == "demo"
    dns = fes[FrontendKey(4, "10.96.0.10", 53, "UDP")]
    assert dns.backends == (("10.0.0.1", 5353, 2), ("10.0.0.2", 5353, 1))


def test_dual_stack_service_maps_each_family_to_its_own_backends():
    svc = Service("web", "demo", "10.96.0.10", (ServicePort(80, 80),),
                  (Backend("10.0.0.1"), Backend("fd00::1")), extra_vips=("fd00:96::10",))
    fes = desired_frontends([svc])
    assert fes[FrontendKey(4, "10.96.0.10", 80, "TCP")].backends == (("10.0.0.1", 80, 1),)
    assert fes[FrontendKey(6, "fd00:96::10", 80, "TCP")].backends == (("fd00::1", 80, 1),)


def test_not_ready_backends_are_left_out():
    svc = Service("web", "demo", "10.96.0.10", (ServicePort(80, 80),),
                  (Backend("10.0.0.1"), Backend("10.0.0.2", ready=False)))
    (fe,) = desired_frontends([svc]).values()
    assert fe.backends == (("10.0.0.1", 80, 1),) and fe.all_backends == 2
