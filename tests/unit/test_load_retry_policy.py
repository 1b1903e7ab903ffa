"""compile.load_program tries a load again only while the kernel answers EAGAIN, a bounded
number of times; any other failure is final at once (the real burst: tests/datapath)."""
from __future__ import annotations

import errno
import os

import pytest

from nodemesh.datapath import compile as nm_compile


class _FakeBPF:
    """load_func fails with the given strerror texts in turn, then returns its attempt count."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.attempts = 0

    def load_func(self, name: bytes, prog_type: int, attach_type: int = -1) -> int:
        self.attempts += 1
        if self.failures:
            raise Exception(f"Failed to load BPF program {name!r}: {self.failures.pop(0)}")
        return self.attempts


EAGAIN = os.strerror(errno.EAGAIN)


def test_load_interrupted_twice_by_eagain_succeeds_on_the_third_attempt():
    bpf = _FakeBPF(EAGAIN, EAGAIN)
    assert nm_compile.load_program(bpf, "nm_connect4", 18, pause=0) == 3


def test_load_failing_with_eagain_every_time_gives_up_after_the_bounded_attempts():
    bpf = _FakeBPF(*[EAGAIN] * 10)
    with pytest.raises(Exception, match="Resource temporarily unavailable"):
        nm_compile.load_program(bpf, "nm_connect4", 18, attempts=5, pause=0)
    assert bpf.attempts == 5


def test_load_rejected_by_the_verifier_is_not_tried_again():
    bpf = _FakeBPF(os.strerror(errno.EACCES), EAGAIN)
    with pytest.raises(Exception, match="Permission denied"):
        nm_compile.load_program(bpf, "nm_connect4", 18, pause=0)
    assert bpf.attempts == 1
