"""What the three maintained grammar engines cost a batched CPU decode loop, and what they enforce.

    python -m bench.grammars [--models stories260K,llama-25m] [--synthetic-vocab 32000]
                             [--rows 64] [--repeats 5] [--threads N]

xgrammar, llguidance (LLMatcher) and outlines-core (Index/Guide) each run on every model's
tokenizer, plus a byte-level BPE of `--synthetic-vocab` tokens trained here on the Python
standard library (the benchmark models' vocabularies are a few hundred tokens; real ones are
32k-150k, and mask work grows with the vocabulary). For each engine and tokenizer:

- tokenizer preparation, once;
- compiling a realistic JSON Schema (nested objects, $defs/$ref, an array with minItems/maxItems,
  enum, bounded integers, strings with maxLength and pattern, an optional property, anyOf): the
  first compile in the process, then the median of `--repeats` compiles of the same schema on
  the same engine objects (xgrammar answers these from its cache; the others have none); also a
  regex and a choice list, and making `--rows` matchers from the compiled grammar;
- one decode step at `--rows` rows: each row's matcher walks its own valid document (a random
  instance of the schema, split into the longest tokens that all three engines' masks allow, as
  a model would emit it), and a step fills all rows' bitmasks (each engine's batch API where it
  has one, `--threads` threads), applies them to a rows × vocab float32 logits tensor (one
  shared torch.compile'd kernel, as the bitmask layout is the same for all; eager torch and
  xgrammar's C++ kernel are timed beside it) and advances every matcher by its row's token.
  Every step checks that each row's token survived the mask and was accepted. Medians over
  `--repeats` walks of the steps all rows share, engines taking turns within each step; the
  first step is shown apart (llguidance builds its lexer lazily).

The candidates beside llguidance are not llmq's dependencies: `pip install xgrammar
outlines-core` first (jsonschema comes with the dev extra).

Then a table of JSON Schema features on the first tokenizer: a feature counts (✓) where the
schema compiles, every valid instance can be emitted under the mask up to EOS, and no invalid
one can (`✗ not enforced`: the engine compiles the keyword but lets the instance through).
"""

import argparse
import json
import os
import random
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import outlines_core
import torch
import xgrammar
from rich.console import Console
from rich.table import Table

from bench.models import benchmark_models
from workers.threads import apply_thread_defaults

console = Console(width=140)

ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 40},
        "city": {"type": "string", "maxLength": 30},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["street", "city", "zip"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
        "price": {"type": "number", "minimum": 0},
    },
    "required": ["sku", "quantity", "price"],
    "additionalProperties": False,
}
SCHEMA = {
    "title": "Customer",
    "type": "object",
    "$defs": {"address": ADDRESS, "order": ORDER},
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999999},
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "email": {"type": "string", "maxLength": 64, "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,4}$"},
        "status": {"enum": ["active", "suspended", "closed"]},
        "address": {"$ref": "#/$defs/address"},
        "orders": {
            "type": "array",
            "items": {"$ref": "#/$defs/order"},
            "minItems": 1,
            "maxItems": 3,
        },
        "contact": {"anyOf": [{"type": "string", "pattern": "^\\+[0-9]{8,12}$"}, {"type": "null"}]},
        "note": {"type": "string", "maxLength": 80},
    },
    "required": ["id", "name", "email", "status", "address", "orders", "contact"],
    "additionalProperties": False,
}
# outlines-core needs about 50 s for `[a-z][a-z0-9._]{0,19}@[a-z0-9-]{1,20}\.(com|org|net|io)` on a
# 384-token vocabulary (under 5 ms without the leading `[a-z]`), so the run uses the latter.
REGEX = r"[a-z0-9._]{1,20}@[a-z0-9-]{1,20}\.(com|org|net|io)"
CHOICES = ["positive", "negative", "neutral", "mixed", "off-topic"]
FIRST = ["Ann", "Bo", "Carla", "Dev", "Erin", "Farid", "Grace", "Hugo"]
LAST = ["Lee", "Smith", "Okafor", "Nguyen", "Garcia", "Kowalski"]
CITIES = ["Oslo", "Lyon", "Porto", "Austin", "Kyoto", "Leeds"]


def make_customer(rng: random.Random) -> dict:
    """A random valid instance of SCHEMA, with keys in the schema's order."""
    first, last = rng.choice(FIRST), rng.choice(LAST)
    customer = {
        "id": rng.randint(1, 999999),
        "name": f"{first} {last}",
        "email": f"{first.lower()}.{last.lower()}@example.com",
        "status": rng.choice(["active", "suspended", "closed"]),
        "address": {
            "street": f"{rng.randint(1, 999)} {rng.choice(LAST)} Street",
            "city": rng.choice(CITIES),
            "zip": f"{rng.randint(0, 99999):05d}",
        },
        "orders": [
            {
                "sku": f"{rng.choice(['ABC', 'QRS', 'XYZ'])}-{rng.randint(0, 9999):04d}",
                "quantity": rng.randint(1, 100),
                "price": round(rng.uniform(0, 500), 2),
            }
            for _ in range(rng.randint(1, 3))
        ],
        "contact": rng.choice([None, f"+{rng.randint(10**8, 10**11)}"]),
    }
    if rng.random() < 0.5:
        customer["note"] = rng.choice(["call after 5pm", "prefers email", "VIP since 2019"])
    return customer


# (feature, schema of property "v", valid values, invalid values)
FEATURES: list[tuple[str, dict, list, list]] = [
    ("pattern", {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, ["abc-12"], ["abc-123"]),
    (
        "pattern + maxLength",
        {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3},
        ["abc"],
        ["abcdef"],
    ),
    (
        "minLength/maxLength",
        {"type": "string", "minLength": 2, "maxLength": 4},
        ["abc"],
        ["a", "abcdef"],
    ),
    (
        "integer minimum/maximum",
        {"type": "integer", "minimum": 10, "maximum": 20},
        [15],
        [9, 21, 100],
    ),
    (
        "number minimum/maximum",
        {"type": "number", "minimum": 0.5, "maximum": 2.5},
        [1.5],
        [0.25, 3.5],
    ),
    (
        "minItems/maxItems",
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        [[1, 2]],
        [[1], [1, 2, 3, 4]],
    ),
    ("enum", {"enum": ["red", "green", 3]}, ["green", 3], ["blue", 4]),
    ("const", {"const": "fixed"}, ["fixed"], ["other"]),
    ("$ref", {"$ref": "#/$defs/point"}, [{"x": 1}], [{"x": "a"}, 5]),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, [5, True], ["x"]),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, [5, True], ["x"]),
    ("allOf", {"allOf": [{"type": "integer", "minimum": 0}, {"maximum": 10}]}, [5], [-1, 11]),
    (
        "additionalProperties false",
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        [{"a": 1}],
        [{"a": 1, "b": 2}],
    ),
    (
        "format date-time",
        {"type": "string", "format": "date-time"},
        ["2024-05-01T12:30:00Z"],
        ["yesterday", "2024-13-01T00:00:00Z"],
    ),
    ("format email", {"type": "string", "format": "email"}, ["ann@example.com"], ["not-an-email"]),
    (
        "uniqueItems",
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [[1, 2]],
        [[1, 1]],
    ),
]
POINT = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}


def feature_schema(property_schema: dict) -> dict:
    return {
        "type": "object",
        "$defs": {"point": POINT},
        "properties": {"v": property_schema},
        "required": ["v"],
    }


def dump(document) -> str:
    return json.dumps(document, separators=(",", ":"))


def check_feature_data() -> None:
    """The feature cases must be right by the JSON Schema validator, else the table lies."""
    checker = jsonschema.FormatChecker()
    for feature, property_schema, valid, invalid in FEATURES:
        validator = jsonschema.Draft202012Validator(
            feature_schema(property_schema), format_checker=checker
        )
        assert all(validator.is_valid({"v": value}) for value in valid), feature
        if property_schema.get("format") not in (None, *checker.checkers):
            continue  # jsonschema has no checker for it here (date-time needs rfc3339-validator)
        assert not any(validator.is_valid({"v": value}) for value in invalid), feature


def byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: which byte each character of a byte-level BPE
    token stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {byte: chr(byte) for byte in printable}
    for extra, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + extra)
    return {char: byte for byte, char in chars.items()}


@dataclass
class Vocab:
    """A tokenizer as the harness sees it: the HF tokenizer, the logits width, EOS, and which
    tokens spell each byte string."""

    name: str
    tokenizer: object
    size: int
    eos: int
    token_bytes: dict[int, bytes]
    spelled_by: dict[bytes, list[int]]
    longest: int

    @classmethod
    def load(cls, name: str, tokenizer, size: int) -> "Vocab":
        pieces = token_bytes(tokenizer)
        spelled_by: dict[bytes, list[int]] = {}
        for token, piece in pieces.items():
            spelled_by.setdefault(piece, []).append(token)
        longest = max(map(len, spelled_by))
        return cls(name, tokenizer, size, tokenizer.eos_token_id, pieces, spelled_by, longest)

    def candidates(self, data: bytes, start: int) -> list[int]:
        """The tokens whose bytes begin data[start:], longest first."""
        stop = min(len(data), start + self.longest)
        return [
            t for end in range(stop, start, -1) for t in self.spelled_by.get(data[start:end], [])
        ]


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Each non-special token's bytes, for a byte-level BPE or a sentencepiece vocabulary with
    byte fallback (what outlines-core needs built by hand; the others do it themselves)."""
    decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str())["decoder"])
    special = set(tokenizer.all_special_ids)
    byte_level = byte_level_decoder() if "ByteLevel" in decoder else None
    result = {}
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if byte_level is not None:
            result[index] = bytes(byte_level[char] for char in token)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            result[index] = bytes([int(token[3:5], 16)])
        else:
            result[index] = token.replace("▁", " ").encode()
    return result


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE trained on the standard library's sources (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmq.tiny_model import SPECIAL_TOKENS

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((p.read_text(errors="ignore") for p in sources), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocab: Vocab, threads: int):
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            vocab.tokenizer, vocab_size=vocab.size, stop_token_ids=[vocab.eos]
        )
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile_json(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema))

    def compile_regex(self, regex: str):
        return self.compiler.compile_regex(regex)

    def matchers(self, compiled, rows: int) -> list:
        return [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        return xgrammar.BatchGrammarMatcher.batch_accept_token(matchers, tokens)


class LLGuidance:
    name = "llguidance"

    def __init__(self, vocab: Vocab, threads: int):
        self.tokenizer = llguidance.hf.from_tokenizer(
            vocab.tokenizer, n_vocab=vocab.size, eos_token=vocab.eos
        )
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def _matcher(self, grammar: str):
        # The matcher is the compiled form: lexer and masks are built lazily while decoding.
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def compile_json(self, schema: dict):
        return self._matcher(llguidance.LLMatcher.grammar_from_json_schema(schema))

    def compile_regex(self, regex: str):
        return self._matcher(llguidance.LLMatcher.grammar_from_regex(regex))

    def matchers(self, compiled, rows: int) -> list:
        return [compiled.deep_copy() for _ in range(rows)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        rows = [(matcher, row) for row, matcher in enumerate(matchers)]
        llguidance.torch.fill_next_token_bitmask_par(self.executor, rows, bitmask)

    def advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        return self.executor.consume_token_par(list(zip(matchers, tokens, strict=True)))


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab: Vocab, threads: int):
        # outlines-core takes each token's bytes; working them out is part of its preparation.
        by_bytes: dict[bytes, list[int]] = {}
        for token, data in token_bytes(vocab.tokenizer).items():
            by_bytes.setdefault(data, []).append(token)
        self.vocabulary = outlines_core.Vocabulary(vocab.eos, by_bytes)

    def compile_json(self, schema: dict):
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
        return outlines_core.Index(regex, self.vocabulary)

    def compile_regex(self, regex: str):
        return outlines_core.Index(regex, self.vocabulary)

    def matchers(self, compiled, rows: int) -> list:
        return [outlines_core.Guide(compiled) for _ in range(rows)]

    def fill(self, matchers: list, bitmask: torch.Tensor) -> None:
        # No batch API: one call per row.
        words = bitmask.shape[1]
        for row, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[row].data_ptr(), words, 4)

    def advance(self, matchers: list, tokens: list[int]) -> list[bool]:
        accepted = []
        for guide, token in zip(matchers, tokens, strict=True):
            try:
                guide.advance(token, return_tokens=False)
                accepted.append(True)
            except ValueError:
                accepted.append(False)
        return accepted


ENGINES = (XGrammar, LLGuidance, OutlinesCore)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf the logits of every token whose bit is 0 (bit j of word i is token 32i+j)."""
    bits = torch.arange(32, dtype=torch.int32).repeat(bitmask.shape[1])
    allowed = (torch.repeat_interleave(bitmask, 32, dim=1) >> bits) & 1
    logits.masked_fill_(allowed[:, : logits.shape[1]] == 0, float("-inf"))


def fused_apply(rows: int, size: int) -> tuple[str, Callable]:
    """apply_bitmask fused by torch.compile (tens of times faster than eager at 32k tokens; a
    few seconds to compile), or eager where it cannot compile."""
    kernel = torch.compile(apply_bitmask, dynamic=True)
    try:
        bitmask = torch.zeros(rows, (size + 31) // 32, dtype=torch.int32)
        kernel(torch.zeros(rows, size), bitmask)
    except Exception as error:
        console.print(f"torch.compile failed, masking eagerly: {error}")
        return "eager torch", apply_bitmask
    return "torch.compile", kernel


def seconds(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def ms(value: float) -> str:
    value *= 1e3
    return f"{value:,.3f}" if value < 1 else f"{value:,.2f}" if value < 100 else f"{value:,.0f}"


def guided_tokens(
    vocab: Vocab, text: str, grammars: list[tuple[object, object]]
) -> list[int] | None:
    """The text as the tokens a model could emit under every (engine, compiled grammar): at each
    step the longest token that starts the rest of the text and that all the masks allow, then
    EOS. None where the masks refuse the text (llguidance, for one, allows only the canonical
    tokens of text the grammar forces, so a plain longest-match split need not pass)."""
    data, tokens, start = text.encode(), [], 0
    rows = [(engine, engine.matchers(compiled, 1)) for engine, compiled in grammars]
    bitmask = torch.zeros(1, (vocab.size + 31) // 32, dtype=torch.int32)
    while True:
        masks = []
        for engine, matchers in rows:
            bitmask.zero_()
            engine.fill(matchers, bitmask)
            masks.append(bitmask[0].tolist())
        candidates = vocab.candidates(data, start) if start < len(data) else [vocab.eos]
        token = next(
            (t for t in candidates if all(mask[t >> 5] >> (t & 31) & 1 for mask in masks)), None
        )
        if token is None or token == vocab.eos:
            return tokens if token is not None else None
        if not all(engine.advance(matchers, [token])[0] for engine, matchers in rows):
            return None
        tokens.append(token)
        start += len(vocab.token_bytes[token])


def walk(
    grammars: list[tuple[object, object]], documents: list[list[int]], size: int, apply: Callable
) -> list[dict[str, list[float]]]:
    """Each engine's rows along their documents, one token per step, all rows in one batch; the
    engines take turns within every step, so other load on the machine weighs on all alike."""
    rows, steps = len(documents), min(map(len, documents))
    lanes = [(engine, engine.matchers(compiled, rows)) for engine, compiled in grammars]
    bitmask = torch.zeros(rows, (size + 31) // 32, dtype=torch.int32)
    logits, base = torch.empty(rows, size), torch.randn(rows, size)
    times: list[dict[str, list[float]]] = [{"fill": [], "apply": [], "advance": []} for _ in lanes]
    for step in range(steps):
        tokens = [document[step] for document in documents]
        for (engine, matchers), spent in zip(lanes, times, strict=True):
            bitmask.zero_()
            logits.copy_(base)
            started = time.perf_counter()
            engine.fill(matchers, bitmask)
            filled = time.perf_counter()
            apply(logits, bitmask)
            applied = time.perf_counter()
            accepted = engine.advance(matchers, tokens)
            advanced = time.perf_counter()
            kept = logits[range(rows), tokens] > float("-inf")
            if not (all(accepted) and bool(kept.all())):
                raise RuntimeError(f"{engine.name} refused a row's valid token at step {step}")
            spent["fill"].append(filled - started)
            spent["apply"].append(applied - filled)
            spent["advance"].append(advanced - applied)
    return times


def bench_vocab(vocab: Vocab, args) -> list[Table]:
    """The compile and decode-step tables for one tokenizer; rounds alternate between engines."""
    prepare, engines = {}, []
    for engine_class in ENGINES:
        prepare[engine_class.name], engine = seconds(lambda: engine_class(vocab, args.threads))  # noqa: B023
        engines.append(engine)
    timed: dict[str, dict[str, list[float]]] = {engine.name: {} for engine in engines}
    grammars = []
    for engine in engines:  # the first compile of each kind, with empty caches
        spent = timed[engine.name]
        spent["schema 1st"], compiled = seconds(lambda: engine.compile_json(SCHEMA))  # noqa: B023
        spent["regex"] = seconds(lambda: engine.compile_regex(REGEX))[0]  # noqa: B023
        choice = "(" + "|".join(CHOICES) + ")"
        spent["choice"] = seconds(lambda: engine.compile_regex(choice))[0]  # noqa: B023
        grammars.append((engine, compiled))
    for _ in range(args.repeats):
        for engine, compiled in grammars:
            spent = timed[engine.name]
            again = seconds(lambda: engine.compile_json(SCHEMA))[0]  # noqa: B023
            make = seconds(lambda: engine.matchers(compiled, args.rows))[0]  # noqa: B023
            spent.setdefault("schema again", []).append(again)
            spent.setdefault("matchers", []).append(make)
    compile_table = Table(
        title=f"{vocab.name} ({vocab.size:,} tokens): preparation and compile, ms"
        f" (again, matchers: medians of {args.repeats})"
    )
    for column in ("engine", "tokenizer", "schema 1st", "schema again", "regex", "choice"):
        compile_table.add_column(column, justify="right")
    compile_table.add_column(f"{args.rows} matchers", justify="right")
    for name, spent in timed.items():
        cells = [
            spent[key] for key in ("schema 1st", "schema again", "regex", "choice", "matchers")
        ]
        medians = [statistics.median(c) if isinstance(c, list) else c for c in cells]
        compile_table.add_row(name, ms(prepare[name]), *map(ms, medians))

    # Each row its own customer, split into tokens every engine allows (the masks are computed
    # here untimed, one row at a time).
    rng = random.Random(0)
    documents = []
    for _ in range(args.rows):
        text = dump(make_customer(rng))
        tokens = guided_tokens(vocab, text, grammars)
        if tokens is None:
            raise RuntimeError(f"{vocab.name}: an engine refuses the valid document {text}")
        documents.append(tokens)
    kernel, apply = fused_apply(args.rows, vocab.size)
    steps = min(map(len, documents))
    step_table = Table(
        title=f"{vocab.name}: one decode step at {args.rows} rows, ms, median of"
        f" {args.repeats} walks × {steps - 1} steps"
    )
    for column in ("engine", "fill masks", "apply", "advance", "step", "1st step", "× best"):
        step_table.add_column(column, justify="right")
    # Per engine: each part's times and whole steps', the first step of every walk apart.
    parts: list[dict[str, list[float]]] = [{} for _ in grammars]
    for _ in range(args.repeats):
        for spent, times in zip(parts, walk(grammars, documents, vocab.size, apply), strict=True):
            times["step"] = [sum(step) for step in zip(*times.values(), strict=True)]
            times["1st step"] = times["step"][:1]
            for part, values in times.items():
                spent.setdefault(part, []).extend(values if part == "1st step" else values[1:])
    medians = [{part: statistics.median(values) for part, values in p.items()} for p in parts]
    best = min(median["step"] for median in medians)
    for (engine, _), median in zip(grammars, medians, strict=True):
        cells = [ms(median[part]) for part in ("fill", "apply", "advance", "step", "1st step")]
        step_table.add_row(engine.name, *cells, f"{median['step'] / best:.2f}")
    others = {"eager torch": apply_bitmask, "xgrammar's C++": xgrammar.apply_token_bitmask_inplace}
    others = {
        name: ms(apply_time(function, args.rows, vocab.size)) for name, function in others.items()
    }
    step_table.caption = (
        f"rows' documents are {steps}-{max(map(len, documents))} tokens; apply is {kernel}; "
        "the same masking alone by "
        + ", ".join(f"{name}: {value} ms" for name, value in others.items())
    )
    return [compile_table, step_table]


def apply_time(apply: Callable, rows: int, size: int) -> float:
    """Masking random bitmasks into rows × size logits, median of 20."""
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, (size + 31) // 32), dtype=torch.int32)
    logits = torch.randn(rows, size)
    return statistics.median(seconds(lambda: apply(logits, bitmask))[0] for _ in range(20))


def feature_cell(engine, vocab: Vocab, schema: dict, valid: list, invalid: list) -> str:
    try:
        compiled = engine.compile_json(schema)
    except Exception as error:  # any refusal to compile means unsupported
        return f"✗ error: {' '.join(str(error).split())[:100]}"
    grammar = [(engine, compiled)]
    if any(guided_tokens(vocab, dump({"v": value}), grammar) is None for value in valid):
        return "✗ refuses valid"
    if any(guided_tokens(vocab, dump({"v": value}), grammar) is not None for value in invalid):
        return "✗ not enforced"
    return "✓"


def feature_table(vocab: Vocab, threads: int) -> tuple[Table, list[str]]:
    """The feature table, and the compile errors its cells number."""
    check_feature_data()
    engines = [engine_class(vocab, threads) for engine_class in ENGINES]
    table = Table(title=f"JSON Schema features (✓ = compiles and enforces), on {vocab.name}")
    table.add_column("feature")
    for engine in engines:
        table.add_column(engine.name)
    errors: list[str] = []
    for feature, property_schema, valid, invalid in FEATURES:
        schema = feature_schema(property_schema)
        cells = []
        for engine in engines:
            cell = feature_cell(engine, vocab, schema, valid, invalid)
            if cell.startswith("✗ error: "):
                errors.append(f"[{len(errors) + 1}] {engine.name}, {feature}: {cell[9:]}")
                cell = f"✗ compile error [{len(errors)}]"
            cells.append(cell)
        table.add_row(feature, *cells)
    return table, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories260K,llama-25m")
    parser.add_argument("--synthetic-vocab", type=int, default=32000, help="0 to skip")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="mask threads for xgrammar and llguidance (default: half the cores, xgrammar's own)",
    )
    args = parser.parse_args()
    apply_thread_defaults()
    # The masking kernel is one pass over memory: on a shared machine its OpenMP team stalls
    # for a time slice whenever another process holds one of the cores.
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoTokenizer

    workdir = Path(tempfile.mkdtemp(prefix="llmq-bench-grammars-"))
    vocabs = []
    for name, model_dir in benchmark_models(args.models, workdir, console.print):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        size = max(AutoConfig.from_pretrained(model_dir).vocab_size, len(tokenizer))
        vocabs.append(Vocab.load(name, tokenizer, size))
    if args.synthetic_vocab:
        tokenizer = synthetic_tokenizer(args.synthetic_vocab)
        vocabs.append(Vocab.load(f"bpe-{args.synthetic_vocab // 1000}k", tokenizer, len(tokenizer)))
    for engine_class in ENGINES:  # process-wide first-use costs, kept out of every table
        engine_class(vocabs[0], args.threads).compile_json(feature_schema({"type": "integer"}))
    for vocab in vocabs:
        for table in bench_vocab(vocab, args):
            console.print(table)
    table, errors = feature_table(vocabs[0], args.threads)
    console.print(table)
    for error in errors:
        console.print(error)


if __name__ == "__main__":
    main()
