"""The file source over a folder of configs (issue 8) and a single file: deltas, rejection of
one file alone, removal, duplicates across files, SIGHUP and ConfigMap symlink swaps."""
import os
import threading
import time

import pytest
from helpers import TIME_SCALE

from nodemesh import config
from nodemesh.sources import Delta
from nodemesh.sources.file import FileSource


def svc(name, vip, *backends, namespace="demo"):
    bes = ", ".join(f"{{address: {b}}}" for b in backends)
    return (f"  - {{name: {name}, namespace: {namespace}, vip: {vip}, ports: [{{port: 80}}], "
            f"backends: [{bes}]}}\n")


def write(path, *services, text=None):
    """Write then rename, as editors and ConfigMaps do: the poll never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text if text is not None else "services:\n" + "".join(services))
    os.replace(tmp, path)


class Recorder:
    """on_change / on_error for a source, with bounded waits."""

    def __init__(self):
        self.deltas, self.errors = [], []
        self.cond = threading.Condition()

    def change(self, delta):
        assert isinstance(delta, Delta)
        with self.cond:
            self.deltas.append(delta)
            self.cond.notify_all()

    def error(self, message):
        with self.cond:
            self.errors.append(message)
            self.cond.notify_all()

    def wait(self, deltas=0, errors=0, timeout=5.0):
        """Until `deltas` deltas and `errors` errors have arrived; then a short quiet spell
        in which no more may come."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.deltas) >= deltas and
                                      len(self.errors) >= errors, timeout * TIME_SCALE), \
                f"waited for {deltas} deltas and {errors} errors: {self.deltas} {self.errors}"
        time.sleep(0.1)
        assert (len(self.deltas), len(self.errors)) == (deltas, errors), (self.deltas,
                                                                          self.errors)

    @staticmethod
    def names(delta):
        return sorted(s.name for s in delta.upserts)


@pytest.fixture
def source():
    sources = []

    def start(path, rec, poll=0.02):
        src = FileSource(str(path), poll_interval=poll)
        sources.append(src)
        src.start(rec.change, rec.error)
        return src
    yield start
    for src in sources:
        src.stop()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "conf.d"
    d.mkdir()
    write(d / "a.yaml", svc("web", "10.96.0.1", "10.0.0.1"), svc("api", "10.96.0.2", "10.0.0.2"))
    write(d / "b.yml", svc("db", "10.96.0.3", "10.0.0.3"))
    return d


def test_the_first_delivery_is_full_and_reads_only_visible_yaml_files(folder, source):
    (folder / ".hidden.yaml").write_text(svc("x1", "10.96.1.1"))
    (folder / ".a.yaml.swp").write_text("junk")
    (folder / "#a.yaml#").write_text("junk")
    (folder / "a.yaml~").write_text("junk")
    (folder / "README.txt").write_text("junk")
    (folder / "sub").mkdir()
    write(folder / "sub" / "c.yaml", svc("nested", "10.96.1.2"))
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    (first,) = rec.deltas
    assert first.full and not first.deletes
    assert Recorder.names(first) == ["api", "db", "web"]


def test_a_change_to_one_file_sends_only_its_changed_services(folder, source):
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    write(folder / "a.yaml", svc("web", "10.96.0.1", "10.0.0.9"), svc("api", "10.96.0.2",
                                                                      "10.0.0.2"))
    rec.wait(deltas=2)
    delta = rec.deltas[1]
    assert not delta.full and not delta.deletes
    assert Recorder.names(delta) == ["web"]  # api is unchanged, db's file was not touched
    assert delta.upserts[0].backends[0].address == "10.0.0.9"
    assert "a.yaml" in delta.origin


def test_a_broken_file_is_rejected_alone_and_a_fixed_one_applies(folder, source):
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    write(folder / "a.yaml", text="services:\n  - name: web\n    colour: blue\n")
    write(folder / "b.yml", svc("db", "10.96.0.3", "10.0.0.4"))
    # Both writes may land in one poll or in two: wait for b's delta and a's error.
    with rec.cond:
        assert rec.cond.wait_for(lambda: rec.errors and any(
            Recorder.names(d) == ["db"] for d in rec.deltas[1:]), 5 * TIME_SCALE)
    assert all(not d.deletes for d in rec.deltas)  # web and api keep their last good state
    assert all("web" not in Recorder.names(d) for d in rec.deltas[1:])
    assert f"{folder / 'a.yaml'}:" in rec.errors[-1] and "colour: unknown field" in \
        rec.errors[-1]
    assert "b.yml" not in rec.errors[-1]
    n = len(rec.deltas)
    write(folder / "a.yaml", svc("web", "10.96.0.1", "10.0.0.7"), svc("api", "10.96.0.2",
                                                                      "10.0.0.2"))
    rec.wait(deltas=n + 1, errors=len(rec.errors))
    assert Recorder.names(rec.deltas[-1]) == ["web"]


def test_a_removed_file_deletes_its_services(folder, source):
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    os.unlink(folder / "a.yaml")
    rec.wait(deltas=2)
    assert sorted(rec.deltas[1].deletes) == [("demo", "api"), ("demo", "web")]
    assert not rec.deltas[1].upserts


def test_a_file_removed_between_listing_and_reading_is_removed_not_an_error(folder, source,
                                                                          monkeypatch):
    """The folder is listed, then each file read: one deleted in between (a ConfigMap swap, an
    editor's temporary file) is simply not there, as at the next poll."""
    from nodemesh import config

    listed = config.config_files
    monkeypatch.setattr(config, "config_files",
                        lambda path: listed(path) + [str(folder / "vanished.yaml")])
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)  # and no error
    assert sorted(s.name for s in rec.deltas[0].upserts) == ["api", "db", "web"]


def test_a_service_in_two_files_belongs_to_the_first_and_rejects_the_second(folder, source):
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    write(folder / "b.yml", svc("db", "10.96.0.3", "10.0.0.3"), svc("web", "10.96.0.9"),
          svc("new", "10.96.0.10"))
    rec.wait(deltas=1, errors=1)
    assert (f"{folder / 'b.yml'}: services[1].name: service demo/web is defined twice (also "
            f"{folder / 'a.yaml'} services[0])") in rec.errors[0]
    write(folder / "c.yaml", svc("other", "10.96.0.1"))  # a.yaml's frontend
    rec.wait(deltas=1, errors=2)
    assert (f"services[0].vip: 10.96.0.1:80/TCP is already used by {folder / 'a.yaml'} "
            f"services[0] (demo/web)") in rec.errors[1]


def test_the_first_delivery_waits_until_every_file_is_good(folder, source):
    # A full delta without a broken file's services would delete them where they run.
    write(folder / "b.yml", text="services:\n  - {name: db, vip: nope}\n")
    rec = Recorder()
    source(folder, rec)
    rec.wait(errors=1)
    assert "b.yml:2: services[0].vip: 'nope' is not an IPv4 or IPv6 address" in rec.errors[0]
    write(folder / "b.yml", svc("db", "10.96.0.3", "10.0.0.3"))
    rec.wait(deltas=1, errors=1)
    assert rec.deltas[0].full and Recorder.names(rec.deltas[0]) == ["api", "db", "web"]


def test_sighup_rereads_every_file(folder, source):
    rec = Recorder()
    src = source(folder, rec, poll=3600)  # only reload() reads
    rec.wait(deltas=1)
    # Same size, and the old mtime put back: polling cannot see this change, a reload does.
    path = folder / "b.yml"
    st = os.stat(path)
    path.write_text(path.read_text().replace("10.0.0.3", "10.0.0.8"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src._stat(str(path)) == (st.st_mtime_ns, st.st_size, st.st_ino)
    src.reload()
    rec.wait(deltas=2)
    assert Recorder.names(rec.deltas[1]) == ["db"]
    src.reload()  # nothing changed: an empty delta still says the reload applied
    rec.wait(deltas=3)
    assert not rec.deltas[2]


def test_a_configmap_symlink_swap_is_seen(tmp_path, source):
    """A mounted ConfigMap: web.yaml -> ..data/web.yaml, ..data -> ..<timestamp>; an update
    swaps ..data in one rename."""
    d = tmp_path / "cm"
    d.mkdir()
    (d / "..2024_01").mkdir()
    write(d / "..2024_01" / "web.yaml", svc("web", "10.96.0.1", "10.0.0.1"))
    os.symlink("..2024_01", d / "..data")
    os.symlink("..data/web.yaml", d / "web.yaml")
    rec = Recorder()
    source(d, rec)
    rec.wait(deltas=1)
    assert Recorder.names(rec.deltas[0]) == ["web"]  # ..data itself is not read
    (d / "..2024_02").mkdir()
    write(d / "..2024_02" / "web.yaml", svc("web", "10.96.0.1", "10.0.0.2"))
    os.symlink("..2024_02", d / "..data_tmp")
    os.replace(d / "..data_tmp", d / "..data")
    rec.wait(deltas=2)
    assert rec.deltas[1].upserts[0].backends[0].address == "10.0.0.2"


def test_a_single_file_works_as_before(tmp_path, source):
    f = tmp_path / "services.yaml"
    write(f, svc("web", "10.96.0.1", "10.0.0.1"))
    rec = Recorder()
    source(f, rec)
    rec.wait(deltas=1)
    assert rec.deltas[0].full and Recorder.names(rec.deltas[0]) == ["web"]
    write(f, svc("web", "10.96.0.1", "10.0.0.1"), svc("api", "10.96.0.2"))
    rec.wait(deltas=2)
    assert Recorder.names(rec.deltas[1]) == ["api"]
    write(f, text="services:\n  - name: web\n    vip: 10.96.0.1\n    vip: 10.96.0.5\n")
    rec.wait(deltas=2, errors=1)
    assert rec.errors[0] == f"{f}:4: services[0].vip: is given twice"
    os.unlink(f)
    rec.wait(deltas=2, errors=2)  # gone: an error, not a deletion of everything
    assert "cannot read the file" in rec.errors[1]


def test_hostile_reloads_are_rejected_and_the_next_good_edit_applies(folder, source):
    rec = Recorder()
    source(folder, rec)
    rec.wait(deltas=1)
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh",
                                                                            "bcdefghi"))
    for i, text in enumerate(["services:\n  - name: !foo web\n", laughs]):
        write(folder / "a.yaml", text=text)
        rec.wait(deltas=1, errors=i + 1)
    assert "billion laughs" in rec.errors[1]
    write(folder / "a.yaml", svc("web", "10.96.0.1", "10.0.0.5"))
    rec.wait(deltas=2, errors=2)
    assert rec.deltas[1].deletes == (("demo", "api"),)
    assert Recorder.names(rec.deltas[1]) == ["web"]


def test_the_reload_thread_survives_an_unexpected_exception(folder, source, monkeypatch):
    rec = Recorder()
    src = source(folder, rec)
    rec.wait(deltas=1)
    real_load, broken = config.load, threading.Event()

    def load(path):
        if broken.is_set():
            raise RuntimeError("a bug")
        return real_load(path)
    monkeypatch.setattr(config, "load", load)
    broken.set()
    write(folder / "b.yml", svc("db", "10.96.0.3", "10.0.0.6"))
    rec.wait(errors=1, deltas=1)  # reported once, though every poll now fails
    assert "reading the config failed unexpectedly: RuntimeError('a bug')" in rec.errors[0]
    assert src._thread.is_alive()
    broken.clear()
    rec.wait(deltas=2, errors=1)  # the next poll reads b.yml again, and applies it
    assert Recorder.names(rec.deltas[1]) == ["db"]


def test_a_one_file_change_is_checked_against_the_others_without_rereading_them(tmp_path):
    """The fast path (one file changed, every file accepted, no clash) must end where a fresh
    full read of the folder ends; a clash falls back to the full path, which rejects it."""
    folder = tmp_path / "conf"
    folder.mkdir()
    write(folder / "a.yaml", svc("a1", "10.96.0.1", "10.0.0.1"), svc("a2", "10.96.0.2", "10.0.0.1"))
    write(folder / "b.yaml", svc("b1", "10.96.1.1", "10.0.0.2"))
    source, rec = FileSource(str(folder)), Recorder()
    full_reads = []
    real = source._desired
    source._desired = lambda: full_reads.append(1) or real()
    folded = {}

    def apply(delta):
        if delta.full:
            folded.clear()
        for key in delta.deletes:
            folded.pop(key)
        folded.update((s.key, s) for s in delta.upserts)

    def sync():
        before = len(rec.deltas)
        source._sync(rec.change, rec.error)
        for delta in rec.deltas[before:]:
            apply(delta)

    def fresh():
        other, other_rec = FileSource(str(folder)), Recorder()
        other._sync(other_rec.change, other_rec.error, force=True)
        return {s.key: s for s in other_rec.deltas[0].upserts}

    source._sync(rec.change, rec.error, force=True)
    apply(rec.deltas[0])
    assert len(full_reads) == 1
    # one file changes: a service goes, one changes, one comes
    write(folder / "a.yaml", svc("a1", "10.96.0.1", "10.0.0.3"), svc("a3", "10.96.0.3", "10.0.0.1"))
    sync()
    assert len(full_reads) == 1 and folded == fresh()
    assert sorted(rec.deltas[-1].deletes) == [("demo", "a2")]
    assert Recorder.names(rec.deltas[-1]) == ["a1", "a3"]
    # b takes a VIP that a holds: the full path rejects b, and a keeps it
    write(folder / "b.yaml", svc("b1", "10.96.0.1", "10.0.0.2"))
    sync()
    assert len(full_reads) == 2 and rec.errors and "10.96.0.1" in rec.errors[-1]
    assert folded[("demo", "b1")].vip == "10.96.1.1"  # its last good state
    # fixed: the full path again (a file was rejected), then the fast path is back
    write(folder / "b.yaml", svc("b1", "10.96.1.2", "10.0.0.2"))
    sync()
    assert len(full_reads) == 3 and folded == fresh()
    write(folder / "b.yaml", svc("b1", "10.96.1.3", "10.0.0.2"))
    sync()
    assert len(full_reads) == 3 and folded == fresh()
