"""--admin-socket removes only a stale socket, never someone's file (issue 7). No root needed."""
import socket

import pytest

from nodemesh.api import AdminServer, _remove_stale_socket


def test_an_existing_regular_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "agent.sock"
    path.write_text("important\n")
    with pytest.raises(RuntimeError, match="not a socket"):
        AdminServer(None, str(path))
    assert path.read_text() == "important\n"


def test_a_stale_socket_is_removed(tmp_path):
    path = tmp_path / "agent.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: what a killed agent leaves
    dead.close()
    _remove_stale_socket(str(path))
    assert not path.exists()


def test_a_live_socket_is_refused(tmp_path):
    path = str(tmp_path / "agent.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(RuntimeError, match="another agent is serving"):
            AdminServer(None, path)
    finally:
        live.close()
