"""This host's copies of object-store models (llmq/object_store.py), under the data directory:
downloaded once per host, checked, and never seen half-written.

    <data_dir>/models/objectstore/<name>-<hash of URL and storage options>/
        .lock                         held while downloading: one download per host
        .partial-<snapshot>-<random>/ a download in progress; the next downloader removes it
        <snapshot>/                   a complete copy, named by the listing's hash
            config.json ... .llmq-manifest.json

A process lists the model's folder and uses the copy of that listing if this host holds it. If
not, it takes the lock (a second process waits on it, then finds the first one's copy),
downloads into a partial folder, writes the manifest (each file's size, version and SHA-256),
and renames the folder into place. The lock is a file lock the system releases when its holder
dies, so a killed download blocks nobody, and its partial folder passes for nothing.
"""

import hashlib
import json
import re
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog

from llmq.object_store import (
    DownloadLockTimeout,
    ObjectStoreFolder,
    Snapshot,
    file_hashes,
    fsync,
)

log = structlog.get_logger(__name__)

MANIFEST = ".llmq-manifest.json"
PARTIAL_PREFIX = ".partial-"
# How long a process waits for another one's download of the same model.
LOCK_WAIT_S = 3600.0


def cache_dir(folder: ObjectStoreFolder, data_dir: Path) -> Path:
    """Where a model's copies lie: named for the URL's last part, and a hash of the URL and the
    storage options (another endpoint may hold other objects under the same name)."""
    where = json.dumps([folder.url, folder.storage_options], sort_keys=True, default=str)
    digest = hashlib.sha256(where.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", folder.root.rsplit("/", 1)[-1])
    return data_dir / "models" / "objectstore" / f"{name}-{digest}"


def local_copy(
    url: str,
    data_dir: Path,
    storage_options: Mapping[str, Any] | None = None,
    names: Collection[str] | None = None,
) -> Path:
    """The local folder holding the model at `url` (only `names`, when given; a whole copy
    already on this host serves too), downloaded and checked on first use."""
    folder = ObjectStoreFolder(url, storage_options)
    copies = cache_dir(folder, data_dir)
    full = folder.snapshot()
    wanted = full if names is None else full.only(names)
    if (held := _held_copy(copies, full, wanted)) is not None:
        return held
    copies.mkdir(parents=True, exist_ok=True)
    with _download_lock(copies / ".lock", url):
        # Another process may have finished one while this one waited.
        if (held := _held_copy(copies, full, wanted)) is not None:
            log.info("using another process's download", url=url, path=str(held))
            return held
        target = copies / wanted.digest[:16]
        _download(folder, wanted, target)
    return target


def _held_copy(copies: Path, *snapshots: Snapshot) -> Path | None:
    """This host's checked copy of the first of the snapshots it holds; None if none."""
    for snapshot in snapshots:
        if _verified(copy := copies / snapshot.digest[:16], snapshot):
            return copy
    return None


@contextmanager
def _download_lock(path: Path, url: str) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process's download", url=url)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout as error:
            raise DownloadLockTimeout(
                f"{url}: another process has held {path} for {LOCK_WAIT_S:.0f} s; "
                "is its download stuck?"
            ) from error
    try:
        yield
    finally:
        lock.release()


def _download(folder: ObjectStoreFolder, snapshot: Snapshot, target: Path) -> None:
    """Download into a partial folder beside the target, then rename it into place. Called with
    the lock held: any other partial folder is a dead process's."""
    copies = target.parent
    for stale in copies.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # it failed its check: replaced whole
        shutil.rmtree(target)
    partial = copies / f"{PARTIAL_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    started = time.perf_counter()
    total = sum(o.size for o in snapshot.objects)
    log.info("downloading model", url=folder.url, objects=len(snapshot.objects), bytes=total)
    files = []
    for stored in snapshot.objects:
        path = partial / stored.name
        sha256 = folder.download(stored, path)
        entry = {"name": stored.name, "size": stored.size, "version": stored.version}
        files.append(entry | {"sha256": sha256, "mtime_ns": path.stat().st_mtime_ns})
    manifest = {"url": folder.url, "snapshot": snapshot.digest, "files": files}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
    fsync(partial / MANIFEST)
    fsync(partial)
    partial.rename(target)
    fsync(copies)
    seconds = round(time.perf_counter() - started, 2)
    log.info("model downloaded", url=folder.url, path=str(target), bytes=total, seconds=seconds)


def _verified(copy: Path, snapshot: Snapshot) -> bool:
    """The folder is a complete copy of the snapshot, its files as the manifest recorded them. A
    file whose modification time changed is hashed again."""
    try:
        manifest = json.loads((copy / MANIFEST).read_text())
        files = {entry["name"]: entry for entry in manifest["files"]}
        if manifest["snapshot"] != snapshot.digest or len(files) != len(snapshot.objects):
            return False
        for stored in snapshot.objects:
            entry, path = files[stored.name], copy / stored.name
            stat = path.stat()
            if entry["version"] != stored.version or stat.st_size != entry["size"]:
                return False
            if stat.st_mtime_ns != entry["mtime_ns"] and file_hashes(path)[0] != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no copy, or one cut short
    return True
