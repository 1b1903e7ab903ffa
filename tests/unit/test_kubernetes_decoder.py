"""The Kubernetes source's decoding worker (sources/kubernetes_decoder.py): a child process
that decodes list pages and hands back what the source would have parsed itself."""
import json
import os
import signal
from pathlib import Path

from nodemesh.sources.kubernetes_decoder import (
    DecodedPage,
    DecoderCrashed,
    PageDecoder,
    decode_page,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "k8s"


def page(kind: str, items, **metadata) -> bytes:
    return json.dumps({"kind": f"{kind}List", "apiVersion": "v1",
                       "metadata": {"resourceVersion": "42", **metadata},
                       "items": items}).encode()


def fixtures(prefix: str):
    return [json.loads(path.read_text()) for path in sorted(FIXTURES.glob(f"{prefix}-*.json"))]


def test_the_worker_hands_back_exactly_what_the_source_parses_itself():
    # Every fixture (named target ports, session affinity, dual stack, headless, external
    # name) plus a malformed service: records, notes and metadata the same either way.
    malformed = {"metadata": {"name": "bad", "namespace": "shop"},
                 "spec": {"clusterIP": "10.96.1.1", "ports": [{"port": "http"}]}}
    pages = [("service", page("Service", fixtures("service") + [malformed], **{"continue": "t"})),
             ("endpointslice", page("EndpointSlice", fixtures("endpointslice")))]
    crashes = []
    decoder = PageDecoder(crashes.append)
    with decoder.session():
        pending = [decoder.submit(kind, body) for kind, body in pages]
        answers = [decoder.result(p) for p in pending]
    for (kind, body), answer in zip(pages, answers):
        assert isinstance(answer, DecodedPage)
        assert answer == decode_page(kind, body)
    assert answers[0].metadata == {"resourceVersion": "42", "continue": "t"}
    assert [item.key for item in answers[0].items][-1] == ("shop", "bad")
    assert answers[0].items[-1].parsed is None and any("bad" in m for m in answers[0].invalid)
    assert any(item.parsed.service.session_affinity is not None
               for item in answers[0].items if item.parsed is not None)
    assert sum(len(item.parsed.backends) for item in answers[1].items) >= 4
    assert crashes == []


def test_a_page_that_is_not_json_fails_alone_and_the_worker_keeps_serving():
    decoder = PageDecoder(lambda why: None)
    with decoder.session():
        broken = decoder.submit("service", b"{\"items\": [}")
        good = decoder.submit("service", page("Service", fixtures("service")))
        try:
            decoder.result(broken)
        except ValueError as error:
            assert "JSONDecodeError" in str(error)
        else:
            raise AssertionError("a page that is not JSON was decoded")
        assert decoder.result(good).items
    assert decoder.crashes == 0


def test_a_killed_worker_fails_its_pages_is_counted_and_the_next_page_starts_another():
    crashes = []
    decoder = PageDecoder(crashes.append)
    with decoder.session():
        first = decoder.submit("service", page("Service", fixtures("service")))
        decoder.result(first)  # the worker is up
        worker = decoder._worker
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        lost = decoder.submit("service", page("Service", fixtures("service")))
        if lost is not None:  # given to the dead worker before its end was noticed
            try:
                decoder.result(lost)
            except DecoderCrashed:
                pass
        again = decoder.submit("service", page("Service", fixtures("service")))
        assert again is not None and decoder.result(again).items
    assert decoder.crashes == 1 and "signal 9" in crashes[0]


def test_after_too_many_crashes_no_worker_is_started(monkeypatch):
    crashes = []
    decoder = PageDecoder(crashes.append)
    monkeypatch.setattr(PageDecoder, "MAX_CRASHES", 1)

    def cannot_start(self):
        raise OSError("no more processes")

    monkeypatch.setattr(PageDecoder, "_start", cannot_start)
    with decoder.session():
        assert decoder.submit("service", page("Service", [])) is None
        assert decoder.submit("service", page("Service", [])) is None
    assert decoder.crashes == 1 and not decoder.usable
    assert "no more processes" in crashes[0] and "decoded in the agent's process" in crashes[0]
