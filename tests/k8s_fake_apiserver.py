"""A local Kubernetes API server for Services and EndpointSlices, with real list/watch semantics.

No API server can be installed here, so the Kubernetes source is tested against this one. It
implements what the source relies on, the way kube-apiserver does it:

- One cluster-wide, monotonically increasing resourceVersion (etcd's revision), shared by
  every kind: a write to a slice moves the version a Service bookmark reports.
- GET  /api/v1/services, /apis/discovery.k8s.io/v1/endpointslices (and the namespaced forms)
  list: {"kind": "ServiceList", "metadata": {"resourceVersion": N}, "items": [...]}; items
  carry no kind/apiVersion, as the real API sends them.
- ?limit=L pages a list: metadata.continue (and remainingItemCount) while more remain; every
  page of one list is from the same snapshot, at the first page's resourceVersion. A continue
  token whose snapshot is compacted (or forgotten) is a 410 Expired; a continue with a
  resourceVersion other than "0" is a 400, as kube-apiserver answers.
- ?watch=true&resourceVersion=N streams, with Transfer-Encoding: chunked, one JSON event a
  line: every ADDED/MODIFIED/DELETED after N. No (or "0") resourceVersion first replays the
  current objects as ADDED. allowWatchBookmarks=true adds BOOKMARK events (on demand, every
  `bookmark_interval` seconds, and just before a timeoutSeconds ends the stream).
- A resourceVersion older than the compacted history gets a 200 stream with one ERROR event,
  a Status with code 410 "too old resource version: N (M)", then the end of the stream; with
  `gone_as_http_status` it gets an HTTP 410 Status instead (both happen in the wild).
- timeoutSeconds ends a watch cleanly (the chunked terminator).
- GET /api/v1/nodes/NAME for a node added with add_node().
- Pods (/api/v1/pods) and MeshPolicies (/apis/nodemesh.io/v1alpha1/meshpolicies) the same
  way; ?fieldSelector=spec.nodeName=X filters lists and watches by equality.

Test controls: put/delete objects (optionally without a watch event, to fake a missed one),
load() many at once (benchmarks), compact(), drop_watches() (the socket is shut, no chunked
terminator), hold_watches() (new watch requests wait), send_bookmarks(),
fail_requests(status), and `requests`, a log of every request as (path, query).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import itertools
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

Key = Tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Collection:
    resource: str      # the URL's plural
    kind: str
    api_version: str
    prefix: str        # /api/v1 or /apis/GROUP/VERSION


COLLECTIONS = {
    "services": Collection("services", "Service", "v1", "/api/v1"),
    "endpointslices": Collection("endpointslices", "EndpointSlice", "discovery.k8s.io/v1",
                                 "/apis/discovery.k8s.io/v1"),
    "pods": Collection("pods", "Pod", "v1", "/api/v1"),
    "meshpolicies": Collection("meshpolicies", "MeshPolicy", "nodemesh.io/v1alpha1",
                               "/apis/nodemesh.io/v1alpha1"),
}


def field_match(obj: dict, selector: str) -> bool:
    """fieldSelector of the form a.b=value[,c.d=value] (what nodemesh asks for: spec.nodeName)."""
    for term in filter(None, (selector or "").split(",")):
        path, _, want = term.partition("=")
        value: object = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value if value is not None else "") != want:
            return False
    return True
BY_KIND = {c.kind: c for c in COLLECTIONS.values()}


@dataclass
class _Event:
    resource_version: int
    resource: str
    type: str
    obj: dict


class _Stored(NamedTuple):
    obj: dict
    item: bytes  # the object as a list item (no kind/apiVersion), encoded once: lists are fast


class _Watch:
    def __init__(self, handler: "_Handler", resource: str):
        self.handler = handler
        self.resource = resource
        self.dropped = False
        self.bookmark_requested = False


class FakeApiServer:
    def __init__(self, bookmark_interval: Optional[float] = None, token: str = "fake-token",
                 host: str = "127.0.0.1"):
        self.bookmark_interval = bookmark_interval
        self.token = token
        self.gone_as_http_status = False
        self.requests: List[Tuple[str, Dict[str, str]]] = []
        self._cond = threading.Condition()
        self._resource_version = 100
        self._compacted = 100  # a watch from below this is answered 410
        self._objects: Dict[str, Dict[Key, _Stored]] = {name: {} for name in COLLECTIONS}
        self._nodes: Dict[str, dict] = {}
        self._history: List[_Event] = []  # in resourceVersion order
        self._snapshots: Dict[int, Tuple[int, List[_Stored]]] = {}  # paged lists in progress
        self._snapshot_ids = itertools.count(1)
        self._watches: List[_Watch] = []
        self._watches_open = threading.Event()
        self._watches_open.set()
        self._failure: Optional[Tuple[int, str, str, Optional[str]]] = None
        # The socket belongs to the network namespace of the thread that makes it: a lab of
        # nodes builds this inside its fabric namespace, on the fabric's address.
        self._server = ThreadingHTTPServer((host, 0), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeApiServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-apiserver",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._watches_open.set()
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()

    def go_down(self) -> None:
        """Unreachable: the listener closes (connects are refused) and open watches end; the
        stored objects stay, and changes made meanwhile go into the history."""
        self.stop()

    def come_back(self) -> None:
        """Listen again on the same address, as a restarted API server would."""
        host, port = self._server.server_address[:2]
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.fake = self  # type: ignore[attr-defined]
        self.start()

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig pointing at this server over plain http with a bearer token."""
        text = (
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: fake\n  cluster:\n"
            f"    server: {self.url}\n"
            "users:\n- name: fake\n  user:\n"
            f"    token: {self.token}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
            "current-context: fake\n"
        )
        with open(path, "w") as f:
            f.write(text)
        return str(path)

    # -- state controls
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._resource_version

    # Stored objects are never changed in place, only replaced: events, list pages and
    # snapshots share them instead of copying.
    def put(self, obj: dict, emit: bool = True) -> dict:
        """Create or replace an object (by its kind, namespace and name); ADDED or MODIFIED.

        emit=False changes the state without a watch event: a missed event, for resync tests.
        """
        return copy.deepcopy(self._store(copy.deepcopy(obj), emit))

    def load(self, objects) -> None:
        """Store many objects (taking them over, not copying) with no watch events, and
        compact: as if they had existed before any watch began. For benchmarks."""
        for obj in objects:
            self._store(obj, emit=False)
        self.compact()

    def _store(self, obj: dict, emit: bool) -> dict:
        collection = BY_KIND[obj["kind"]]
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self._cond:
            known = self._objects[collection.resource].get(key)
            self._resource_version += 1
            meta["resourceVersion"] = str(self._resource_version)
            meta["uid"] = (known.obj["metadata"]["uid"] if known else None) or meta.get("uid") \
                or str(uuid.uuid4())
            item = json.dumps({k: v for k, v in obj.items() if k not in ("kind", "apiVersion")})
            self._objects[collection.resource][key] = _Stored(obj, item.encode())
            if emit:
                self._record(collection.resource, "MODIFIED" if known else "ADDED", obj)
            self._cond.notify_all()
        return obj

    def delete(self, kind: str, namespace: str, name: str, emit: bool = True) -> None:
        collection = BY_KIND[kind]
        with self._cond:
            obj = self._objects[collection.resource].pop((namespace, name)).obj
            self._resource_version += 1
            # A DELETED event carries the object as it was, at the deletion's version.
            obj = dict(obj, metadata=dict(obj["metadata"],
                                          resourceVersion=str(self._resource_version)))
            if emit:
                self._record(collection.resource, "DELETED", obj)
            self._cond.notify_all()

    def get(self, kind: str, namespace: str, name: str) -> dict:
        with self._cond:
            return copy.deepcopy(self._objects[BY_KIND[kind].resource][(namespace, name)].obj)

    def add_node(self, node: dict) -> None:
        with self._cond:
            self._nodes[node["metadata"]["name"]] = copy.deepcopy(node)

    def _record(self, resource: str, event_type: str, obj: dict) -> None:
        self._history.append(_Event(self._resource_version, resource, event_type, obj))

    def compact(self) -> int:
        """Forget the history up to now, as etcd compaction does. Returns the new floor."""
        with self._cond:
            self._compacted = self._resource_version
            self._history = [e for e in self._history if e.resource_version > self._compacted]
            return self._compacted

    # -- connection controls
    def drop_watches(self) -> None:
        """Cut every open watch connection without ending its stream."""
        with self._cond:
            for watch in self._watches:
                watch.dropped = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold_watches(self):
        """New watch requests wait (connected, no response yet) until the block exits."""
        self._watches_open.clear()
        try:
            yield
        finally:
            self._watches_open.set()

    def send_bookmarks(self) -> None:
        with self._cond:
            for watch in self._watches:
                watch.bookmark_requested = True
            self._cond.notify_all()

    def fail_requests(self, status: Optional[int], reason: str = "InternalError",
                      message: str = "injected failure", resource: Optional[str] = None) -> None:
        """Answer API requests (all, or one collection's) with this HTTP status; None: serve
        normally again."""
        self._failure = None if status is None else (status, reason, message, resource)

    def misbehave(self, delay: float = 0.0, garbage: Optional[bytes] = None) -> None:
        """Answer every request `delay` seconds late, or (garbage) with 200 and this body
        instead of JSON; misbehave() serves normally again."""
        self._delay, self._garbage = delay, garbage

    def open_watches(self, resource: str) -> int:
        with self._cond:
            return sum(1 for w in self._watches if w.resource == resource and not w.dropped)

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return predicate()

    def watch_requests(self, resource: str) -> List[Dict[str, str]]:
        return [q for path, q in list(self.requests)
                if path.endswith("/" + resource) and q.get("watch") in ("true", "1")]

    # -- serving (called from handler threads)
    SNAPSHOTS_KEPT = 16  # paged lists in progress; an older one's token gets a 410

    def _list_body(self, collection: Collection, namespace: Optional[str],
                   query: Dict[str, str]) -> Tuple[int, bytes]:
        """(HTTP status, body) of a list request, or of one page of it."""
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._cond:
            if token:
                if query.get("resourceVersion") not in (None, "", "0"):
                    return 400, _status_json(400, "BadRequest", "specifying resource version "
                                             "is not allowed when using continue")
                try:
                    position = json.loads(base64.urlsafe_b64decode(token))
                    snapshot_id, offset = position["id"], position["offset"]
                except (ValueError, KeyError, TypeError):
                    return 400, _status_json(400, "BadRequest", "invalid continue token")
                snapshot = self._snapshots.get(snapshot_id)
                if snapshot is None or snapshot[0] < self._compacted:
                    self._snapshots.pop(snapshot_id, None)
                    return 410, _status_json(
                        410, "Expired", "The provided continue parameter is too old to "
                        "display a consistent list result. You can start a new list without "
                        "the continue parameter.")
                version, objects = snapshot
            else:
                version, offset = self._resource_version, 0
                objects = [stored for (ns, _), stored
                           in sorted(self._objects[collection.resource].items())
                           if (namespace is None or ns == namespace) and
                           field_match(stored.obj, query.get("fieldSelector", ""))]
                snapshot_id = None
            end = len(objects) if limit <= 0 else offset + limit
            metadata = {"resourceVersion": str(version)}
            if end < len(objects):
                if snapshot_id is None:
                    snapshot_id = next(self._snapshot_ids)
                    self._snapshots[snapshot_id] = (version, objects)
                    while len(self._snapshots) > self.SNAPSHOTS_KEPT:
                        del self._snapshots[next(iter(self._snapshots))]
                metadata["continue"] = base64.urlsafe_b64encode(json.dumps(
                    {"id": snapshot_id, "offset": end}).encode()).decode()
                metadata["remainingItemCount"] = len(objects) - end
            elif snapshot_id is not None:
                self._snapshots.pop(snapshot_id, None)  # the last page: done with it
        head = json.dumps({"kind": collection.kind + "List",
                           "apiVersion": collection.api_version, "metadata": metadata})
        return 200, b"%s, \"items\": [%s]}" % (
            head[:-1].encode(), b", ".join(stored.item for stored in objects[offset:end]))

    def _bookmark(self, collection: Collection, resource_version: int) -> dict:
        obj = {"kind": collection.kind, "apiVersion": collection.api_version,
               "metadata": {"resourceVersion": str(resource_version),
                            "creationTimestamp": None}}
        if collection.kind == "EndpointSlice":
            obj.update({"addressType": "", "endpoints": None})
        else:
            obj.update({"spec": {}, "status": {"loadBalancer": {}}})
        return {"type": "BOOKMARK", "object": obj}


def gone_status(requested: int, oldest: int) -> dict:
    return _status_body(410, "Expired", f"too old resource version: {requested} ({oldest})")


def _status_body(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def _status_json(code: int, reason: str, message: str) -> bytes:
    return json.dumps(_status_body(code, reason, message)).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked encoding, as the real server
    # TCP_NODELAY, as Go (so kube-apiserver) sets it: otherwise a watch event written while
    # the previous one is unacknowledged waits for the client's delayed ACK, up to 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    @property
    def fake(self) -> FakeApiServer:
        return self.server.fake  # type: ignore[attr-defined]

    def do_GET(self):  # noqa: N802 - http.server's name
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.fake.requests.append((parts.path, query))
        if self.fake.token and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if getattr(self.fake, "_delay", 0):
            time.sleep(self.fake._delay)
        if getattr(self.fake, "_garbage", None) is not None:
            return self._send(200, self.fake._garbage)
        failure = self.fake._failure
        if failure is not None and (failure[3] is None or parts.path.endswith("/" + failure[3])):
            return self._status(*failure[:3])
        route = self._route(parts.path)
        if route is None:
            return self._status(404, "NotFound", f"the server could not find {parts.path}")
        if route[0] == "node":
            node = self.fake._nodes.get(route[1])
            if node is None:
                return self._status(404, "NotFound", f'nodes "{route[1]}" not found')
            return self._json(200, node)
        collection, namespace = route
        if query.get("watch") in ("true", "1"):
            return self._watch(collection, namespace, query)
        return self._send(*self.fake._list_body(collection, namespace, query))

    def _route(self, path: str):
        for collection in COLLECTIONS.values():
            if path == f"{collection.prefix}/{collection.resource}":
                return collection, None
            head = f"{collection.prefix}/namespaces/"
            if path.startswith(head) and path.endswith("/" + collection.resource):
                namespace = path[len(head):-len(collection.resource) - 1]
                if namespace and "/" not in namespace:
                    return collection, namespace
        if path.startswith("/api/v1/nodes/") and path.count("/") == 4:
            return "node", path.rsplit("/", 1)[1]
        return None

    # -- responses
    def _json(self, code: int, body: dict) -> None:
        self._send(code, json.dumps(body).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._json(code, _status_body(code, reason, message))

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, event: dict) -> None:
        self._chunk(json.dumps(event).encode() + b"\n")

    def _watch(self, collection: Collection, namespace: Optional[str], query: dict) -> None:
        fake = self.fake
        fake._watches_open.wait()
        timeout = float(query.get("timeoutSeconds") or 1800)
        deadline = time.monotonic() + timeout
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        requested = query.get("resourceVersion") or ""

        initial: List[dict] = []
        with fake._cond:
            if requested in ("", "0"):
                position = fake._resource_version
                for (ns, _), stored in sorted(fake._objects[collection.resource].items()):
                    if (namespace is None or ns == namespace) and \
                            field_match(stored.obj, query.get("fieldSelector", "")):
                        initial.append({"type": "ADDED", "object": stored.obj})
            else:
                position = int(requested)
                if position < fake._compacted:
                    oldest = fake._compacted + 1
                    if fake.gone_as_http_status:
                        status = gone_status(position, oldest)
                        return self._json(410, status)
                    initial = [{"type": "ERROR", "object": gone_status(position, oldest)}]
                    position = None  # the stream ends after the error
            watch = _Watch(self, collection.resource)
            fake._watches.append(watch)

        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        next_bookmark = (time.monotonic() + fake.bookmark_interval
                         if bookmarks and fake.bookmark_interval else None)
        try:
            for event in initial:
                self._event(event)
            while position is not None:
                with fake._cond:
                    while True:
                        start = len(fake._history)  # in order: walk back to what is new
                        while start and fake._history[start - 1].resource_version > position:
                            start -= 1
                        pending = [e for e in fake._history[start:]
                                   if e.resource == collection.resource]
                        now = time.monotonic()
                        bookmark_due = bookmarks and (watch.bookmark_requested or (
                            next_bookmark is not None and now >= next_bookmark))
                        if pending or watch.dropped or bookmark_due or now >= deadline:
                            break
                        wake = deadline if next_bookmark is None else min(deadline,
                                                                          next_bookmark)
                        fake._cond.wait(max(0.0, wake - now))
                    position = fake._resource_version
                    dropped = watch.dropped
                    watch.bookmark_requested = False
                if dropped:
                    # An abrupt end: no chunked terminator, the socket just goes away.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                for event in pending:
                    if (namespace is None or event.obj["metadata"].get("namespace") == namespace) \
                            and field_match(event.obj, query.get("fieldSelector", "")):
                        self._event({"type": event.type, "object": event.obj})
                if now >= deadline:
                    if bookmarks:  # the real server bookmarks just before a timeout
                        self._event(fake._bookmark(collection, position))
                    break
                if bookmark_due:
                    self._event(fake._bookmark(collection, position))
                    if next_bookmark is not None:
                        next_bookmark = time.monotonic() + fake.bookmark_interval
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            with fake._cond:
                if watch in fake._watches:
                    fake._watches.remove(watch)
