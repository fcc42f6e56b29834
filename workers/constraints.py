"""Structured output inside the engine: each constrained row carries an llguidance matcher; before
a row's token is chosen, its logits are masked to the tokens its grammar allows (EOS only where
the grammar may end), and the chosen token advances the matcher.

Grammars compile in a small thread pool, never on the engine thread (llguidance drops the GIL
while it builds one), so a newcomer's compile does not stall running rows: a constrained job
waits for its matcher before it is admitted. A compiled grammar is kept per constraint (a
bounded LRU) and each job gets a copy of it, which costs microseconds.
"""

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from llmq.constraints import OutputConstraint, grammar_of

COMPILED_KEPT = 256  # compiled grammars kept per worker
COMPILE_THREADS = 2
# A job whose grammar takes longer fails (invalid_input); the compile itself runs on. llguidance
# compiles realistic schemas in milliseconds (bench.structured).
COMPILE_LIMIT_S = 10.0


class ConstraintFailed(ValueError):
    """The constraint could not be compiled, or the grammar reached a state with no way on."""


class Constraints:
    """Matchers for one tokenizer: compiled off the engine thread and cached by constraint."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer = None
        self._compiled: OrderedDict[OutputConstraint, object] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def matcher(self, constraint: OutputConstraint) -> Future:
        """A future for a fresh matcher of the constraint (ConstraintFailed if it cannot be)."""
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, "llmq-grammar")
        if compiled is not None:
            done: Future = Future()
            done.set_result(compiled.deep_copy())
            return done
        return self._pool.submit(self._compile, constraint)

    def _compile(self, constraint: OutputConstraint):
        from llguidance import LLMatcher

        compiled = LLMatcher(self._tokenizer(), grammar_of(constraint), log_level=0)
        if compiled.is_error():
            raise ConstraintFailed(f"the constraint does not compile: {compiled.get_error()}")
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def _tokenizer(self):
        with self._lock:
            if self._lltokenizer is None:
                from llguidance.hf import from_tokenizer

                self._lltokenizer = from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._lltokenizer


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set to -inf, in place, every logit of these rows that their matcher does not allow.
    The rows' masks are computed together by llguidance's executor (in parallel, without the
    GIL), as bits that numpy unpacks: unpacking them with torch shifts cost several ms a step
    at 64 rows of a 32k vocabulary."""
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = np.zeros((len(rows), words), dtype=np.int32)
    targets = [(matcher, slot) for slot, matcher in enumerate(matchers)]
    _executor().unsafe_compute_mask_ptr(targets, bitmask.ctypes.data, words * 4, len(rows))
    # Bit k of word w allows token 32w + k: little-endian words, bits unpacked low first.
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    blocked = torch.from_numpy(allowed == 0).to(logits.device)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(blocked, float("-inf"))


@lru_cache(maxsize=1)
def _executor():
    from llguidance import LLExecutor

    return LLExecutor()
