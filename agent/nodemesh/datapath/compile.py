"""Compile and load the datapath with BCC, in this process or in a short-lived child.

BCC brings LLVM into the process: importing it costs ~60 MiB and a compile ~70 MiB more, for
the agent's whole life. The agent therefore compiles in a child (`python -m
nodemesh.datapath.compile`) that loads the programs, opens the pinned maps, passes every fd back
over a unix socket (SCM_RIGHTS) and exits, taking LLVM with it: the agent keeps ~30 MiB. A
compiler crash (LLVM aborts the process on some errors) also ends only the child.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

from .maps import MAPS, MapSizes

log = logging.getLogger(__name__)

RINGBUF = "failure_events"
FLOW_RINGBUF = "flow_events"  # bpf/lib/flow.h
_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"(lib/[\w./-]+)"[ \t]*$', re.M)


def source_text(path: Path, root: Optional[Path] = None,
                _seen: Optional[Set[Path]] = None) -> str:
    """The C source with its `#include "lib/..."` headers written in place.

    BCC rewrites map methods (`services.lookup(&key)`) only in the file it is handed, not in
    the headers that file includes, so the shared code in bpf/lib/ must reach it as one text.
    Each header is expanded once (they carry include guards anyway). "lib/x.h" names a file
    under bpf/ (the -I folder, `root`), from the program files and from lib/ headers alike."""
    seen = set() if _seen is None else _seen
    if root is None:
        root = path.parent.parent if path.parent.name == "lib" else path.parent

    def expand(match: "re.Match[str]") -> str:
        header = (root / match.group(1)).resolve()
        if header in seen:
            return ""
        seen.add(header)
        return f"/* {match.group(1)} */\n" + source_text(header, root, seen)

    return _LOCAL_INCLUDE.sub(expand, path.read_text())


# The verifier gives up with EAGAIN when a signal is pending (a profiler's ptrace stops, a
# SIGCHLD); libbpf retries BPF_PROG_LOAD 5 times at once, which a burst outlasts. Retry again,
# after a pause that lets the burst end, and only for EAGAIN: any other error is final.
LOAD_ATTEMPTS = 5
LOAD_RETRY_PAUSE = 0.05  # seconds before the 2nd attempt, doubled each time: 0.75 s in all


def load_program(bpf, function: str, prog_type: int, attach_type: int = -1,
                 attempts: int = LOAD_ATTEMPTS, pause: float = LOAD_RETRY_PAUSE):
    """bpf.load_func, tried up to `attempts` times while the kernel answers EAGAIN."""
    for attempt in range(1, attempts + 1):
        try:
            return bpf.load_func(function.encode(), prog_type, attach_type=attach_type)
        except Exception as e:  # BCC raises a bare Exception naming strerror(errno)
            if attempt == attempts or not _is_eagain(e):
                raise
            log.warning("loading BPF program %s: %s (attempt %d of %d); trying again in "
                        "%.2fs", function, e, attempt, attempts, pause)
            time.sleep(pause)
            pause *= 2
    raise AssertionError("unreachable")


def _is_eagain(e: Exception) -> bool:
    # BCC words it "Failed to load BPF program <name>: " + strerror(errno), from this call.
    return str(e).endswith(os.strerror(errno.EAGAIN))


# BCC optimises the module twice: clang's own -O2 pipeline runs while it compiles, then BCC runs
# LLVM's -O3 pipeline over the result (bpf_module.cc, run_pass_manager). The second pass alone
# makes near the same code (sock_lb.c: 0-4 % more instructions a program, the same per-connect
# cost in bench/sock_cost.py) for ~0.3 s less of clang's CPU, and the compile is on the critical
# path of every start (bench/results/controlplane.md, "The start's fixed costs").
SINGLE_OPT_PASS = ("-Xclang", "-disable-llvm-passes")


def compile_and_load(bpffs: str, sizes: MapSizes, src_dir) -> Tuple[object, Dict[str, int],
                                                                   Dict[str, int], float]:
    """(the BCC object, program fds by hook name, map fds by name, seconds)."""
    from bcc import BPF, lib  # Debian's python3-bpfcc

    from .loader import HOOKS

    cflags = [f'-DNM_PIN_DIR="{bpffs}"', f"-I{src_dir}", *sizes.cflags(), *SINGLE_OPT_PASS]
    started = time.monotonic()
    bpf = BPF(text=source_text(src_dir / "sock_lb.c").encode(), cflags=cflags)
    progs = {}
    for hook in HOOKS:
        fn = load_program(bpf, hook.function, hook.prog_type, hook.attach_type)
        progs[hook.name] = fn.fd
    # By fd, not bpf[name]: BCC's Python Table has no class for sk_storage or sockhash maps.
    maps = {spec.name: lib.bpf_table_fd(bpf.module, spec.name.encode()) for spec in MAPS}
    # A map the source does not declare (an older bpf/ loaded for before/after: sock_cost.py's
    # git:<ref> variants, upgrade checks) is left out; the agent's own bpf/ declares them all.
    maps = {name: fd for name, fd in maps.items() if fd >= 0}
    maps[RINGBUF] = bpf[RINGBUF.encode()].map_fd
    maps[FLOW_RINGBUF] = bpf[FLOW_RINGBUF.encode()].map_fd
    return bpf, progs, maps, time.monotonic() - started


def compile_in_child(bpffs: str, sizes: MapSizes, src_dir, tc=None) -> Tuple[Dict[str, int],
                                                                            Dict[str, int], float]:
    """Run the compile in a child; return the fds it passed back (now ours) and its time.
    With tc (a TcSettings), the child compiles the TC unit (tc_nodeport.c) instead."""
    return CompileChild(bpffs, sizes, src_dir, tc).result()


class CompileChild:
    """The compile, started in a child process now and collected by result(): the agent
    starts it before it builds its source (the Kubernetes client's import and config take a
    second of one CPU at start, the compile's clang four), so that both CPUs work from the
    start. abandon() ends a child whose result nobody will take."""

    def __init__(self, bpffs: str, sizes: MapSizes, src_dir, tc=None) -> None:
        import subprocess

        self._parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            env = dict(os.environ, NODEMESH_FD_SOCKET=str(child.fileno()))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "nodemesh.datapath.compile", bpffs,
                 json.dumps(asdict(sizes)), str(src_dir),
                 *([json.dumps(asdict(tc))] if tc is not None else [])],
                pass_fds=(child.fileno(),), env=env,
                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        except BaseException:
            self._parent.close()
            raise
        finally:
            child.close()

    def result(self) -> Tuple[Dict[str, int], Dict[str, int], float]:
        """Wait for the child: (program fds by name, map fds by name, its seconds)."""
        try:
            msg, fds, _, _ = socket.recv_fds(self._parent, 1 << 16, 64)
            rc = self._proc.wait()
        finally:
            self._parent.close()
        if not msg:
            raise RuntimeError(f"the compiler process died (exit {rc}); its messages are above")
        header = json.loads(msg)
        if not header["ok"]:
            for fd in fds:
                os.close(fd)
            raise RuntimeError(header["error"])
        names = header["progs"] + header["maps"]
        by_name = dict(zip(names, fds))
        return ({n: by_name[n] for n in header["progs"]},
                {n: by_name[n] for n in header["maps"]}, header["seconds"])

    def abandon(self) -> None:
        """End the child (the agent stops before it took the result): fds it sent are closed
        with the socket; maps it already pinned stay, as after any stopped start."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._parent.close()


def _child_main() -> int:
    sock = socket.socket(fileno=int(os.environ["NODEMESH_FD_SOCKET"]))
    bpffs, sizes, src_dir = sys.argv[1], MapSizes(**json.loads(sys.argv[2])), Path(sys.argv[3])
    try:
        if len(sys.argv) > 4:
            from .tc import TcSettings, compile_and_load_tc
            _bpf, progs, maps, seconds = compile_and_load_tc(
                bpffs, sizes, TcSettings(**json.loads(sys.argv[4])), src_dir)
        else:
            _bpf, progs, maps, seconds = compile_and_load(bpffs, sizes, src_dir)
    except Exception as e:  # BCC raises bare Exceptions; the message is what the user needs
        socket.send_fds(sock, [json.dumps({"ok": False, "error": str(e)}).encode()], [])
        return 1
    header = {"ok": True, "progs": list(progs), "maps": list(maps), "seconds": seconds}
    socket.send_fds(sock, [json.dumps(header).encode()], [*progs.values(), *maps.values()])
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
