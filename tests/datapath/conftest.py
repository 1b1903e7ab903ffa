import pytest


def _loaded(lab):
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.reconciler import Reconciler

    dp = Datapath(lab.bpffs, lab.cgroup)
    try:
        rec = Reconciler(dp.load())
        rec.adopt()
        dp.attach()
        yield dp, rec
    finally:
        dp.close()
        cleanup(lab.bpffs)


@pytest.fixture
def loaded(lab):
    """(Datapath, Reconciler) on the lab, like `datapath`, with the Datapath at hand so that
    a test can restart it or write other maps."""
    yield from _loaded(lab)


@pytest.fixture(scope="module")
def module_loaded(module_lab):
    """`loaded` once for a whole module, on `module_lab`: its tests set the services (and
    policies) they need; the suite's time goes to traffic, not to set-up."""
    yield from _loaded(module_lab)


@pytest.fixture
def datapath(loaded):
    """The programs loaded into the lab's pin folder and attached to the lab's cgroup, with a
    reconciler to program them: the datapath without the agent around it."""
    yield loaded[1]
