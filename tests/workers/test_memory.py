"""Freed heap memory goes back to the operating system."""

import subprocess
import sys

import pytest

from workers.memory import release_free_memory

# In its own process: 200 MB of 4 KB blocks, all freed but the last, which pins the heap's top
# so that glibc cannot shrink it by itself.
HEAP = """
import ctypes, psutil
from workers.memory import release_free_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(4096) for _ in range(50_000)]
for block in blocks:
    ctypes.memset(block, 1, 4096)
held = psutil.Process().memory_info().rss
for block in blocks[:-1]:
    libc.free(block)
freed = psutil.Process().memory_info().rss
assert release_free_memory()
print(held >> 20, freed >> 20, psutil.Process().memory_info().rss >> 20)
"""


def test_release_gives_freed_heap_pages_back():
    if not release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    done = subprocess.run(
        [sys.executable, "-c", HEAP], capture_output=True, text=True, timeout=60, check=True
    )
    held, freed, released = (int(mb) for mb in done.stdout.split())
    assert freed > held - 20, "glibc gave the blocks back by itself: nothing left to test"
    assert released < freed - 150
