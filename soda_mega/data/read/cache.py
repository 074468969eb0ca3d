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

The cache trusts only what it wrote itself, in a folder only its user can write:

* **a private folder**: the cache folder must be owned by the user and writable by nobody else,
  and so must every folder above it that others could use to swap it (a sticky ``/tmp`` is
  fine); otherwise it is refused (:class:`UnsafeCacheError`, exit 2) rather than used. Folders
  it makes are mode 0700;
* **no foreign symlinks**: the cache makes no symlinks, so it follows none inside its folder (a
  lock file or sub-folder that is one is refused, naming it);
* **its own index**: every file it publishes gets an entry under ``.soda-cache/entries/``
  (relative path, size, an xxh3-64 hash of the bytes and the dataset index's hashes). A file
  at a cache key without a matching entry (planted, half-written, or left by an older version)
  is never served: it is made again. Eviction deletes only files that have an entry, never by
  name pattern. At each use the file's size is compared with its entry (cheap); ``rehash=True``
  (``data inspect --verify``) hashes the bytes again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import stat
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path

import xxhash

from soda_mega.data.streaming_compat import streaming_module
from soda_mega.errors import SodaUserError

_NOT_FOUND_CODES = {"404", "403", "NoSuchKey", "NoSuchBucket", "AccessDenied"}
# The cache's own record of what it wrote: one small JSON file per published file.
INDEX_DIR = ".soda-cache"
_ENTRIES = "entries"
_HASH = "xxh3_64"
_BLOCK = 8 << 20
_ADVICE = ("set data.cache_dir (or $SODA_MEGA_CACHE) to a folder of yours that only you can "
           "write (chmod go-w), or remove it")


class CacheError(OSError):
    """A file could not be fetched or verified (the message names it)."""


class UnsafeCacheError(CacheError, SodaUserError):
    """The cache folder, or something in it, cannot be used safely: someone else could change it
    (a folder others can write, a symlink the cache did not make), or it cannot be made."""


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


def _open_lock(path: Path) -> int:
    """A descriptor of the lock file ``path`` (created 0600), never through a symlink or onto a
    FIFO or device someone planted there."""
    try:
        # NOTE: O_NONBLOCK only so that a planted FIFO cannot block the open; flock ignores it.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeCacheError(f"cache lock file {path} is a symlink, which the cache never "
                                   f"makes: refused; {_ADVICE}") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeCacheError(f"cache lock file {path} is not a regular file: refused; {_ADVICE}")
    return fd


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True):
    """An exclusive ``flock`` on ``path``; yields False (holding nothing) when ``blocking`` is
    off and another process holds it."""
    fd = _open_lock(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _unsafe(st: os.stat_result, uid: int, own: bool) -> str | None:
    """Why a folder with this ``stat`` lets someone other than ``uid`` change what is in it
    (None when it does not). ``own``: it must belong to ``uid`` (else root may own it too)."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != uid and (own or st.st_uid != 0):
        return f"is owned by uid {st.st_uid}, not by you (uid {uid})"
    # A sticky folder (/tmp) lets others add names but not rename or remove yours.
    if st.st_mode & 0o022 and (own or not st.st_mode & stat.S_ISVTX):
        who = "others" if st.st_mode & 0o002 else "its group"
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private_folder(root: Path) -> None:
    """Refuse ``root`` (an existing folder) unless only this user can change what it holds:
    it is owned by the user and writable by nobody else, every folder above it is the user's or
    root's and writable by nobody else unless sticky, and every symlink on the way belongs to
    the user or root."""
    uid = os.geteuid()
    root = Path(os.path.abspath(root))
    walked = Path(root.anchor)
    for part in root.parts[1:]:
        walked = walked / part
        st = os.lstat(walked)
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
            raise UnsafeCacheError(f"cache folder {root}: {walked} is a symlink of uid "
                                   f"{st.st_uid}, not yours: refused; {_ADVICE}")
    real = Path(os.path.realpath(root))
    why = _unsafe(os.stat(real), uid, own=True)
    if why:
        raise UnsafeCacheError(f"cache folder {root} {why}: someone else could plant files in it; "
                               f"{_ADVICE}")
    _check_above(root, real.parents)


def _check_above(root: Path, folders) -> None:
    """Refuse the cache folder ``root`` when one of ``folders`` (those above it) lets others
    rename or replace what it holds."""
    uid = os.geteuid()
    for folder in folders:
        why = _unsafe(os.stat(folder), uid, own=False)
        if why:
            raise UnsafeCacheError(f"cache folder {root}: the folder above it, {folder}, {why}: "
                                   f"someone else could swap the cache; {_ADVICE}")


def make_private_folder(root: Path) -> None:
    """``root`` made when missing (its missing folders mode 0700, only below folders that pass
    :func:`check_private_folder`'s rules), then checked."""
    root = Path(os.path.abspath(root))
    missing = []
    existing = root
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    if missing:
        real = Path(os.path.realpath(existing))
        _check_above(root, [real, *real.parents])
        for folder in reversed(missing):
            _make_folder(folder)
    check_private_folder(root)


def _make_folder(path: Path) -> None:
    """``path`` made (mode 0700) when missing; an existing one must be a real folder of this
    user that nobody else can write (never a symlink)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"cache folder {path} is a symlink, which the cache never makes: "
                               f"refused; {_ADVICE}")
    why = _unsafe(st, os.geteuid(), own=True)
    if why:
        raise UnsafeCacheError(f"cache folder {path} {why}: refused; {_ADVICE}")


def file_hash(path: Path) -> str:
    """xxh3-64 of the file's bytes, read in blocks."""
    h = xxhash.xxh3_64()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


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
        self._ready: tuple[int, set[Path]] = (-1, set())  # (pid, folders checked by that process)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_local"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # ------------------------------------------------------------------ folders
    def folder(self, rel: str | Path = "") -> Path:
        """``root/rel``, made when missing: the root is checked once per process (see
        :func:`check_private_folder`), every folder below it is a real folder of this user
        (never a symlink: the cache makes none)."""
        pid, checked = self._ready
        path = self.root
        try:
            if pid != os.getpid():
                make_private_folder(self.root)
                pid, checked = self._ready = (os.getpid(), set())
            for part in Path(rel).parts:
                if part in ("..", "/") or part.startswith("/"):
                    raise ValueError(f"{rel}: not a path inside the cache")
                path = path / part
                if path not in checked:
                    _make_folder(path)
                    checked.add(path)
        except CacheError:
            raise
        except OSError as err:  # not ours to write (permissions, a file in the way, ...)
            raise UnsafeCacheError(f"cache folder {path}: cannot be made or used "
                                   f"({err.strerror or err}); {_ADVICE}") from None
        return path

    def _relative(self, local: Path) -> Path:
        try:
            return Path(local).relative_to(self.root)
        except ValueError:
            raise ValueError(f"{local} is not inside the cache folder {self.root}") from None

    # ------------------------------------------------------------------ the cache's own index
    def _entry_path(self, rel: Path) -> Path:
        name = hashlib.sha256(rel.as_posix().encode()).hexdigest()[:40]
        return self.root / INDEX_DIR / _ENTRIES / f"{name}.json"

    def _read_entry(self, path: Path) -> dict | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            entry = json.loads(os.read(fd, 1 << 16))
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        ok = (isinstance(entry, dict) and isinstance(entry.get("path"), str)
              and isinstance(entry.get("size"), int) and isinstance(entry.get(_HASH), str))
        return entry if ok else None

    def _write_entry(self, rel: Path, local: Path, hashes: dict | None) -> None:
        entry = {"path": rel.as_posix(), "size": os.lstat(local).st_size, _HASH: file_hash(local),
                 "hashes": dict(hashes or {})}
        path = self._entry_path(rel)
        self.folder(path.parent.relative_to(self.root))
        tmp = unique_tmp(path)
        try:
            tmp.write_text(json.dumps(entry))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _published(self, local: Path, rel: Path, hashes: dict | None, size: int | None,
                   rehash: bool) -> bool:
        """True when ``local`` is a file this cache published, unchanged in size (and, with
        ``rehash``, in its bytes) and made from the same index hashes."""
        entry = self._read_entry(self._entry_path(rel))
        if entry is None or entry["path"] != rel.as_posix():
            return False
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry["size"]:
            return False
        if size is not None and size != entry["size"]:
            return False
        if hashes and entry.get("hashes") != dict(hashes):
            return False
        if rehash and file_hash(local) != entry[_HASH]:
            raise CacheError(f"cached copy {local} does not match the hash the cache recorded "
                             "when it wrote it (changed since): removed, it will be made again")
        return True

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
              size: int | None = None, rehash: bool = False, limit: int | None = None,
              why: str = "") -> Path:
        """``local``, downloaded from ``remote`` unless already published (one download per node):
        exactly ``size`` bytes when given, at most ``limit`` (``why`` says whose limit)."""
        if size is not None:
            limit, why = size, why or f"the index says {size:,}"
        return self.publish(local, lambda tmp: self._download_with_retries(remote, tmp, limit, why),
                            hashes, what=remote, size=size, rehash=rehash)

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
                what: str | None = None, size: int | None = None, rehash: bool = False) -> Path:
        """``local`` as made by ``produce(tmp)`` (verified against ``hashes`` and ``size`` bytes
        when given, atomically renamed, recorded in the cache's index), once per node. A file
        already at ``local`` is used only when the index holds it unchanged (``rehash``: its
        bytes hashed again; a changed one raises :class:`CacheError` and is removed)."""
        local = Path(local)
        rel = self._relative(local)
        self.folder(rel.parent)
        if self._hit(local, rel, hashes, size, rehash):
            return local
        with file_lock(local.with_name(local.name + ".lock")):
            if self._hit(local, rel, hashes, size, rehash):  # another rank or worker made it meanwhile
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
                # NOTE: the entry is written after the rename: a file without one (a crash in
                # between) is made again, never served.
                os.replace(tmp, local)
                self._write_entry(rel, local, hashes)
            finally:
                tmp.unlink(missing_ok=True)
            self.misses += 1
        self.evict(keep=local)
        return local

    def _hit(self, local: Path, rel: Path, hashes: dict | None, size: int | None,
             rehash: bool) -> bool:
        try:
            found = self._published(local, rel, hashes, size, rehash)
        except CacheError:
            self._remove(local, self._entry_path(rel))
            raise
        if found:
            self.hits += 1
            _touch(local)
        return found

    # ------------------------------------------------------------------ size limit
    def usage(self) -> int:
        return sum(size for _, path, size, _ in self._entries() if _evictable(path))

    def _entries(self) -> list[tuple[float, Path, int, Path]]:
        """(last use, file, size, entry file) of every file in the cache's own index that is
        still there (entries of vanished files are dropped)."""
        folder = self.root / INDEX_DIR / _ENTRIES
        out: list[tuple[float, Path, int, Path]] = []
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return out
        for name in names:
            if not name.endswith(".json"):
                continue
            entry_path = folder / name
            entry = self._read_entry(entry_path)
            if entry is None:
                continue
            rel = Path(entry["path"])
            if rel.is_absolute() or ".." in rel.parts or self._entry_path(rel) != entry_path:
                continue  # not an entry this cache wrote
            path = self.root / rel
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                entry_path.unlink(missing_ok=True)
                continue
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_mtime, path, st.st_size, entry_path))
        return out

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used shard files of the cache's own index until the cache is
        under the limit (never a file the index does not hold)."""
        if not self.limit:
            return
        self.folder(INDEX_DIR)
        # Blocking: an eviction skipped while another thread or process evicts could leave
        # the cache over its limit (a scan of small index files, quick to wait for).
        with file_lock(self.root / INDEX_DIR / "evict.lock"):
            files = sorted(e for e in self._entries() if _evictable(e[1]))
            total = sum(size for _, _, size, _ in files)
            for _, path, size, entry_path in files:
                if total <= self.limit:
                    break
                if keep is not None and path == keep:
                    continue
                # A file being made again right now (its lock held) is left alone.
                try:
                    with file_lock(path.with_name(path.name + ".lock"), blocking=False) as locked:
                        if not locked:
                            continue
                        self._remove(path, entry_path)
                except FileNotFoundError:  # its folder was removed meanwhile
                    entry_path.unlink(missing_ok=True)
                total -= size
                self.evicted += 1

    @staticmethod
    def _remove(path: Path, entry_path: Path) -> None:
        path.unlink(missing_ok=True)
        entry_path.unlink(missing_ok=True)


def _evictable(path: Path) -> bool:
    """Shard files are evicted; metadata (index, lengths, token totals) stays."""
    return path.name.startswith("shard.")


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
