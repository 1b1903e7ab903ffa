"""The file source: a YAML config file, or a folder of them, re-read when it changes and on
demand (SIGHUP).

Change detection polls (mtime, size, inode) of every file every `poll_interval` seconds,
through symlinks: it catches in-place writes, editors that rename a new file over the old one,
and ConfigMap `..data` symlink swaps alike, with no inotify dependency. 0.25 s keeps reloads
well within a second. Only the files that changed are read again.

A folder's files are one desired set. A file with a problem is rejected alone: its services
keep their last good state and the other files apply. A service or frontend that two files
define belongs to the first file in sorted order; the later file is rejected.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple, Union

from .. import config, meshconfig, threadname
from ..model import Service
from ..policy import Mesh
from . import Delta, OnChange, OnError, ServiceKey

log = logging.getLogger(__name__)

Stat = Optional[Tuple[int, int, int]]


@dataclass
class _File:
    stat: Stat
    parsed: Union[List[Service], config.ConfigError]
    good: Tuple[Service, ...] = ()  # the last services of this file that were applied
    mesh: Mesh = Mesh()             # its workloads and policies (the last good ones)


class FileSource:
    name = "file"

    def __init__(self, path: str, poll_interval: float = 0.25):
        self.path = path
        self.poll_interval = poll_interval
        self.is_folder = os.path.isdir(path)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._files: Dict[str, _File] = {}
        self._sent: Optional[Dict[ServiceKey, Service]] = None  # None: no full sync yet
        self._last_problem: Optional[str] = None  # reported once, not at every poll
        # Who claims each service and frontend, kept while every file is accepted, so that
        # a change to one file is checked against the others in time proportional to it.
        self._owners: Optional[Dict[object, str]] = None
        self._sent_mesh: Optional[Mesh] = None

    @staticmethod
    def _stat(path: str) -> Stat:
        try:
            st = os.stat(path)  # follows links: a ConfigMap swap changes the target's inode
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _scan(self, force: bool) -> Tuple[List[str], List[str]]:
        """Re-read what changed (everything if `force`). Returns the files read and removed."""
        paths = config.config_files(self.path) if self.is_folder else [self.path]
        read = []
        gone = set()
        for path in paths:
            st = self._stat(path)  # before reading: a write after it shows at the next poll
            if st is None and self.is_folder:
                gone.add(path)  # removed between the listing and now: as if never listed
                continue
            old = self._files.get(path)
            if force or old is None or old.stat != st:
                mesh = old.mesh if old else Mesh()
                try:
                    parsed: Union[List[Service], config.ConfigError] = config.load(path)
                    mesh = meshconfig.load(path)
                except config.ConfigError as e:
                    if self.is_folder and not os.path.lexists(path):
                        gone.add(path)  # removed while being read: the same
                        continue
                    parsed = e
                self._files[path] = _File(st, parsed, old.good if old else (), mesh)
                read.append(path)
        removed = [p for p in self._files if p not in paths or p in gone]
        for path in removed:
            del self._files[path]
        return read, removed

    def _desired(self) -> Tuple[Dict[ServiceKey, Service], List[str]]:
        """Every file's services, or its last good ones if it is rejected; and the rejections.
        Remembers the services of each file it accepts as that file's last good state."""
        claims = config.Claims()
        desired: Dict[ServiceKey, Service] = {}
        errors = []
        for path in sorted(self._files):
            f = self._files[path]
            result = f.parsed
            if not isinstance(result, config.ConfigError):
                problems = config.cross_file_problems(claims, path, result)
                if problems:
                    result = config.ConfigError(path, problems)
                else:
                    f.good = tuple(result)
            if isinstance(result, config.ConfigError):
                errors.append(str(result))
                for svc in f.good:  # what an earlier file took since is gone from here
                    if not claims.conflicts(svc):
                        claims.add(svc, path)
                        desired[svc.key] = svc
            else:
                desired.update((svc.key, svc) for svc in result)
        return desired, errors

    def _mesh(self) -> Mesh:
        """Every file's workloads and policies, in file order."""
        files = [self._files[p] for p in sorted(self._files)]
        return Mesh(tuple(w for f in files for w in f.mesh.workloads),
                    tuple(p for f in files for p in f.mesh.policies))

    def _sync(self, on_change: OnChange, on_error: OnError, force: bool = False) -> None:
        read, removed = self._scan(force)
        if not (read or removed):
            return
        mesh = self._mesh()
        if mesh != self._sent_mesh:
            # The next delta carries the new mesh; a sync that sends none sends it alone.
            pending = [mesh]
            first = self._sent_mesh is None

            def carry(delta: Delta) -> None:
                if pending:
                    delta = replace(delta, mesh=pending.pop())
                on_change(delta)
            self._sent_mesh = mesh
            try:
                self._sync_services(read, removed, carry, on_error)
            finally:
                if pending and not first:
                    on_change(Delta(mesh=pending.pop(), origin=", ".join(read + removed)))
                elif pending:  # the first sync was refused: send the mesh with the next
                    self._sent_mesh = None
            return
        self._sync_services(read, removed, on_change, on_error)

    def _sync_services(self, read: List[str], removed: List[str], on_change: OnChange,
                       on_error: OnError) -> None:
        log.info("config %s: %s", self.path, ", ".join(
            [f"read {os.path.basename(p)}" for p in read] +
            [f"{os.path.basename(p)} removed" for p in removed]))
        origin = ", ".join(read + removed)
        if len(read) == 1 and not removed and self._one_file(read[0], on_change, origin):
            return
        desired, errors = self._desired()
        self._owners = None if errors else self._claims()
        if self._sent is None:
            # The first sync is the whole set; while a file is rejected the whole set is not
            # known, and a full delta would delete that file's services wherever they run.
            if not errors:
                self._sent = desired
                on_change(Delta(upserts=tuple(desired.values()), full=True, origin=origin))
        else:
            old = self._sent
            # `is` first: an unchanged file keeps its Service objects, comparing them is slower
            upserts = tuple(svc for key, svc in desired.items()
                            if old.get(key) is not svc and old.get(key) != svc)
            deletes = tuple(k for k in old if k not in desired)
            self._sent = desired
            if upserts or deletes or not errors:  # an empty delta still says "reload applied"
                on_change(Delta(upserts=upserts, deletes=deletes, origin=origin))
        if errors:
            on_error("\n".join(errors))

    def _claims(self) -> Dict[object, str]:
        return {claim: path for path, f in self._files.items() for svc in f.good
                for claim in _claims_of(svc)}

    def _one_file(self, path: str, on_change: OnChange, origin: str) -> bool:
        """The common case, in time proportional to one file: every file was accepted, and
        this one's new services claim nothing another file has. False: use the full path."""
        f = self._files[path]
        owners, sent = self._owners, self._sent
        if owners is None or sent is None or isinstance(f.parsed, config.ConfigError):
            return False
        new = f.parsed
        if any(owners.get(claim, path) != path for svc in new for claim in _claims_of(svc)):
            return False  # a clash: the full path says who keeps what
        for svc in f.good:
            for claim in _claims_of(svc):
                del owners[claim]
        for svc in new:
            for claim in _claims_of(svc):
                owners[claim] = path
        keys = {svc.key for svc in new}
        deletes = tuple(svc.key for svc in f.good if svc.key not in keys)
        upserts = tuple(svc for svc in new if sent.get(svc.key) != svc)
        for key in deletes:
            del sent[key]
        sent.update((svc.key, svc) for svc in upserts)
        f.good = tuple(new)
        on_change(Delta(upserts=upserts, deletes=deletes, origin=origin))
        return True

    def reload(self) -> None:
        """Ask for a re-read of every file on the next poll (SIGHUP)."""
        self._reload.set()

    def start(self, on_change: OnChange, on_error: OnError) -> None:
        self._guarded(on_change, on_error, force=True)
        self._thread = threadname.Thread(target=self._run, args=(on_change, on_error),
                                        name="file-source", daemon=True)
        self._thread.start()

    def _guarded(self, on_change: OnChange, on_error: OnError, force: bool) -> None:
        """One sync; an unexpected exception is reported, never the end of the source."""
        try:
            self._sync(on_change, on_error, force)
            self._last_problem = None
        except config.ConfigError as e:  # the folder itself cannot be read
            self._report_once(on_error, str(e))
        except Exception as e:  # a bug must not stop reloads: report it, keep polling
            message = f"{self.path}: reading the config failed unexpectedly: {e!r}"
            if message != self._last_problem:
                log.exception("%s", message)
            self._report_once(on_error, message)

    def _report_once(self, on_error: OnError, message: str) -> None:
        if message != self._last_problem:
            self._last_problem = message
            on_error(message)

    def _run(self, on_change: OnChange, on_error: OnError) -> None:
        while not self._stop.is_set():
            self._reload.wait(self.poll_interval)
            if self._stop.is_set():
                break
            forced = self._reload.is_set()
            self._reload.clear()
            if forced:
                log.info("config %s: reload requested", self.path)
            self._guarded(on_change, on_error, forced)

    def stop(self) -> None:
        self._stop.set()
        self._reload.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def _claims_of(svc: Service) -> List[object]:
    """What a service takes that no other file may: its name and each of its frontends."""
    return [svc.key, *((vip, sp.port, sp.protocol) for vip in svc.vips for sp in svc.ports)]
