"""Models kept in an object store (`s3://bucket/prefix`, `gs://bucket/prefix`), read through
fsspec (s3fs, gcsfs: the `objectstore` extra): their URLs, their listing, and the download of
one object, checked against what the store lists. llmq/model_copies.py keeps each host's copies.

A snapshot is the listing of a model's folder: every object's name, size and version (S3's
ETag, GCS's MD5 or generation). Its hash names the weights, for the completion cache and for
the host's copy, so new weights never mix with old ones.

ObjectStoreError
├── ObjectStoreExtraMissing  the fsspec backend for the URL's scheme is not installed
├── NoObjects                nothing under the URL, or no such bucket
├── UnsafeObjectName         an object whose name would land outside the copy (`..`)
├── ChecksumMismatch         a downloaded object is not what the store listed (retried)
└── DownloadLockTimeout      another process held a download lock too long (model_copies)
"""

import base64
import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
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
# Attempts per listing or object, backing off from 0.5 s to 10 s: about 15 s in all, beyond the
# retries botocore and s3fs make within each attempt.
ATTEMPTS = 5
HASH_CHUNK = 8 * 1024 * 1024


class ObjectStoreError(Exception):
    """A model could not be read from its object store."""


class ObjectStoreExtraMissing(ObjectStoreError):
    pass


class NoObjects(ObjectStoreError):
    pass


class UnsafeObjectName(ObjectStoreError):
    pass


class ChecksumMismatch(ObjectStoreError):
    pass


class DownloadLockTimeout(ObjectStoreError):
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


def file_hashes(path: Path, with_md5: bool = False) -> tuple[str, str | None]:
    """A file's SHA-256, and its MD5 when asked for."""
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if with_md5 else None
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            sha256.update(chunk)
            if md5 is not None:
                md5.update(chunk)
    return sha256.hexdigest(), md5.hexdigest() if md5 is not None else None


def fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStoreFolder:
    """A model's folder in an object store."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        check_url(url)
        self.url = url.rstrip("/")
        self.scheme = url_scheme(url) or ""
        self.root = URL_PATTERN.match(self.url)["path"].strip("/")  # type: ignore[index]
        self.storage_options = dict(storage_options or {})

    @cached_property
    def fs(self):
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
        try:
            listing = _retrying("list", self.url, attempts)(self.fs.find, self.root, detail=True)
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

    def download(self, stored: StoredObject, path: Path) -> str:
        """Write one object to `path`, check it against the listing, and flush it to disk; its
        SHA-256. A transfer that fails or comes out wrong is tried again."""
        retrying = _retrying("download", f"{self.url}/{stored.name}", ATTEMPTS)
        return retrying(self._download, stored, path)

    def _download(self, stored: StoredObject, path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(f"{self.root}/{stored.name}", str(path))
        size = path.stat().st_size
        if size != stored.size:
            raise ChecksumMismatch(
                f"{self.url}/{stored.name}: downloaded {size:,} bytes; "
                f"the store lists {stored.size:,}"
            )
        sha256, md5 = file_hashes(path, with_md5=stored.md5 is not None)
        if md5 != stored.md5:
            raise ChecksumMismatch(
                f"{self.url}/{stored.name}: downloaded MD5 {md5}; the store lists {stored.md5}"
            )
        fsync(path)
        return sha256


def store_revision(url: str, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """The weights' revision from one listing; None when the store cannot be read now."""
    try:
        return ObjectStoreFolder(url, storage_options).snapshot(attempts=1).revision
    except Exception as error:  # the completion cache is skipped, the request still served
        log.warning("cannot list the model's objects", url=url, error=repr(error))
        return None
