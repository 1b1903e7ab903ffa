"""Shared fixtures. Root-only tests are marked `root`; without root they are skipped, with a
reason. Every lab (netns, cgroup, pins, routes) is torn down even when a test fails, and a
session first reaps what an earlier, crashed run left."""
from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, network namespaces, cgroups)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _reap_stale_labs():
    if IS_ROOT:
        from agent.lab.topology import reap_stale

        reaped = reap_stale()
        if reaped:
            print(f"reaped labs left by an earlier run: {', '.join(reaped)}")
    yield
