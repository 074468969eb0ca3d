"""The per-node file cache of remote datasets (and of decompressed shards), shared by every rank
and loader worker of a node.

Files come through mosaicml-streaming's own storage layer (``CloudDownloader``: ``s3://``,
``gs://``, ``oci://``, ``hf://``, ... with credentials and endpoints from the environment
variables streaming reads, e.g. ``S3_ENDPOINT_URL``); this module adds what a shared cache
needs around it:

* **one download per file per node**: a file lock (``fcntl.flock`` on ``<file>.lock``) around
  the download; whoever gets it second finds the file published and reuses it;
* **atomic publish**: data goes to ``<file>.<host>.<pid>.<random>.tmp`` and is renamed into
  place only when complete and verified, so a reader never sees a partial file and two hosts
  (or two processes with the same pid on two hosts of a shared file system) never collide;
* **verification**: when the index carries hashes (``xxh64``, ``sha1``, ...), the bytes are
  checked before they are published;
* **retries** with a timeout per attempt for transient errors; a file missing on the server is
  reported at once, by name;
* **bounded downloads**: a file whose size is known (the index's, or a metadata file's most)
  is fetched only up to that size: ``s3://`` objects are read with a ranged GET and the read
  stops one byte past it (a 400 MB object the index calls 2 KB costs 2 KB of disk); other
  schemes are checked as soon as streaming's downloader has written them;
* **a size limit with eviction**: after each publish, shard files are removed least recently
  used first until the cache is under ``limit`` bytes (metadata files are never evicted). A
  file evicted while a reader still needs it is simply fetched again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Callable

from soda_mega.data.streaming_compat import streaming_module

_NOT_FOUND_CODES = {"404", "403", "NoSuchKey", "NoSuchBucket", "AccessDenied"}


class CacheError(OSError):
    """A file could not be fetched or verified (the message names it)."""


class MissingRemoteFile(CacheError, FileNotFoundError):
    """The server says the file does not exist."""


class TooLarge(CacheError):
    """The server holds more bytes than the file may have (the download stopped there)."""

    def __init__(self, remote: str, limit: int, why: str) -> None:
        super().__init__(f"{remote}: more than {limit:,} bytes on the server ({why}); the "
                         "download stopped there")
        self.limit = limit


_CHUNK = 1 << 20


def is_remote(path: str) -> bool:
    """True for URLs streaming's storage layer serves (``s3://``, ``gs://``, ...), not ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def default_cache_dir() -> Path:
    """``$SODA_MEGA_CACHE`` or ``<tmp>/soda-mega-<uid>/data-cache`` (node-local on most clusters)."""
    env = os.environ.get("SODA_MEGA_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("TMPDIR", "/tmp")
    return Path(base) / f"soda-mega-{os.getuid()}" / "data-cache"


def unique_tmp(path: Path) -> Path:
    """A sibling name no other process on any host uses."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}."
                          f"{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_hashes(data: bytes, hashes: dict | None, what: str) -> None:
    """Raise :class:`CacheError` when ``data`` does not match one of the index's hashes."""
    if not hashes:
        return
    hashing = streaming_module("hashing")
    for algo, expected in sorted(hashes.items()):
        _compare(algo, hashing.get_hash(algo, data), expected, what)


def check_file_hashes(path: Path, hashes: dict | None, what: str) -> None:
    """:func:`check_hashes` of a file's bytes, read a chunk at a time (a shard is never held)."""
    if not hashes:
        return
    import hashlib

    import xxhash

    algos = sorted(hashes)
    # The algorithms of streaming.base.hashing: hashlib's, then xxhash's.
    state = {a: (getattr(hashlib, a, None) or getattr(xxhash, a))() for a in algos}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in state.values():
                h.update(chunk)
    for algo in algos:
        _compare(algo, state[algo].hexdigest(), hashes[algo], what)


def _compare(algo: str, got: str, expected: str, what: str) -> None:
    if got != expected:
        raise CacheError(f"{what}: {algo} hash {got} does not match the index's {expected} "
                         "(the file is damaged or was changed after the index was written)")


class NodeCache:
    """Files of remote datasets under ``root``, at most ``limit`` bytes of shards (0 = no limit)."""

    def __init__(self, root: str | Path | None = None, limit: int = 0, timeout: float = 60.0,
                 retries: int = 3) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.limit = int(limit)
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.hits = 0      # files this process found already published
        self.misses = 0    # files this process downloaded (or decompressed) itself
        self.evicted = 0   # files this process removed to stay under the limit
        self._local = threading.local()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ fetching
    def _downloader(self, remote: str):
        storage = streaming_module("storage")
        cache = getattr(self._local, "downloaders", None)
        if cache is None:
            cache = self._local.downloaders = {}
        scheme = (os.getpid(), remote.split("://", 1)[0])  # clients are not shared across a fork
        if scheme not in cache:
            cache[scheme] = storage.CloudDownloader.get(remote)
        return cache[scheme]

    def _download_once(self, remote: str, tmp: Path, limit: int | None = None,
                       why: str = "") -> None:
        try:
            downloader = self._downloader(remote)
            if limit is not None and _bounded_s3(downloader, remote):
                _s3_get_bounded(downloader, remote, tmp, limit, self.timeout, why)
            else:
                downloader.download(remote, str(tmp), self.timeout)
                if limit is not None and tmp.stat().st_size > limit:
                    raise TooLarge(remote, limit, why)
        except CacheError:
            raise
        except FileNotFoundError as err:
            raise MissingRemoteFile(f"{remote} does not exist on the server") from err
        except Exception as err:
            code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND_CODES:
                raise MissingRemoteFile(f"{remote} does not exist on the server "
                                        f"(or is not readable: {code})") from err
            raise

    def fetch(self, remote: str, local: Path, hashes: dict | None = None,
              size: int | None = None, limit: int | None = None, why: str = "") -> Path:
        """``local``, downloaded from ``remote`` unless already published (one download per node):
        exactly ``size`` bytes when given, at most ``limit`` (``why`` says whose limit)."""
        if size is not None:
            limit, why = size, why or f"the index says {size:,}"
        return self.publish(local, lambda tmp: self._download_with_retries(remote, tmp, limit, why),
                            hashes, what=remote, size=size)

    def _download_with_retries(self, remote: str, tmp: Path, limit: int | None = None,
                               why: str = "") -> None:
        """``remote`` into ``tmp``; with ``limit``, no more than ``limit`` bytes (:class:`TooLarge`
        past it, not retried: the server would send the same again)."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                self._download_once(remote, tmp, limit, why)
                return
            except (MissingRemoteFile, TooLarge):
                tmp.unlink(missing_ok=True)
                raise
            except Exception as err:  # network errors, timeouts, throttling: retry
                if attempt == self.retries:
                    raise CacheError(f"could not download {remote} after {self.retries + 1} "
                                     f"attempts (timeout {self.timeout:g} s each): {err}") from err
                tmp.unlink(missing_ok=True)
                time.sleep(delay)
                delay *= 2

    def publish(self, local: Path, produce: Callable[[Path], None], hashes: dict | None = None,
                what: str | None = None, size: int | None = None) -> Path:
        """``local`` as made by ``produce(tmp)`` (verified against ``hashes`` and ``size`` bytes
        when given, atomically renamed), once per node."""
        local = Path(local)
        if local.exists():
            self.hits += 1
            _touch(local)
            return local
        with file_lock(local.with_name(local.name + ".lock")):
            if local.exists():  # another rank or worker of this node made it meanwhile
                self.hits += 1
                _touch(local)
                return local
            # Whoever holds the lock is the only writer of this file on the node: temporaries of
            # it that exist now were left by a killed process.
            for stale in local.parent.glob(f"{local.name}.*.tmp"):
                stale.unlink(missing_ok=True)
            tmp = unique_tmp(local)
            try:
                produce(tmp)
                if size is not None and tmp.stat().st_size != size:
                    raise CacheError(f"{what or local}: {tmp.stat().st_size} bytes, the index says "
                                     f"{size} (the file is damaged or was changed after the index "
                                     "was written)")
                if hashes:
                    check_file_hashes(tmp, hashes, what or str(local))
                os.replace(tmp, local)
            finally:
                tmp.unlink(missing_ok=True)
            self.misses += 1
        self.evict(keep=local)
        return local

    # ------------------------------------------------------------------ size limit
    def usage(self) -> int:
        return sum(size for _, _, size in self._shard_files())

    def _shard_files(self) -> list[tuple[float, Path, int]]:
        out = []
        if not self.root.exists():
            return out
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                if not name.startswith("shard.") or name.endswith((".lock", ".tmp")):
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, path, st.st_size))
        return out

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used shard files until the cache is under the limit."""
        if not self.limit:
            return
        lock = self.root / ".evict.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as fh:
            # Blocking: an eviction skipped while another thread or process evicts could leave
            # the cache over its limit (a scan of file sizes, quick to wait for).
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                files = sorted(self._shard_files())
                total = sum(size for _, _, size in files)
                for _, path, size in files:
                    if total <= self.limit:
                        break
                    if keep is not None and path == keep:
                        continue
                    path.unlink(missing_ok=True)
                    total -= size
                    self.evicted += 1
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _bounded_s3(downloader, remote: str) -> bool:
    """Whether ``remote`` can be fetched with a ranged GET through the downloader's boto3 client
    (streaming's ``S3Downloader``; other schemes go through their downloader, checked after)."""
    return remote.startswith("s3://") and hasattr(downloader, "_create_s3_client") \
        and hasattr(downloader, "_s3_client")


def _s3_get_bounded(downloader, remote: str, tmp: Path, limit: int, timeout: float,
                    why: str) -> None:
    """``remote`` into ``tmp`` with streaming's own S3 client (its endpoint, credentials and
    requester-pays settings), asking for bytes ``0..limit`` and reading no more than that:
    a server that ignores the range is cut off one byte past ``limit``."""
    from botocore.exceptions import ClientError, NoCredentialsError

    url = urllib.parse.urlparse(remote)
    extra = {}
    if url.netloc in getattr(downloader, "_requester_pays_buckets", ()):
        extra["RequestPayer"] = "requester"
    if downloader._s3_client is None:
        downloader._create_s3_client(timeout=timeout)
    request = dict(Bucket=url.netloc, Key=url.path.lstrip("/"), Range=f"bytes=0-{limit}", **extra)
    try:
        try:
            body = downloader._s3_client.get_object(**request)["Body"]
        except NoCredentialsError:  # a public bucket, as streaming's downloader falls back to
            downloader._create_s3_client(unsigned=True, timeout=timeout)
            body = downloader._s3_client.get_object(**request)["Body"]
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
            tmp.write_bytes(b"")
            return
        raise
    try:
        got = 0
        with open(tmp, "wb") as out:
            while chunk := body.read(_CHUNK):
                got += len(chunk)
                if got > limit:
                    raise TooLarge(remote, limit, why)
                out.write(chunk)
    finally:
        body.close()


def _touch(path: Path) -> None:
    """Mark a cached file as recently used (eviction is least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass
