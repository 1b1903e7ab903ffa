"""Outlier ejection rules, with a fake clock (the kernel side is in tests/e2e/test_failover)."""
from prometheus_client import CollectorRegistry

from nodemesh.model import Backend, OutlierDetection, Service, ServicePort
from nodemesh.outlier import OutlierDetector


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def setup(n=4, pct=50, base=10.0, failures=3):
    svc = Service("web", "t", "10.96.0.1", (ServicePort(80, 8080),),
                  tuple(Backend(f"10.0.0.{i}") for i in range(1, n + 1)),
                  outlier_detection=OutlierDetection(failures, base, pct))
    clock, changes = Clock(), []
    det = OutlierDetector(CollectorRegistry(), changes.append, clock=clock)
    det.configure([svc])
    return det, clock, changes


def test_a_backend_is_ejected_at_the_nth_consecutive_failure_not_before():
    det, clock, changes = setup()
    det.on_failure("10.0.0.1", 8080, 2, 0)
    assert det.ejected() == set() and not changes
    det.on_failure("10.0.0.1", 8080, 3, 0)
    assert det.ejected() == {("t", "web", "10.0.0.1")}
    assert changes == [{("t", "web")}]


def test_a_returning_backend_counts_its_failures_afresh_without_a_map_write():
    det, clock, _ = setup(base=10, failures=3)
    det.on_failure("10.0.0.1", 8080, 3, 0)
    clock.now += 11
    det.expire()
    # the kernel's count goes on from 3 (nobody reset it): 4 and 5 are the 1st and 2nd
    det.on_failure("10.0.0.1", 8080, 4, 0)
    det.on_failure("10.0.0.1", 8080, 5, 0)
    assert det.ejected() == set()
    det.on_failure("10.0.0.1", 8080, 6, 0)
    assert det.ejected() == {("t", "web", "10.0.0.1")}
    # a success in between resets the kernel's count: below the baseline counts from zero
    clock.now += 100
    det.expire()
    det.on_failure("10.0.0.1", 8080, 3, 0)
    assert det.ejected() == {("t", "web", "10.0.0.1")}


def test_failures_on_another_port_or_an_unknown_endpoint_eject_nothing():
    det, *_ = setup()
    det.on_failure("10.0.0.1", 9999, 10, 0)
    det.on_failure("10.9.9.9", 8080, 10, 0)
    assert det.ejected() == set()


def test_ejection_lasts_base_times_the_number_of_ejections():
    det, clock, *_ = setup(base=10)
    det.on_failure("10.0.0.1", 8080, 3, 0)
    clock.now += 9.9
    assert det.expire() is not None and det.ejected()
    clock.now += 0.2
    det.expire()
    assert det.ejected() == set()
    det.on_failure("10.0.0.1", 8080, 3, 0)  # fails again at once: twice as long
    clock.now += 19.9
    det.expire()
    assert det.ejected()
    clock.now += 0.2
    det.expire()
    assert det.ejected() == set()


def test_time_back_in_service_forgives_earlier_ejections():
    det, clock, *_ = setup(base=10)
    for _ in range(2):
        det.on_failure("10.0.0.1", 8080, 3, 0)
        clock.now += 1000
        det.expire()
    clock.now += 1000  # long healthy stretch
    det.on_failure("10.0.0.1", 8080, 3, 0)
    clock.now += 10.1
    det.expire()
    assert det.ejected() == set()  # back to one base period


def test_no_more_than_max_ejection_percent_are_out_at_once():
    det, *_ = setup(n=4, pct=50)
    for i in (1, 2, 3):
        det.on_failure(f"10.0.0.{i}", 8080, 5, 0)
    assert len(det.ejected()) == 2


def test_at_least_one_backend_may_be_ejected_with_a_low_percentage():
    det, *_ = setup(n=3, pct=10)
    det.on_failure("10.0.0.1", 8080, 5, 0)
    det.on_failure("10.0.0.2", 8080, 5, 0)
    assert len(det.ejected()) == 1


def test_removed_backends_lose_their_ejection_state():
    det, *_ = setup()
    det.on_failure("10.0.0.1", 8080, 3, 0)
    det.configure([])
    assert det.ejected() == set()
