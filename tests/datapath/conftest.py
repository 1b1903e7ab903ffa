import pytest


@pytest.fixture
def datapath(lab):
    """The programs loaded into the lab's pin folder and attached to the lab's cgroup, with a
    reconciler to program them: the datapath without the agent around it."""
    from nodemesh.datapath.loader import Datapath, cleanup
    from nodemesh.reconciler import Reconciler

    dp = Datapath(lab.bpffs, lab.cgroup)
    try:
        maps = dp.load()
        rec = Reconciler(maps)
        rec.adopt()
        dp.attach()
        yield rec
    finally:
        dp.close()
        cleanup(lab.bpffs)
