"""Models kept in an object store (`s3://bucket/prefix`, `gs://bucket/prefix`), read through
fsspec (s3fs, gcsfs: the `objectstore` extra). Each host downloads a model once into the data
directory, verifies it, and loads it from there like any local folder.

    <data_dir>/models/objectstore/<name>-<hash of URL and storage options>/
        .lock                         held while downloading (one download per host)
        .partial-<snapshot>-<random>/ a download in progress, removed by the next downloader
        <snapshot>/                   a complete, verified copy (the hash of the listing)
            config.json ... .llmq-manifest.json

A snapshot is named by the hash of the listing: every object's name, size and version (S3's
ETag, GCS's MD5 or generation), so new weights land in a new folder and never mix with old ones.
An object is verified as it is downloaded (its size, and its MD5 where the store tells it), and
its SHA-256 is written to the manifest. The folder is renamed into place only once every object
is in: a process killed midway leaves a `.partial-` folder that nothing reads.

ObjectStoreError
├── ObjectStoreExtraMissing  the fsspec backend for the URL's scheme is not installed
├── NoObjects                nothing under the URL
├── UnsafeObjectName         an object whose name would land outside the copy (`..`)
├── DownloadLockTimeout      another process held the download lock too long
└── ChecksumMismatch         a downloaded object is not what the store listed (retried)
"""

import base64
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import structlog
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

log = structlog.get_logger(__name__)

# Scheme -> the package that reads it (an fsspec backend).
BACKENDS = {"s3": "s3fs", "gs": "gcsfs"}
EXTRA = "objectstore"
URL_PATTERN = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<path>.*)$")
MANIFEST = ".llmq-manifest.json"
PARTIAL_PREFIX = ".partial-"
# Attempts per listing or object, backing off from 0.5 s to 10 s: about 15 s in all, beyond the
# retries botocore and s3fs make within each attempt.
ATTEMPTS = 5
# How long a process waits for another one's download of the same model.
LOCK_WAIT_S = 3600.0
HASH_CHUNK = 8 * 1024 * 1024


class ObjectStoreError(Exception):
    """A model could not be read from its object store."""


class ObjectStoreExtraMissing(ObjectStoreError):
    pass


class NoObjects(ObjectStoreError):
    pass


class UnsafeObjectName(ObjectStoreError):
    pass


class DownloadLockTimeout(ObjectStoreError):
    pass


class ChecksumMismatch(ObjectStoreError):
    pass


def url_scheme(source: str) -> str | None:
    """The scheme of a URL (`s3` of `s3://b/p`); None for a path, hub id or `builtin:` name."""
    match = URL_PATTERN.match(source)
    return match["scheme"].lower() if match else None


def is_object_store_url(source: str) -> bool:
    return url_scheme(source) in BACKENDS


def check_url(source: str) -> None:
    """ValueError saying what is wrong with an object-store URL."""
    scheme = url_scheme(source)
    if scheme not in BACKENDS:
        schemes = " and ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(f"{source!r}: scheme {scheme}:// is not supported; llmq reads {schemes}")
    bucket = URL_PATTERN.match(source)["path"].split("/", 1)[0]  # type: ignore[index]
    if not bucket:
        raise ValueError(f"{source!r} names no bucket: write {scheme}://bucket/prefix")


@dataclass(frozen=True)
class StoredObject:
    """One object under a model's URL, as the store lists it."""

    name: str  # relative to the URL, with `/` between folders
    size: int
    version: str  # changes whenever the content does: MD5, generation, ETag
    md5: str | None  # hex MD5 of the content, where the store tells it

    def line(self) -> str:
        return f"{self.name}\t{self.size}\t{self.version}"


@dataclass(frozen=True)
class Snapshot:
    """The objects under a model's URL at one listing."""

    url: str
    objects: tuple[StoredObject, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(o.line() for o in self.objects).encode()).hexdigest()

    @property
    def revision(self) -> str:
        """The weights' name for the completion cache (llmq/fingerprint.py)."""
        return "objects:" + self.digest[:32]

    def only(self, names: Collection[str]) -> "Snapshot":
        return Snapshot(self.url, tuple(o for o in self.objects if o.name in names))


def _stored_object(name: str, info: Mapping[str, Any]) -> StoredObject:
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    # S3's ETag is the MD5 of a single-part upload; a multipart one's ends in `-<parts>`.
    md5 = etag.lower() if re.fullmatch(r"[0-9a-fA-F]{32}", etag) else None
    if md5 is None and info.get("md5Hash"):  # GCS, base64
        md5 = base64.b64decode(info["md5Hash"]).hex()
    version = md5 or str(info.get("generation") or etag or info.get("LastModified") or "")
    return StoredObject(name, int(info["size"]), version, md5)


def _safe_name(url: str, name: str) -> str:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(part in ("..", ".") for part in parts):
        raise UnsafeObjectName(f"{url}: object {name!r} would be written outside the model folder")
    return name


def _is_transient(error: BaseException) -> bool:
    """Worth another attempt: a network or server error, or a download that came out wrong.
    A missing object, refused credentials or a bad setting will not mend by retrying."""
    permanent = (
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        ImportError,
        TypeError,
        ValueError,
    )
    if isinstance(error, ObjectStoreError):
        return isinstance(error, ChecksumMismatch)
    return not isinstance(error, permanent)


def _retrying(what: str, url: str, attempts: int) -> Retrying:
    def before_sleep(state) -> None:
        log.warning(
            "object store request failed; retrying",
            what=what,
            url=url,
            attempt=state.attempt_number,
            error=repr(state.outcome.exception()),
        )

    return Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=10) + wait_random(0, 0.5),
        retry=retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


def _file_hashes(path: Path, with_md5: bool) -> tuple[str, str | None]:
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            sha256.update(chunk)
            if md5 is not None:
                md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest() if md5 is not None else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStoreFolder:
    """A model folder in an object store, and this host's copies of it."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        check_url(url)
        self.url = url.rstrip("/")
        self.scheme = url_scheme(url) or ""
        self.root = URL_PATTERN.match(self.url)["path"].strip("/")  # type: ignore[index]
        self.storage_options = dict(storage_options or {})

    def cache_dir(self, data_dir: Path) -> Path:
        """This host's copies: named for the URL's last part, and a hash of the URL and the
        storage options (another endpoint may hold other objects under the same name)."""
        where = json.dumps([self.url, self.storage_options], sort_keys=True, default=str)
        digest = hashlib.sha256(where.encode()).hexdigest()[:12]
        name = re.sub(r"[^A-Za-z0-9._-]", "_", self.root.rsplit("/", 1)[-1])
        return data_dir / "models" / "objectstore" / f"{name}-{digest}"

    def filesystem(self):
        """The fsspec filesystem; credentials and endpoint come from its usual places."""
        import fsspec

        try:
            # No listings cache: each listing must see objects replaced since the last one.
            return fsspec.filesystem(
                self.scheme, **(self.storage_options | {"use_listings_cache": False})
            )
        except ImportError as error:
            package = BACKENDS[self.scheme]
            raise ObjectStoreExtraMissing(
                f"reading {self.url} needs the {package} package: "
                f"pip install 'llmq[{EXTRA}]' ({error})"
            ) from error

    def snapshot(self, attempts: int = ATTEMPTS) -> Snapshot:
        """The objects under the URL now (hidden ones, such as `.cache/`, left out)."""
        fs = self.filesystem()
        try:
            for attempt in _retrying("list", self.url, attempts):
                with attempt:
                    listing = fs.find(self.root, detail=True)
        except FileNotFoundError as error:  # no such bucket
            raise NoObjects(f"{self.url}: {error}") from error
        objects = []
        for path, info in sorted(listing.items()):
            if info.get("type", "file") != "file" or not path.startswith(self.root + "/"):
                continue
            name = _safe_name(self.url, path[len(self.root) + 1 :])
            if any(part.startswith(".") for part in PurePosixPath(name).parts):
                continue
            objects.append(_stored_object(name, info))
        if not objects:
            raise NoObjects(f"{self.url}: no objects under this URL")
        return Snapshot(self.url, tuple(objects))

    def fetch(self, data_dir: Path, names: Collection[str] | None = None) -> Path:
        """A verified local copy of the model's objects (only `names`, when given): the one
        already on this host, or one downloaded now."""
        cache_dir = self.cache_dir(data_dir)
        full = self.snapshot()
        complete = cache_dir / full.digest[:16]
        if _verified(complete, full):
            return complete
        snapshot = full if names is None else full.only(names)
        target = cache_dir / snapshot.digest[:16]
        if _verified(target, snapshot):
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        with self._download_lock(cache_dir / ".lock"):
            # Another process may have finished it while this one waited.
            if _verified(target, snapshot):
                log.info("using another process's download", url=self.url, path=str(target))
                return target
            self._download(snapshot, target)
        return target

    @contextmanager
    def _download_lock(self, path: Path) -> Iterator[None]:
        """Held while downloading: a second process on the host waits, then uses the copy."""
        from filelock import FileLock, Timeout

        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process's download", url=self.url)
            try:
                lock.acquire(timeout=LOCK_WAIT_S)
            except Timeout as error:
                raise DownloadLockTimeout(
                    f"{self.url}: another process has held {path} for {LOCK_WAIT_S:.0f} s; "
                    "is its download stuck?"
                ) from error
        try:
            yield
        finally:
            lock.release()

    def _download(self, snapshot: Snapshot, target: Path) -> None:
        """Download into a partial folder beside the target, verify, then rename it into place.
        Called with the download lock held, so any other partial folder is a dead process's."""
        cache_dir = target.parent
        for stale in cache_dir.glob(PARTIAL_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # failed verification: discarded whole
            shutil.rmtree(target)
        partial = cache_dir / f"{PARTIAL_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        fs = self.filesystem()
        started = time.perf_counter()
        total = sum(o.size for o in snapshot.objects)
        log.info("downloading model", url=self.url, objects=len(snapshot.objects), bytes=total)
        entries = []
        for stored in snapshot.objects:
            for attempt in _retrying("download", f"{self.url}/{stored.name}", ATTEMPTS):
                with attempt:
                    entries.append(self._download_object(fs, stored, partial / stored.name))
        manifest = {"url": self.url, "snapshot": snapshot.digest, "files": entries}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(partial)
        os.rename(partial, target)
        _fsync_dir(cache_dir)
        seconds = round(time.perf_counter() - started, 2)
        log.info("model downloaded", url=self.url, path=str(target), bytes=total, seconds=seconds)

    def _download_object(self, fs, stored: StoredObject, path: Path) -> dict[str, Any]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{self.root}/{stored.name}", str(path))
        size = path.stat().st_size
        if size != stored.size:
            raise ChecksumMismatch(
                f"{self.url}/{stored.name}: downloaded {size:,} bytes; "
                f"the store lists {stored.size:,}"
            )
        sha256, md5 = _file_hashes(path, with_md5=stored.md5 is not None)
        if md5 != stored.md5:
            raise ChecksumMismatch(
                f"{self.url}/{stored.name}: downloaded MD5 {md5}; the store lists {stored.md5}"
            )
        with path.open("rb+") as file:
            os.fsync(file.fileno())
        return {
            "name": stored.name,
            "size": stored.size,
            "version": stored.version,
            "sha256": sha256,
            "mtime_ns": path.stat().st_mtime_ns,
        }


def _verified(folder: Path, snapshot: Snapshot) -> bool:
    """The folder is a complete copy of the snapshot, its files as the manifest recorded them.
    A file whose modification time changed is hashed again."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = {entry["name"]: entry for entry in manifest.get("files", [])}
    if manifest.get("snapshot") != snapshot.digest or len(files) != len(snapshot.objects):
        return False
    for stored in snapshot.objects:
        entry = files.get(stored.name)
        path = folder / stored.name
        if entry is None or entry["version"] != stored.version:
            return False
        try:
            stat = path.stat()
        except OSError:
            return False
        if stat.st_size != entry["size"]:
            return False
        if (
            stat.st_mtime_ns != entry["mtime_ns"]
            and _file_hashes(path, False)[0] != entry["sha256"]
        ):
            return False
    return True


def local_copy(
    url: str,
    data_dir: Path,
    storage_options: Mapping[str, Any] | None = None,
    names: Collection[str] | None = None,
) -> Path:
    """The local folder holding the model at `url` (only `names`, when given; a full copy
    already on this host serves too), downloaded and verified on first use."""
    return ObjectStoreFolder(url, storage_options).fetch(data_dir, names)


def store_revision(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The weights' revision from one listing; None when the store cannot be read now."""
    try:
        return ObjectStoreFolder(url, storage_options).snapshot(attempts=1).revision
    except Exception as error:  # the completion cache is skipped, the request still served
        log.warning("cannot list the model's objects", url=url, error=repr(error))
        return None
