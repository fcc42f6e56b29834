"""The worker's tokenizer keeps no cache of the words it has split: with a pre-tokenizer that does
not split prompts into words, each distinct prompt was an entry, and a worker grew with every job.

Resident memory does not show the cache dependably (freed heap absorbs it), so the test counts
the bytes the C heap has handed out and not taken back (glibc's mallinfo2), in its own process.
"""

import ctypes
import subprocess
import sys

import pytest

# Encodes 12,000 distinct 200-letter words, first with a tokenizer loaded as usual, then with the
# model host's, and prints how many bytes each left allocated.
ENCODE_DISTINCT_WORDS = """
import ctypes, random, string, sys
from pathlib import Path
from transformers import AutoTokenizer
from llmq.registry import ModelSpec
from workers.host import ModelHost

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2

def allocated():
    info = mallinfo2()
    return info.uordblks + info.hblkhd

def growth(encode, seed):
    rng = random.Random(seed)
    words = ["".join(rng.choices(string.ascii_lowercase, k=200)) for _ in range(12_000)]
    before = allocated()
    for word in words:
        encode(word)
    return allocated() - before

path = sys.argv[1]
plain = AutoTokenizer.from_pretrained(path)
spec = ModelSpec(id="tiny-llama", source=path, context_length=512)
host = ModelHost.load(spec, "cpu", Path(path).parent)
print(growth(lambda word: plain(word).input_ids, 1), growth(host.encode, 2))
"""


def test_the_model_hosts_tokenizer_does_not_grow_with_distinct_prompts(tiny_model_path):
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("this C library has no mallinfo2")
    done = subprocess.run(
        [sys.executable, "-c", ENCODE_DISTINCT_WORDS, str(tiny_model_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    plain, host = (int(n) for n in done.stdout.splitlines()[-1].split())  # after the log lines
    assert plain > 20 << 20, f"a plain tokenizer kept only {plain} bytes: nothing left to test"
    assert host < 2 << 20, f"the host's tokenizer kept {host} bytes"
