"""Weights to slots, and the round-robin order (pure functions, no kernel)."""
import random

import pytest

from nodemesh.model import Backend, HealthCheck, OutlierDetection, Service, ServicePort
from nodemesh.selection import (
    MAX_SLOTS,
    Context,
    all_eligible,
    eligible,
    expanded_sequence,
    slot_counts,
    slots_for,
    smooth_sequence,
)


def longest_ring_run(seq):
    """Longest run of one value, reading seq as a ring (the counter wraps around)."""
    if len(set(seq)) <= 1:
        return len(seq)
    doubled = seq + seq
    best = run = 1
    for a, b in zip(doubled, doubled[1:]):
        run = run + 1 if a == b else 1
        best = max(best, run)
    return best


@pytest.mark.parametrize("weights, counts", [
    ([1, 1, 1], [1, 1, 1]),
    ([3, 3, 6], [1, 1, 2]),          # reduced by the gcd
    ([100, 200, 300], [1, 2, 3]),
    ([0, 5, 5], [0, 1, 1]),          # weight 0 takes no slot
    ([0, 0], [0, 0]),
    ([7], [1]),
])
def test_weights_become_the_fewest_slots_in_the_same_ratio(weights, counts):
    assert slot_counts(weights) == counts


def test_huge_weights_are_apportioned_within_one_slot_and_every_backend_keeps_one():
    weights = [65535, 1, 30000, 777]
    counts = slot_counts(weights, max_slots=1000)
    assert sum(counts) == 1000
    assert min(counts) >= 1
    for w, c in zip(weights, counts):
        assert abs(c - 1000 * w / sum(weights)) <= 2  # the floor of 1 can add one


def test_more_backends_than_slots_is_refused():
    with pytest.raises(ValueError):
        slot_counts([1] * (MAX_SLOTS + 1))


def test_random_slots_repeat_each_backend_by_its_count():
    assert sorted(expanded_sequence([1, 0, 3])) == [0, 2, 2, 2]


def test_equal_weights_round_robin_is_a_plain_rotation():
    assert smooth_sequence([2, 2, 2]) == [0, 1, 2, 0, 1, 2]


def test_round_robin_never_sends_two_in_a_row_to_one_backend_unlike_nginx_swrr():
    # nginx's smooth WRR gives c a b c for 1:1:2, so c twice at every wrap.
    assert longest_ring_run(smooth_sequence([1, 1, 2])) == 1


def test_round_robin_has_no_bursts_for_any_weights_where_none_is_possible():
    rng = random.Random(20261123)  # fixed seed: the same 2,000 weight vectors every run
    checked = 0
    for _ in range(2000):
        weights = [rng.randint(1, 12) for _ in range(rng.randint(2, 8))]
        counts = slot_counts(weights)
        seq = smooth_sequence(counts)
        assert sorted(seq) == expanded_sequence(counts)  # exact proportions per cycle
        if max(counts) * 2 <= sum(counts):
            checked += 1
            assert longest_ring_run(seq) == 1, counts
    assert checked > 1000


def test_round_robin_stays_within_two_turns_of_the_ideal_share_at_every_point():
    rng = random.Random(7)
    for _ in range(300):
        counts = [rng.randint(1, 12) for _ in range(rng.randint(2, 6))]
        seq = smooth_sequence(counts)
        total = sum(counts)
        seen = [0] * len(counts)
        for step, i in enumerate(seq, 1):
            seen[i] += 1
            for j, c in enumerate(counts):
                assert abs(seen[j] - step * c / total) < 2


def test_a_dominant_backend_runs_no_longer_than_it_must():
    seq = smooth_sequence([1, 3])  # 3 of 4 slots: a run of 3 is unavoidable, 4 is not
    assert longest_ring_run(seq) == 3


def test_slots_for_picks_the_order_by_algorithm():
    assert sorted(slots_for("random", [1, 2])) == [0, 1, 1]
    assert slots_for("round_robin", [1, 1]) == [0, 1]


def b(address, **kw):
    return Backend(address=address, **kw)


def test_only_ready_backends_with_weight_take_new_connections():
    chosen, why = eligible([b("10.0.0.1"), b("10.0.0.2", ready=False),
                            b("10.0.0.3", weight=0), b("10.0.0.4", terminating=True,
                                                       ready=False)])
    assert [x.address for x in chosen] == ["10.0.0.1"] and why == "ready"


def test_serving_terminating_backends_are_used_when_none_is_ready():
    chosen, why = eligible([b("10.0.0.1", ready=False, serving=True, terminating=True),
                            b("10.0.0.2", ready=False, serving=False, terminating=True)])
    assert [x.address for x in chosen] == ["10.0.0.1"] and why == "terminating-fallback"


def test_no_eligible_backend_leaves_the_set_empty():
    assert eligible([b("10.0.0.1", ready=False, serving=False)]) == ([], "none")


def _random_service(rng, i):
    backends = tuple(
        Backend(f"10.1.{i % 250}.{j}", weight=rng.choice([0, 1, 1, 1, 2]),
                node=rng.choice([None, "n1", "n2"]), zone=rng.choice([None, "a", "b"]),
                ready=rng.random() < 0.85, serving=rng.random() < 0.9,
                terminating=rng.random() < 0.1)
        for j in range(rng.randint(0, 4)))
    return Service(
        f"s{i}", "ns", "10.96.0.1", (ServicePort(80, 8080),), backends,
        algorithm=rng.choice(["random", "round_robin", "maglev"]),
        health_check=rng.choice([None, None, HealthCheck()]),
        outlier_detection=rng.choice([None, None, OutlierDetection()]),
        extra_vips=rng.choice([(), (), ("fd00::1",)]),
        internal_traffic_policy=rng.choice(["Cluster", "Cluster", "Local"]),
        traffic_distribution=rng.choice([None, None, "PreferClose"]),
        panic_threshold_percent=rng.choice([0, 50, 50, 100, 150]))


def test_all_eligible_is_said_only_where_eligible_keeps_every_backend_for_ready():
    rng = random.Random(8)
    contexts = [Context(), Context("n1", "a"),
                Context("n1", "a", frozenset({("ns", f"s{i}", f"10.1.{i % 250}.0")
                                              for i in range(3000)}))]
    said = 0
    for i in range(3000):
        svc = _random_service(rng, i)
        for ctx in contexts:
            if all_eligible(svc, ctx):
                said += 1
                assert eligible(svc.backends, svc, ctx) == (list(svc.backends), "ready"), svc
    assert said > 20  # the fast answer is given, not only ever declined


def test_the_usual_service_is_simple_and_any_option_that_matters_makes_it_not():
    def svc(**options):
        return Service("a", "ns", "10.96.0.1", (ServicePort(80, 8080),), (Backend("10.1.0.1"),),
                       **options)

    assert svc().simple() and svc(algorithm="round_robin").simple()
    assert all_eligible(svc(), Context("n1", "a"))
    for options in ({"health_check": HealthCheck()}, {"outlier_detection": OutlierDetection()},
                    {"extra_vips": ("fd00::1",)}, {"external_ips": ("192.0.2.1",)},
                    {"load_balancer_ips": ("192.0.2.2",)}, {"algorithm": "maglev"},
                    {"internal_traffic_policy": "Local"},
                    {"traffic_distribution": "PreferClose"}, {"panic_threshold_percent": 101}):
        assert not svc(**options).simple(), options
        assert not all_eligible(svc(**options)), options
