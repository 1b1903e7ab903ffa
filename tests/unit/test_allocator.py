"""The agent's malloc set-up at start (daemon.tune_allocator). No root needed."""
import os
import subprocess
import sys
import textwrap

import pytest

# A fresh interpreter: the set-up must come before the process's first thread. Four threads
# each allocate blocks glibc serves from an arena (not pymalloc's: above 512 bytes), then
# malloc_info() says how many arenas the process has.
CHILD = textwrap.dedent("""
    import ctypes, re, sys, threading
    from nodemesh import daemon
    tuned = daemon.tune_allocator() if sys.argv[1] == "tuned" else False
    libc = ctypes.CDLL("libc.so.6")
    held, go = [], threading.Barrier(4)
    def work():
        go.wait()  # all four at once: each needs an arena while the others hold theirs
        held.append([bytearray(4096) for _ in range(200)])
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    libc.open_memstream.restype = ctypes.c_void_p
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print(tuned, len(re.findall(rb'<heap nr=', buf.value)))
""")


def arenas(mode: str) -> tuple:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_agent_keeps_one_malloc_arena_whatever_its_threads():
    tuned, count = arenas("tuned")
    if not tuned:
        pytest.skip("not glibc: nothing to set")
    assert count == 1
    # and the default it replaces: an arena for each thread that allocated
    assert arenas("default") == (False, 5)


def test_an_operators_own_malloc_setting_is_left_alone(monkeypatch):
    from nodemesh import daemon

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert daemon.tune_allocator() is False
