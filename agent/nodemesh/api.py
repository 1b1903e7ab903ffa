"""The admin API: JSON over HTTP on a unix socket (mode 0600), read by `nodemesh status` etc.

    GET /v1/status     the agent, its datapath, its source and its last reconcile
    GET /v1/services   every programmed service with frontends, backends and kernel counters
    GET /v1/policy     compiled policies, workloads with their identities, kernel verdict counts
    GET /v1/policy/check?from=NS/POD|CGROUP&to=NS/SVC:PORT   what the kernel decides, and why
    GET /v1/flows      recent flow events (?since=SEQ&wait=SECONDS&service=NS/NAME&backend=ADDR
                       &verdict=V&limit=N): {"flows": [...], "seq": newest seen}

Callers are checked with SO_PEERCRED: root or the agent's own uid only, whatever the mode.
Every endpoint is read-only (GET). A state-changing endpoint must be listed in CHANGES_STATE,
which admits uid 0 only; any other method is refused with 405.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import TYPE_CHECKING, Any

from . import serving

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/nodemesh/agent.sock"


# `status` and `services` need one at a time; the cap keeps clients holding connections from
# using up the agent's descriptors (see serving).
MAX_CONNECTIONS = 64


# The endpoints that change the agent's state, each with the method that does: uid 0 only,
# even when the agent runs as another user. There are none today: changes come from the
# config or the Kubernetes API, never the admin socket.
CHANGES_STATE: frozenset = frozenset()


class _Handler(serving.Handler):
    agent: "Agent"

    def address_string(self) -> str:  # unix sockets have no client address
        return "unix"

    def _peer_uid(self) -> int:
        creds = self.connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                           struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid

    def _peer_allowed(self) -> bool:
        return self._peer_uid() in (0, os.getuid())

    def do_GET(self):  # noqa: N802
        if not self._peer_allowed():
            return self._send(403, {"error": "only root or the agent's user may ask"})
        path = self.path.split("?", 1)[0]
        if path == "/v1/status":
            return self._send(200, self.agent.status())
        if path == "/v1/services":
            return self._send(200, self.agent.services_view())
        if path in ("/v1/policy", "/v1/policy/check"):
            from urllib.parse import parse_qs, urlsplit

            from .policy import admin_view

            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            core = self.agent.core
            code, body = admin_view(core.policy if core else None, path, query)
            return self._send(code, body)
        if path == "/v1/flows":
            from .flowsapi import flows_view

            code, body = flows_view(self.agent.observability.flow_log, self.path)
            return self._send(code, body)
        return self._send(404, {"error": f"no such endpoint {path}"})

    def _change(self) -> None:
        path = self.path.split("?", 1)[0]
        if (self.command, path) not in CHANGES_STATE:
            return self._send(405, {"error": f"{self.command} {path}: the admin API is "
                                             f"read-only here"})
        if self._peer_uid() != 0:
            return self._send(403, {"error": "only root may change the agent's state"})
        return self._send(501, {"error": f"{self.command} {path} is not implemented"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _change  # noqa: N815

    def _send(self, code: int, obj: Any) -> None:
        body = json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("admin: " + fmt, *args)


class AdminServer:
    def __init__(self, agent: "Agent", path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _remove_stale_socket(path)
        handler = type("Handler", (_Handler,), {"agent": agent})
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # the socket is born 0600: no window with a wider mode
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            # Not 5: clients connecting while the agent is busy queue instead of EAGAIN.
            sock.listen(serving.BACKLOG)
        except OSError:
            sock.close()
            raise
        self.server = serving.Server(sock, handler, "admin", agent.registry, MAX_CONNECTIONS)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: str) -> None:
    """Make way for bind(): remove a socket nobody listens on (a killed agent's). Anything
    else at the path is someone's: refuse rather than delete it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise RuntimeError(f"--admin-socket {path}: something that is not a socket is there; "
                           f"not removing it, pass another path")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)  # a live agent with a full backlog would block a plain connect
    try:
        s.connect(path)
    except ConnectionRefusedError:  # only this says nobody listens (EAGAIN: a busy agent)
        os.unlink(path)
        return
    except OSError as e:
        raise RuntimeError(f"--admin-socket {path}: cannot tell whether an agent serves it "
                           f"({e.strerror}); not removing it") from None
    finally:
        s.close()
    raise RuntimeError(f"another agent is serving {path}; stop it first or pass "
                       f"--admin-socket")


class _UnixHTTPConnection(http.client.HTTPConnection):
    refused_patience = 0.5  # seconds
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        # A live agent can turn a connect away: EAGAIN while its backlog is full, ECONNREFUSED
        # between bind() and listen() as it starts. Both are retried with backoff, a refusal
        # only briefly: it is also all a killed agent's socket ever says.
        start = time.monotonic()
        delay = 0.01
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            try:
                self.sock.connect(self.unix_path)
                return
            except (BlockingIOError, ConnectionRefusedError) as e:
                self.sock.close()
                refused = isinstance(e, ConnectionRefusedError)
                patience = min(self.refused_patience, self.timeout) if refused else self.timeout
                if time.monotonic() + delay - start > patience:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


class AdminUnavailable(Exception):
    pass


def get(path: str, endpoint: str, timeout: float = 10.0) -> Any:
    """GET endpoint from the agent at socket path; raises AdminUnavailable with a clear text."""
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", endpoint)
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"null")
    except FileNotFoundError:
        raise AdminUnavailable(f"no agent is running: {path} does not exist") from None
    except ConnectionRefusedError:
        raise AdminUnavailable(f"no agent is listening on {path}") from None
    except BlockingIOError:
        raise AdminUnavailable(f"the agent at {path} accepted no connection in {timeout}s: "
                               f"its backlog is full") from None
    except PermissionError:
        raise AdminUnavailable(f"permission denied on {path}: run as root") from None
    except OSError as e:
        raise AdminUnavailable(f"talking to the agent at {path} failed: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise AdminUnavailable(f"agent answered {resp.status}: {data}")
    return data
