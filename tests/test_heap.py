"""The dreaming process's heap keeps the memory XLA frees for its next call (jaxdream.heap)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from jaxdream import heap, program_cache

from conftest import ROOT


FAULTS = """
import ctypes, resource
from jaxdream.heap import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
size = 64 * 2**20  # above glibc's largest mmap threshold (32 MB), as XLA's scratch memory
before = None
for round in range(6):  # malloc, write every page, free: what an XLA call does
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    before = faults() if round == 0 else before
print(applied, faults() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_freed_memory_is_kept_for_the_next_call_unless_opted_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Six 64 MB blocks one after another: with the heap kept, the first one's pages serve
    # the other five (no fault); with glibc's defaults each is a fresh mapping (16,384 faults
    # of 4 KB pages).
    def run(**env: str) -> tuple[str, int]:
        done = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                              check=True, cwd=ROOT, env={**os.environ, **env})
        applied, faults = done.stdout.split()
        return applied, int(faults)

    applied, faults = run()
    assert applied == "True" and faults < 2_000, faults
    applied, faults = run(JAXDREAM_MALLOC="system")
    assert applied == "False" and faults > 40_000, faults
    # A heap setting, not a program switch: keys stay.
    monkeypatch.delenv(heap.MALLOC_ENV, raising=False)
    plain = program_cache.program_key("x")
    monkeypatch.setenv(heap.MALLOC_ENV, "system")
    assert program_cache.program_key("x") == plain


def test_a_dreaming_process_collects_less_often(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracing allocates millions of short-lived objects; the CLI's model commands and the
    # workers raise the collector's thresholds (the conftest puts the test process's back).
    monkeypatch.setattr(heap, "keep_freed_memory", lambda: True)
    gc.set_threshold(700, 10, 10)
    heap.set_up()
    assert gc.get_threshold() == heap.COLLECTOR_THRESHOLDS == (100_000, 50, 100)
