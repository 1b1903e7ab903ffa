"""A program load that a burst of signals interrupts is tried again and succeeds.

The verifier gives up with EAGAIN when the loading thread has a signal pending (a profiler's
ptrace stops did it to the agent's compile). Here a child process sends SIGUSR1 to the test
as fast as it can; the first load runs under that burst and gets EAGAIN (libbpf's own five
immediate retries included); the retry's warning stops the burst, and the next attempt loads.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodemesh.datapath import compile as nm_compile

pytestmark = pytest.mark.root

SLOW_VERIFY = Path(__file__).resolve().parent.parent / "fixtures" / "slow_verify.c"
# Bounded by time too: a burst the test fails to stop ends by itself.
BURST = ("import os, signal, sys, time\n"
         "end = time.monotonic() + 20\n"
         "while time.monotonic() < end:\n"
         "    os.kill(int(sys.argv[1]), signal.SIGUSR1)\n")


class _StopBurstOnRetry(logging.Handler):
    def __init__(self, burst: subprocess.Popen) -> None:
        super().__init__()
        self.burst = burst
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.retries += 1
        self.burst.kill()
        self.burst.wait()


def test_program_load_interrupted_by_signals_is_tried_again_and_loads():
    from bcc import BPF

    # ~2000 loop iterations walked one by one: tens of ms in the verifier, as sock_lb.c's hooks.
    bpf = BPF(src_file=str(SLOW_VERIFY).encode(), cflags=["-DNM_TEST_ITERATIONS=2000"])
    signals = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signals.append(1))
    burst = subprocess.Popen([sys.executable, "-c", BURST, str(os.getpid())])
    stopper = _StopBurstOnRetry(burst)
    logger = logging.getLogger(nm_compile.__name__)
    logger.addHandler(stopper)
    try:
        deadline = time.monotonic() + 10
        while not signals and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals, "the signal burst never started"
        fn = nm_compile.load_program(bpf, "slow_verify", BPF.SOCKET_FILTER)
        assert fn.fd >= 0
        # The first attempt met the burst, so the load above went through the retry.
        assert stopper.retries >= 1
    finally:
        logger.removeHandler(stopper)
        burst.kill()
        burst.wait()
        signal.signal(signal.SIGUSR1, previous)
        bpf.cleanup()
