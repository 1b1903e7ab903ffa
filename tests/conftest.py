"""Shared fixtures. Root-only tests are marked `root`; without root they are skipped, with a
reason. Every lab (netns, cgroup, pins, routes) is torn down even when a test fails, and a
session first reaps what an earlier, crashed run left."""
from __future__ import annotations

import os

import pytest

IS_ROOT = os.geteuid() == 0


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (--dist loadgroup)
def pytest_collection_modifyitems(config, items):
    _group_modules_that_share_a_setup(items)
    _start_slow_tests_first(items)
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, network namespaces, cgroups)")
    for item in items:
        # The marker itself: item.keywords would also match a test parametrized with "root".
        if item.get_closest_marker("root"):
            item.add_marker(skip)


def _group_modules_that_share_a_setup(items):
    """`make test` runs `--dist loadgroup`: a test is a unit of work on its own, so a file of a
    few long tests spreads over the workers instead of making the tail of the run. A file
    with a module-scoped fixture (a lab, a loaded datapath, servers started once) stays on one
    worker, as a group, so that its set-up is still made once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(defs and defs[-1].scope in ("module", "class", "package")
               for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def pytest_configure(config):
    if getattr(config.option, "loadgroup", False):  # an xdist worker of `--dist loadgroup`
        config.pluginmanager.register(_XdistGroupTags(), "nodemesh-xdist-group-tags")


class _XdistGroupTags:
    """pytest-xdist 3.8 tells the scheduler a test's group by appending "@group" to the node
    id it sends, through `item._nodeid`, which pytest 9.2 no longer reads (its node ids are
    structured: pytest-xdist#1386). The group was then silently lost and each grouped file's
    tests spread over every worker, each worker building the file's lab and compiling its
    programs again: 3 clusters of 3 agents for test_tc_cluster.py. Where xdist's tag did not
    take, tag the structured id the same way; a pytest that takes neither gets a warning."""

    @pytest.hookimpl(trylast=True)  # after xdist's own attempt
    def pytest_collection_modifyitems(self, config, items):
        lost = 0
        for item in items:
            names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                     for m in item.iter_markers("xdist_group")}
            tag = "@" + "_".join(sorted(names))
            if not names or item.nodeid.endswith(tag):
                continue
            tagged = item.nodeid + tag
            node_id = getattr(item, "_id", None)
            if node_id is not None and hasattr(type(node_id), "parse"):
                item._id = type(node_id).parse(tagged)
            lost += item.nodeid != tagged
        if lost:
            import warnings

            warnings.warn(f"{lost} tests lost their xdist_group: this pytest takes no group "
                          f"tag, so --dist loadgroup spreads each grouped file over the workers")


def _start_slow_tests_first(items):
    """Tests marked `slow` (20 s to 100 s each) go to the front of the queue, so that none of
    them starts near the end and runs alone while the other workers have finished: the short
    tests fill the end instead. xdist hands out a grouped file first anyway (the larger the
    group the sooner), and a group keeps the order of its tests (a stable sort, and grouped
    tests all sort as not slow)."""
    def late(item):
        return item.get_closest_marker("slow") is None or \
            item.get_closest_marker("xdist_group") is not None
    items.sort(key=late)


@pytest.fixture(scope="session", autouse=True)
def _reap_stale_labs():
    if IS_ROOT:
        from tcrun import reap_stale as reap_stale_tc

        from nodemesh.lab.topology import reap_stale

        reaped = reap_stale() + reap_stale_tc()
        if reaped:
            print(f"reaped labs left by an earlier run: {', '.join(reaped)}")
    yield


def _lab(host_link: bool):
    from nodemesh.lab.topology import new_lab

    lab = new_lab("nmt", backends=3, host_link=host_link)
    try:
        lab.start_servers(tcp_ports=(8080,), udp_ports=(5353,))
        yield lab
    finally:
        lab.destroy()


def _agent(lab, tmp_path):
    from helpers import AgentProcess

    proc = AgentProcess(lab, str(tmp_path))
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def lab():
    """A fresh lab: 3 backends running the lab server (TCP 8080, UDP 5353), torn down after."""
    yield from _lab(host_link=False)


@pytest.fixture(scope="module")
def module_lab():
    """One lab for a whole test module (for modules whose tests each set what they need)."""
    yield from _lab(host_link=False)


@pytest.fixture
def linked_lab():
    """A lab whose backends the host (where the agent and its health checks run) can reach:
    a veth from the host into the lab bridge; the lab's VIP range is blackholed in the host."""
    yield from _lab(host_link=True)


@pytest.fixture
def agent(lab, tmp_path):
    """`nodemesh run` for `lab`, not started: write_config() then start()."""
    yield from _agent(lab, tmp_path)


@pytest.fixture
def linked_agent(linked_lab, tmp_path):
    yield from _agent(linked_lab, tmp_path)
