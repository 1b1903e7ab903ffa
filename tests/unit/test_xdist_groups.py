"""`make test` runs `--dist loadgroup`: a file with a module-scoped fixture (a lab, a loaded
datapath, a three-node cluster) must stay on one xdist worker, so that its set-up is made once
and not once per worker. tests/conftest.py runs against a small suite in a child pytest on
two workers."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

MODULE = '''
import os

import pytest


@pytest.fixture(scope="module")
def setup_once():
    with open(os.environ["SETUPS"], "a") as f:
        f.write(__name__ + "\\n")


@pytest.mark.parametrize("n", range(4))
def test_one_of_four(setup_once, n):
    pass
'''


def test_a_file_with_a_module_fixture_runs_on_one_worker_and_sets_up_once(tmp_path):
    suite = tmp_path / "tests"
    suite.mkdir()
    for name in ("conftest.py", "tcrun.py"):  # tcrun: the conftest's reaper of TC leftovers
        shutil.copy(Path(__file__).parents[1] / name, suite / name)
    for name in ("test_first.py", "test_second.py"):
        (suite / name).write_text(MODULE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    root: needs root\n")
    setups = tmp_path / "setups"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2",
                          "--dist", "loadgroup", "-v", str(suite)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SETUPS": str(setups)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 passed" in run.stdout, run.stdout
    # Without the group, each file's four tests spread over both workers: two set-ups each.
    assert sorted(setups.read_text().split()) == ["test_first", "test_second"], run.stdout
