"""`nodemesh cleanup` touches nothing that is not on bpffs, and the pin-folder lock says who
holds it (issue 7). No root needed."""
import os

from helpers import cli

from nodemesh.datapath import loader


def _precious(tmp_path):
    folder = tmp_path / "v"
    (folder / "sub").mkdir(parents=True)
    (folder / "data.txt").write_text("important\n")
    return folder


def _intact(folder):
    return (folder / "data.txt").read_text() == "important\n" and (folder / "sub").is_dir()


def test_cleanup_refuses_a_folder_that_is_not_on_bpffs(tmp_path):
    folder = _precious(tmp_path)
    res = cli("cleanup", "--bpffs", str(folder))
    assert res.returncode == 1
    assert "not bpffs" in res.stderr and "nothing removed" in res.stderr
    assert len(res.stderr.splitlines()) == 1 and res.stdout == ""
    assert _intact(folder)
    res = cli("cleanup", "--force", "--bpffs", str(folder))  # the lock only, never this
    assert res.returncode == 1 and _intact(folder)


def test_cleanup_refuses_it_when_named_by_the_environment_too(tmp_path, monkeypatch):
    folder = _precious(tmp_path)
    monkeypatch.setenv("NODEMESH_BPFFS", str(folder))
    res = cli("cleanup")
    assert res.returncode == 1 and "not bpffs" in res.stderr
    assert _intact(folder)


def test_the_folder_lock_is_exclusive_and_names_its_holder(tmp_path):
    fd = loader._lock(str(tmp_path))
    try:
        assert fd is not None
        assert loader._lock(str(tmp_path)) is None  # flock: even another fd of this process
        assert loader._holder(str(tmp_path)) == f" (pid {os.getpid()})"
    finally:
        os.close(fd)
    again = loader._lock(str(tmp_path))
    assert again is not None  # closing the fd (or dying) releases it
    os.close(again)
