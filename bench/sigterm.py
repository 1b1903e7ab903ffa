"""SIGTERM ends a benchmark the way Ctrl-C does: through its `finally`, so its lab goes.

Python's default for SIGTERM (what `timeout`, a CI job's end or `kill` send) ends the process
at once, with no `finally`: a benchmark killed that way left its network namespaces, cgroups
with hooks attached, pins and servers behind (a later lab's reap_stale() removes them, but
only when one runs). Each benchmark that builds a lab calls exit_on_sigterm() first."""
from __future__ import annotations

import signal
import sys


def exit_on_sigterm() -> None:
    """From the main thread: SIGTERM raises SystemExit(143) there (128 + SIGTERM, the
    shell's status for it). A handler already set (not the default) is left alone."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
