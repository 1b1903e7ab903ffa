"""Without root, tests marked `root` are skipped with a reason, and only those: tests/conftest.py
runs against a small suite in a child pytest that believes it is not root."""
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

SUITE = '''
import pytest

@pytest.mark.root
def test_needs_root():
    assert False, "a root test ran without root"

@pytest.mark.parametrize("user", ["root", "nobody"])
def test_about_users(user):
    pass

def test_plain():
    pass
'''


def test_without_root_only_tests_marked_root_are_skipped(tmp_path):
    # The top-level conftest loads before tests/conftest.py, which reads the euid as it loads.
    (tmp_path / "conftest.py").write_text("import os\n\nos.geteuid = lambda: 1000\n")
    suite = tmp_path / "tests"
    suite.mkdir()
    shutil.copy(Path(__file__).parents[1] / "conftest.py", suite / "conftest.py")
    (suite / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    root: needs root\n")
    report = tmp_path / "report.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          f"--junitxml={report}", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        skipped = case.find("skipped")
        outcomes[case.get("name")] = "passed" if skipped is None else skipped.get("message")
    assert outcomes == {"test_needs_root": "needs root (BPF, network namespaces, cgroups)",
                        "test_about_users[root]": "passed", "test_about_users[nobody]": "passed",
                        "test_plain": "passed"}
