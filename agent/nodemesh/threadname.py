"""OS names for the agent's threads, so that `top -H`, `ps -L` and /proc/PID/task/TID/comm
tell them apart (Python's thread names live only inside the interpreter before 3.14).

The kernel keeps 15 bytes of a name: `nm-` and the Python name with its long words
shortened ("kubernetes-endpointslice-watch" -> "nm-k8s-eps"). The main thread (the core
loop) keeps the process's own name, which `ps` and `pgrep` show for the whole agent."""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Optional

PR_SET_NAME = 15
_SHORT = {"kubernetes": "k8s", "service": "svc", "endpointslice": "eps", "meshpolicy": "mpol",
          "watch": "", "delivery": "dlv", "decoder": "dec", "failure": "fail", "events": "ev",
          "checks": "", "nodemesh": ""}
_libc: Optional[ctypes.CDLL] = None


def os_name(name: str) -> str:
    """The OS name of a thread called `name` in Python: at most 15 bytes."""
    words = [_SHORT.get(w, w) for w in name.split("-")]
    return ("nm-" + "-".join(w for w in words if w))[:15]


def set_os_name(name: str) -> None:
    """Name the calling thread in the kernel (prctl PR_SET_NAME); best effort: a libc without
    prctl leaves the thread as it is."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.prctl(PR_SET_NAME, os_name(name).encode(errors="replace"), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Thread(threading.Thread):
    """A threading.Thread that carries its name into the kernel when it starts."""

    def run(self) -> None:
        set_os_name(self.name)
        super().run()
