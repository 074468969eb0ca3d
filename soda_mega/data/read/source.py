"""Random access to the documents of one built split (MDS shards + soda_meta.json + lengths),
from a local folder or from object storage (``s3://``, ``gs://``, ``oci://``, ``hf://``, ...).

The loader plans packing from ``doc_lengths.npy`` alone (read on demand from the node's page
cache, which its ranks and workers share; only the blocks in use are read) and then reads only the
documents its rank needs, straight from the MDS shard files through mosaicml-streaming's shard
readers. It does not use ``StreamingDataset``: that class takes its world from
``RANK``/``WORLD_SIZE`` (soda-mega's data-parallel rank comes from Megatron's parallel state)
and coordinates workers through shared memory, which a crashed run can leave behind.

Every split is opened through the reader contract (:mod:`.shard_contract`): ``index.json``,
``soda_meta.json`` and ``doc_lengths.npy`` are checked (types, ranges, the writer's columns and
encodings, shard file names inside the split and cache folders, sizes) before mosaicml-streaming
or the cache sees a shard entry.

Remote splits are fetched through streaming's downloaders into the node's cache
(:mod:`.cache`: one download per file per node, verified, published atomically, evicted least
recently used first). Compressed shards are decompressed into that cache too, never beside
the source and never past the size the index gives them. Data is checked when it is read:
shard bytes against the index's hashes when it carries them, every document for token ids
inside the vocabulary layout and loss masks in {0, 1}. A damaged shard or document is named
(dataset, shard, document) in a :class:`DatasetError`, or with ``data.skip_bad_documents``
replaced by masked-out filler of the same length (no token of it is trained on) and counted.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from soda_mega.config.schema import MAX_DATASET_BYTES, MAX_INFLATE_RATIO
from soda_mega.data import shard_contract
from soda_mega.data.read.cache import (
    CacheError,
    MissingRemoteFile,
    NodeCache,
    TooLarge,
    check_file_hashes,
    is_remote,
    unique_tmp,
)
from soda_mega.data.read.order import LengthsFile, read_range, shard_totals
from soda_mega.data.schema import LENGTHS_FILE, META_FILE
from soda_mega.data.shard_contract import (
    INDEX_FILE,
    DatasetError,
    EmptySplitError,
    InflateError,
    MissingSplitError,
    check_budget,
    check_index,
    check_lengths_chunk,
    check_lengths_header,
    check_meta,
    check_regular,
    check_shard_bytes,
    inflate,
    inside,
    read_capped,
)
from soda_mega.data.streaming_compat import streaming_module
from soda_mega.tokens.layout import VocabLayout
from soda_mega.utils import strict_json

__all__ = ["DatasetError", "DocumentSource", "EmptySplitError", "MissingSplitError", "INDEX_FILE", "layout_differences",
           "read_meta"]


def layout_differences(dataset: dict, model: dict) -> list[str]:
    """Human-readable list of vocabulary-layout fields that differ (dataset vs model)."""
    diffs = []
    for key in sorted(set(dataset) | set(model)):
        if dataset.get(key) != model.get(key):
            diffs.append(f"{key}: dataset {dataset.get(key)!r} != model {model.get(key)!r}")
    return diffs


def _read_json(path: Path, what: str) -> dict:
    try:
        return strict_json.loads(read_capped(Path(path), what))
    except strict_json.JSONProblem as err:
        raise DatasetError(f"{what} is {err} (truncated or damaged?)") from None


def read_meta(split_dir: Path, shown: str | None = None) -> dict:
    path = Path(split_dir) / META_FILE
    shown = shown or str(path)
    if not path.exists():
        raise DatasetError(f"{split_dir} is not a soda-mega dataset split: {META_FILE} is missing "
                           "(build one with `soda-mega data build`)")
    return check_meta(_read_json(path, shown), shown)


def _load_lengths(path: Path, shown: str) -> LengthsFile:
    """``doc_lengths.npy``, read on demand (see :class:`.order.LengthsFile`), validated."""
    check_regular(path, shown)
    try:
        lengths = LengthsFile(path)
    except FileNotFoundError as err:
        raise DatasetError(f"{shown} is missing") from err
    except (ValueError, OSError, EOFError) as err:
        raise DatasetError(f"{shown} is not a valid .npy array (truncated or damaged?): {err}") from err
    check_lengths_header(lengths.dtype, lengths.shape, shown)
    return lengths


class DocumentSource:
    """One split of one built dataset: its metadata, document lengths and documents."""

    def __init__(self, root: str | Path, split: str = "train", layout: VocabLayout | None = None,
                 *, cache: NodeCache | None = None, skip_bad: bool = False,
                 prefetch_threads: int = 2, max_bytes: int | None = MAX_DATASET_BYTES,
                 max_inflate_ratio: float | None = MAX_INFLATE_RATIO) -> None:
        """``max_bytes`` and ``max_inflate_ratio`` (None: no limit) are the split's budget,
        checked at open (:func:`.shard_contract.check_budget`): data.max_dataset_bytes and
        data.max_inflate_ratio."""
        self.name = str(root)
        self._budget = (max_bytes, max_inflate_ratio)
        self.split = split
        self.cache = cache or NodeCache()
        self.skip_bad = skip_bad
        self.prefetch_threads = prefetch_threads
        self.remote = is_remote(self.name)
        # The shard reader's module, imported once here rather than in each loader worker.
        streaming_module("format")
        if self.remote:
            self._open_remote(self.name.rstrip("/"), split)
        else:
            self._open_local(Path(root), split)
        if self.meta["split"] != split:
            raise DatasetError(f"{self.where} holds the {self.meta['split']!r} split, "
                               f"not {split!r}: give the dataset root instead")
        if layout is not None:
            diffs = layout_differences(self.meta["vocab_layout"], layout.to_dict())
            if diffs:
                raise DatasetError(
                    f"{self.where} was built for another vocabulary layout than the model's "
                    f"(`data build --preset` and the run's preset or vocab section must agree); "
                    f"rebuild it or change the vocab section: {'; '.join(diffs)}"
                )
        try:
            self.layout = layout or VocabLayout.from_dict(self.meta["vocab_layout"])
        except (TypeError, ValueError, KeyError) as err:
            raise DatasetError(f"{self.where}/{META_FILE}: bad vocab_layout: {err}") from err
        self.shard_counts = [s["samples"] for s in self.shards]
        if sum(self.shard_counts) != len(self.lengths):
            raise DatasetError(f"{self.where}: {LENGTHS_FILE} has {len(self.lengths)} entries but "
                               f"the shards hold {sum(self.shard_counts)} samples")
        if not len(self.lengths):
            raise EmptySplitError(f"{self.where}: the {split} split holds no documents")
        self.shard_tokens = self._shard_tokens()
        check_shard_bytes(self.shards, self.shard_tokens, self.where)
        if not int(self.shard_tokens.sum()):
            raise DatasetError(f"{self.where}: the {split} split holds no tokens")
        self._starts = np.cumsum([0] + self.shard_counts).tolist()
        if not self.remote:
            self._check_local_shards()
        self.identity = {"name": self.name, "split": split, "index": self._index_sha}
        self.bad_documents = 0   # documents replaced by filler (data.skip_bad_documents)
        self.reads = 0           # documents read by this process
        self.waits = 0           # of them, reads that had to fetch their shard first (cache misses)
        self._fresh()

    def _fresh(self) -> None:
        self._readers: dict[int, object] = {}
        self._verified: set[int] = set()
        self._bad_shards: dict[int, str] = {}
        self._bad_seen: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[int] = set()
        self._lock = threading.Lock()
        self._pool_pid = os.getpid()

    # ------------------------------------------------------------------ opening
    def _open_local(self, root: Path, split: str) -> None:
        if (root / split).is_dir():
            split_dir = root / split
        elif (root / META_FILE).is_file():
            split_dir = root  # a split folder given directly
        else:
            raise MissingSplitError(f"{root} has no {split!r} split (expected {root / split}); "
                                    "build it with `soda-mega data build`")
        self.split_dir = split_dir
        self.where = str(split_dir)
        self.meta = read_meta(split_dir)
        index_path = split_dir / INDEX_FILE
        if not index_path.exists():
            raise DatasetError(f"{index_path} is missing (the MDS index of the shards)")
        raw = read_capped(index_path, str(index_path))
        self._index_sha = hashlib.sha256(raw).hexdigest()
        self.shards = check_index(_parse_index(raw, str(index_path)), self.where)
        check_budget(self.shards, self.where, *self._budget, cached=False)
        self.lengths = _load_lengths(split_dir / LENGTHS_FILE, str(split_dir / LENGTHS_FILE))
        self._lengths_path = split_dir / LENGTHS_FILE
        compressed = any(s["compression"] for s in self.shards)
        # Uncompressed shards are read in place; compressed ones are decompressed into the cache.
        self.files_dir = (self.cache.root / f"local-{_short(str(split_dir.resolve()))}-"
                          f"{self._index_sha[:12]}") if compressed else split_dir

    def _open_remote(self, base: str, split: str) -> None:
        incoming = self.cache.folder("incoming")
        raw = None
        for url in (f"{base}/{split}", base):
            tmp = unique_tmp(incoming / INDEX_FILE)
            limit = shard_contract.MAX_JSON_BYTES
            try:
                self.cache._download_with_retries(f"{url}/{INDEX_FILE}", tmp, limit,
                                                  f"any {INDEX_FILE} of a soda-mega dataset takes "
                                                  f"{limit:,} at most")
                raw = read_capped(tmp, f"{url}/{INDEX_FILE}")
                break
            except MissingRemoteFile:
                continue
            except TooLarge as err:
                raise DatasetError(str(err)) from err
            except CacheError as err:
                raise DatasetError(f"{self.name}: {err}") from err
            finally:
                tmp.unlink(missing_ok=True)
        if raw is None:
            raise MissingSplitError(f"{base} has no {split!r} split: neither {base}/{split}/{INDEX_FILE} "
                                    f"nor {base}/{INDEX_FILE} exists on the server")
        self.split_dir = url
        self.where = url
        self._index_sha = hashlib.sha256(raw).hexdigest()
        # Checked before anything is published into the cache (or streaming ever sees it).
        self.shards = check_index(_parse_index(raw, f"{url}/{INDEX_FILE}"), url)
        check_budget(self.shards, url, *self._budget, cached=True)
        # A rebuilt dataset at the same URL has another index: it gets its own cache folder.
        self.files_dir = self.cache.folder(f"{_short(url)}-{self._index_sha[:12]}")
        self.cache.publish(self.files_dir / INDEX_FILE, lambda t: t.write_bytes(raw))
        # doc_lengths.npy: a .npy header (numpy reads 10,000 bytes of it at most) and 8 bytes a
        # document at most.
        samples = sum(s["samples"] for s in self.shards)
        most = shard_contract.MAX_JSON_BYTES
        limits = {META_FILE: (most, f"any {META_FILE} of a soda-mega dataset takes {most:,} at most"),
                  LENGTHS_FILE: (8 * samples + (1 << 16), f"8 bytes for each of the {samples:,} "
                                                          f"documents of {INDEX_FILE} and a header")}
        for name in (META_FILE, LENGTHS_FILE):
            try:
                self.cache.fetch(f"{url}/{name}", self.files_dir / name, limit=limits[name][0],
                                 why=limits[name][1])
            except MissingRemoteFile as err:
                raise DatasetError(f"{url} is not a soda-mega dataset split: {name} is missing "
                                   "(build one with `soda-mega data build`)") from err
            except CacheError as err:
                raise DatasetError(f"{self.name}: {err}") from err
        self.meta = read_meta(self.files_dir, f"{url}/{META_FILE}")
        self.lengths = _load_lengths(self.files_dir / LENGTHS_FILE, f"{url}/{LENGTHS_FILE}")
        self._lengths_path = self.files_dir / LENGTHS_FILE

    def _shard_tokens(self) -> np.ndarray:
        """Tokens per shard: one pass over ``doc_lengths.npy`` per node, kept in the node cache
        (every later rank, worker and run of the node reads a few KB instead)."""
        st = os.stat(self._lengths_path)
        # v2: totals written by a pass that also checked every length (shard_contract)
        key = _short(f"v2:{self._index_sha}:{os.path.realpath(self._lengths_path)}:{st.st_size}:"
                     f"{st.st_mtime_ns}")
        path = self.cache.root / "shard-tokens" / f"{key}.npy"

        shown = f"{self.where}/{LENGTHS_FILE}"

        def checked_totals() -> np.ndarray:
            return shard_totals(self.lengths, self.shard_counts,
                                check=lambda part, start: check_lengths_chunk(part, start, shown))

        def produce(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, checked_totals())

        try:
            self.cache.publish(path, produce)
            totals = np.load(path)
            if totals.shape == (len(self.shard_counts),):
                return totals.astype(np.int64)
        except DatasetError:
            raise
        except (OSError, ValueError):  # an unwritable or unsafe cache: compute it here
            pass
        return checked_totals()

    def _check_local_shards(self) -> None:
        """A deleted shard is named at open, not at its first read hours later; a shard file
        that resolves outside the split folder (a symlink) is refused. (A damaged one is named
        when it is read: with ``data.skip_bad_documents`` its documents are skipped.)"""
        missing = []
        for i, shard in enumerate(self.shards):
            name = shard[self._shard_file_key(shard)]["basename"]
            shown = f"{self.where}/{INDEX_FILE}: shard {i} ({name})"
            if not check_regular(inside(self.split_dir, name, shown), f"{self.where}/{name}").is_file():
                missing.append(name)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DatasetError(f"{self.where}: shard file(s) {', '.join(missing[:3])}{more} listed "
                               f"in {INDEX_FILE} are missing")

    @staticmethod
    def _shard_file_key(shard: dict) -> str:
        return "zip_data" if shard["compression"] else "raw_data"

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def num_tokens(self) -> int:
        return int(self.shard_tokens.sum())

    def __len__(self) -> int:
        return len(self.lengths)

    def shard_of(self, idx: int) -> int:
        return bisect.bisect_right(self._starts, idx) - 1

    def shard_name(self, shard_idx: int) -> str:
        return self.shards[shard_idx]["raw_data"]["basename"]

    def count_longer_than(self, limit: int, chunk: int = 1 << 22) -> int:
        return sum(int((read_range(self.lengths, a, a + chunk) > limit).sum())
                   for a in range(0, len(self.lengths), chunk))

    # ------------------------------------------------------------------ shard files
    def local_shard(self, shard_idx: int, rehash: bool = False) -> Path:
        """The raw shard file on this node (fetched / decompressed / verified on first use).
        ``rehash``: a copy already in the node cache is hashed again (``data inspect --verify``);
        otherwise its size and the cache's record of it are checked."""
        shard = self.shards[shard_idx]
        raw_info = shard["raw_data"]
        local = inside(self.files_dir, raw_info["basename"],
                       f"{self.where}/{INDEX_FILE}: shard {shard_idx} ({raw_info['basename']})")
        if not self.remote and not shard["compression"]:
            if not check_regular(local, f"{self.where}/{raw_info['basename']}").is_file():
                raise DatasetError(f"dataset {self.name} ({self.split}), shard {raw_info['basename']}: "
                                   f"{local} was deleted after the dataset was opened")
            if shard_idx not in self._verified and raw_info.get("hashes"):
                try:
                    check_file_hashes(local, raw_info["hashes"], str(local))
                except CacheError as err:
                    raise DatasetError(f"dataset {self.name} ({self.split}), shard "
                                       f"{raw_info['basename']}: {err}") from err
            self._verified.add(shard_idx)
            return local
        try:
            if shard["compression"]:
                return self.cache.publish(local, lambda tmp: self._decompress(shard, tmp),
                                          raw_info["hashes"], what=f"{self.where}/{raw_info['basename']}",
                                          size=raw_info["bytes"], rehash=rehash)
            return self.cache.fetch(f"{self.split_dir}/{raw_info['basename']}", local,
                                    raw_info["hashes"], size=raw_info["bytes"], rehash=rehash,
                                    why=f"raw_data.bytes says {raw_info['bytes']:,}")
        except CacheError as err:
            raise DatasetError(f"dataset {self.name} ({self.split}), shard "
                               f"{raw_info['basename']}: {err}") from err

    def _decompress(self, shard: dict, tmp: Path) -> None:
        """The shard's archive (read in place, or downloaded beside ``tmp`` up to its size),
        checked against its size and hashes, inflated into ``tmp`` up to ``raw_data.bytes`` and
        no further, a chunk at a time (neither file is ever held in memory)."""
        zip_info = shard["zip_data"]
        shown = f"{self.where}/{zip_info['basename']}"
        archive = (unique_tmp(tmp) if self.remote
                   else check_regular(self.split_dir / zip_info["basename"], shown))
        try:
            if self.remote:
                self.cache._download_with_retries(f"{self.split_dir}/{zip_info['basename']}", archive,
                                                  zip_info["bytes"],
                                                  f"zip_data.bytes says {zip_info['bytes']:,}")
            got = archive.stat().st_size
            if got != zip_info["bytes"]:
                raise CacheError(f"{shown}: {got} bytes, zip_data.bytes says {zip_info['bytes']}")
            check_file_hashes(archive, zip_info["hashes"], shown)
            with open(archive, "rb") as src, open(tmp, "wb") as out:
                inflate(shard["compression"], src, out, shard["raw_data"]["bytes"])
        except InflateError as err:
            raise CacheError(f"{shown}: {err}") from err
        finally:
            if self.remote:
                archive.unlink(missing_ok=True)

    def prefetch(self, shard_ids) -> None:
        """Fetch these shards into the node's cache in background threads (remote or compressed)."""
        if not self.prefetch_threads or (not self.remote and not self.shards[0]["compression"]):
            return
        if self._pool_pid != os.getpid():  # a forked loader worker: threads and locks are not inherited
            self._pool, self._inflight, self._lock = None, set(), threading.Lock()
            self._pool_pid = os.getpid()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="soda-prefetch")
            todo = [s for s in shard_ids if s not in self._inflight
                    and not (self.files_dir / self.shard_name(s)).exists()]
            self._inflight.update(todo)
        for s in todo:
            self._pool.submit(self._prefetch_one, s)

    def close(self) -> None:
        """Wait for background prefetches to end (they only fill the cache)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _prefetch_one(self, shard_idx: int) -> None:
        try:
            self.local_shard(shard_idx)
        except Exception:  # the read that needs it reports the error, by name
            pass
        finally:
            with self._lock:
                self._inflight.discard(shard_idx)

    def _reader(self, shard_idx: int):
        reader = self._readers.get(shard_idx)
        if reader is None:
            if not (self.files_dir / self.shard_name(shard_idx)).exists():
                self.waits += 1
            self.local_shard(shard_idx)
            fmt = streaming_module("format")
            reader = fmt.reader_from_json(str(self.files_dir), None, self.shards[shard_idx])
            self._readers[shard_idx] = reader
        return reader

    # ------------------------------------------------------------------ documents
    def get(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32, loss_mask uint8) of document ``idx``, checked."""
        shard_idx = self.shard_of(idx)
        if shard_idx in self._bad_shards:
            return self._bad(shard_idx, idx, self._bad_shards[shard_idx])
        try:
            sample = self._read(shard_idx, idx - self._starts[shard_idx])
        except DatasetError as err:
            if not self.skip_bad:
                raise
            self._bad_shards[shard_idx] = str(err)
            return self._bad(shard_idx, idx, str(err))
        except Exception as err:  # a truncated or garbled shard: struct / unicode / value errors
            return self._bad(shard_idx, idx, f"unreadable ({type(err).__name__}: {err})")
        try:
            tokens = np.asarray(sample["tokens"], dtype=np.int32)
            mask = np.asarray(sample["loss_mask"], dtype=np.uint8)
        except Exception as err:
            return self._bad(shard_idx, idx, f"unreadable ({type(err).__name__}: {err})")
        reason = self.check_document(tokens, mask, int(self.lengths[idx]))
        if reason:
            return self._bad(shard_idx, idx, reason)
        return tokens, mask

    def _read(self, shard_idx: int, local_idx: int) -> dict:
        self.reads += 1
        reader = self._reader(shard_idx)
        try:
            return reader.get_item(local_idx)
        except FileNotFoundError:
            # Evicted from the node's cache since it was fetched: fetch it again, once.
            self.waits += 1
            self.local_shard(shard_idx)
            return reader.get_item(local_idx)

    def check_document(self, tokens: np.ndarray, mask: np.ndarray, length: int) -> str | None:
        """Why a document is bad (None when it is good): ids, mask values, lengths."""
        if len(tokens) != length or len(mask) != len(tokens):
            return (f"{len(tokens)} tokens and {len(mask)} mask entries, "
                    f"{LENGTHS_FILE} says {length}")
        if len(tokens):
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.layout.size:
                return f"token id {lo if lo < 0 else hi} outside the vocabulary layout 0..{self.layout.size - 1}"
            if int(mask.max()) > 1:
                return f"loss mask value {int(mask.max())} (must be 0 or 1)"
        return None

    def _bad(self, shard_idx: int, idx: int, reason: str) -> tuple[np.ndarray, np.ndarray]:
        where = (f"dataset {self.name} ({self.split}), shard {self.shard_name(shard_idx)}, "
                 f"document {idx}")
        if reason.startswith(f"dataset {self.name}"):
            message = f"{reason} (document {idx})"
        else:
            message = f"{where}: {reason}"
        if not self.skip_bad:
            raise DatasetError(message + "; set data.skip_bad_documents=true to skip bad documents")
        if idx not in self._bad_seen:  # each bad document is reported and counted once
            self._bad_seen.add(idx)
            self.bad_documents += 1
            print(f"[soda-mega data] skipped (data.skip_bad_documents, {self.bad_documents} so far "
                  f"in this process): {message}", file=sys.stderr, flush=True)
        length = int(self.lengths[idx])
        return (np.full(length, self.layout.eos_id, dtype=np.int32), np.zeros(length, dtype=np.uint8))

    # ------------------------------------------------------------------ processes
    def __getstate__(self):
        # Readers, threads and the memory map stay behind; a worker reopens the map (shared pages).
        state = dict(self.__dict__)
        for key in ("_readers", "_verified", "_bad_shards", "_bad_seen", "_pool", "_inflight",
                    "_lock", "_pool_pid"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fresh()


def _parse_index(raw: bytes, shown: str) -> dict:
    try:
        index = strict_json.loads(raw)
    except strict_json.JSONProblem as err:
        raise DatasetError(f"{shown} is {err} (truncated or damaged?)") from None
    if not isinstance(index, dict):
        raise DatasetError(f"{shown}: expected a JSON object")
    return index


def _short(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]
