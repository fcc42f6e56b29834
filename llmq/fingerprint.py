"""Completion-cache fingerprints: what identifies a deterministic completion, hashed.

A completion is deterministic when it is greedy (temperature 0) or seeded. Two requests get the
same text when they agree on:
- the model: its id, the queue it runs on (the device: CPU and GPU kernels round differently,
  and a greedy near-tie can go either way) and its weights, as a revision string;
- the prompt, exactly as the model receives it (for chat, the rendered template);
- every sampling parameter that can change the text. A greedy request ignores its seed, top_p
  and top_k, so they are left out of its fingerprint; everything else, stop strings, min_tokens,
  ignore_eos and prompt truncation included, is in. New SamplingParams fields join by default.

The revision comes from the API's view of the model, without loading it (no torch):
- `revision` in models.yaml, when set: the operator's name for these weights (a hub model is
  also loaded at that revision);
- else, for a local folder (built-in models included), a hash of the name, size and
  modification time of every file in it: config, tokenizer, chat template and weights;
- else, for a hub id, the commit of the snapshot in the local Hugging Face cache;
- else, for an object-store model (s3://, gs://), a hash of every object's name, size and
  version (ETag, MD5 or generation) as the store lists them now;
- a remote model (another server's weights, which may change without notice) has a revision
  only when models.yaml gives one: the operator's word that the upstream's weights are those.
A model whose revision cannot be told (a hub id never downloaded here, an object store that
cannot be listed right now) is not cached.
"""

import hashlib
import json
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmq.object_store import store_revision
from llmq.protocol import SamplingParams
from llmq.registry import ModelSpec

# Bump when the engine changes what text a request gets (sampling, stopping, detokenization),
# so that entries computed by the old code are never served again.
FINGERPRINT_VERSION = 1
# Sampling parameters that a greedy request does not use.
UNUSED_WHEN_GREEDY = ("seed", "top_p", "top_k")
# How long a model's revision is trusted before its folder is looked at again.
REVISION_REFRESH_S = 5.0
# How long a request waits for an object store's listing: it runs in a thread of its own, so a
# store that is slow or away costs a request this much at most (and its completion the cache).
STORE_WAIT_S = 1.0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def is_deterministic(params: SamplingParams) -> bool:
    """Greedy or seeded: the same request always gets the same text."""
    return params.greedy or params.seed is not None


def output_shaping_params(params: SamplingParams) -> dict:
    """The sampling parameters that can change the text of this request."""
    shaping = params.model_dump(mode="json")
    if params.greedy:
        for name in UNUSED_WHEN_GREEDY:
            shaping.pop(name)
    return shaping


@dataclass(frozen=True)
class Fingerprint:
    """A deterministic request, hashed: the completion cache's key, in the table's columns."""

    model: str
    model_revision: str
    prompt_hash: str
    params_fingerprint: str  # everything but the model id and the prompt

    @property
    def cache_key(self) -> str:
        """One hash of the whole key, stored on each job to find identical ones in flight."""
        return _sha256(f"{self.model}\n{self.prompt_hash}\n{self.params_fingerprint}")

    def as_json(self) -> dict[str, str]:
        return {
            "model_revision": self.model_revision,
            "prompt_hash": self.prompt_hash,
            "params_fingerprint": self.params_fingerprint,
        }


def fingerprint(
    spec: ModelSpec, revision: str, queue: str, prompt: str, params: SamplingParams
) -> Fingerprint:
    shaping = {
        "version": FINGERPRINT_VERSION,
        "revision": revision,
        "queue": queue,
        "params": output_shaping_params(params),
    }
    canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Fingerprint(spec.id, revision, _sha256(prompt), _sha256(canonical))


def folder_revision(folder: Path) -> str | None:
    """A hash of every file's name, size and modification time; None if the folder is missing."""
    if not folder.is_dir():
        return None
    entries = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue  # download caches and locks are not the model
        stat = path.stat()
        entries.append(f"{relative.as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return "files:" + _sha256("\n".join(entries))[:32]


def hub_revision(repo_id: str) -> str | None:
    """The commit of the snapshot this machine holds of a hub model, without asking the hub."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer.json"):
        cached = try_to_load_from_cache(repo_id, name)
        if isinstance(cached, str):
            return f"hub:{repo_id}@{Path(cached).parent.name}"
    return None


class ModelRevisions:
    """Each model's revision, re-read at most every REVISION_REFRESH_S: the submit path must not
    walk a model folder on every request, yet new weights must be noticed."""

    def __init__(
        self,
        data_dir: Path,
        refresh_s: float = REVISION_REFRESH_S,
        store_wait_s: float = STORE_WAIT_S,
    ) -> None:
        self.data_dir = data_dir
        self.refresh_s = refresh_s
        self.store_wait_s = store_wait_s
        self._known: dict[str, tuple[float, str | None]] = {}
        self._listings: dict[str, Future[str | None]] = {}
        self._lock = threading.Lock()

    def revision(self, spec: ModelSpec) -> str | None:
        now = time.monotonic()
        with self._lock:
            known = self._known.get(spec.id)
        if known is not None and now - known[0] < self.refresh_s:
            return known[1]
        revision = self._read(spec)
        with self._lock:
            self._known[spec.id] = (now, revision)
        return revision

    def forget(self, model: str) -> None:
        """Read the model's revision anew at its next request (its weights were reloaded)."""
        with self._lock:
            self._known.pop(model, None)

    def _read(self, spec: ModelSpec) -> str | None:
        if spec.revision is None and spec.is_object_store:
            return self._listed_revision(spec)  # off the request's thread: see STORE_WAIT_S
        return read_revision(spec, self.data_dir)

    def _listed_revision(self, spec: ModelSpec) -> str | None:
        """From a listing in a daemon thread, one at a time per model; None when it takes
        longer than store_wait_s (or fails)."""
        with self._lock:
            listing = self._listings.get(spec.id)
            if listing is None or listing.done():
                listing = self._listings[spec.id] = Future()
                threading.Thread(
                    target=_list_into, args=(listing, spec), name=f"list-{spec.id}", daemon=True
                ).start()
        try:
            return listing.result(timeout=self.store_wait_s)
        except FutureTimeout:
            return None


def _list_into(listing: Future, spec: ModelSpec) -> None:
    listing.set_result(store_revision(spec.files, spec.storage_options))  # never raises


def read_revision(spec: ModelSpec, data_dir: Path) -> str | None:
    """The model's revision as it is now (None: it cannot be told, so not cached). A worker
    reads it when it loads the model, and keeps no cache entry while its files say otherwise
    (new weights waiting for a reload)."""
    if spec.revision is not None:
        return f"rev:{spec.revision}"
    if spec.is_remote:
        return None  # another server's weights may change unseen: only a revision vouches
    if spec.is_object_store:
        return store_revision(spec.files, spec.storage_options)
    local = spec.local_path(data_dir)
    if local is not None:
        return folder_revision(local)
    return hub_revision(spec.source)


@lru_cache
def model_revisions(data_dir: Path) -> ModelRevisions:
    """The revisions this process has read, shared by every request."""
    return ModelRevisions(data_dir)
