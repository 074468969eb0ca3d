"""Where ``data build`` puts its files: a local folder, or a remote prefix through a local stage.

A local ``OUT`` is written in place (temp folders, renames, atomic markers: see
:mod:`soda_mega.data.write.writer`). A remote ``OUT`` (``s3://``, ``gs://``, ``oci://``, ``hf://``,
... : whatever mosaicml-streaming's ``CloudUploader`` supports) is written to a local staging
folder and uploaded with streaming's own machinery: each unit's shards by ``MDSWriter`` itself
(``out=(stage, remote)``, which uploads every shard as it is closed and deletes the local copy),
the small state files (plan, unit markers, merged index) by ``CloudUploader.upload_file``, and
read back with ``CloudDownloader``. Nothing here talks to a storage API directly.

Object stores have no rename, so a remote unit is published in this order: shards, the unit's
``index.json``, then its marker. A marker on the remote is the only proof that a unit is
complete; a unit without one is rebuilt (its objects are overwritten with the same bytes). The
credentials and endpoint come from the environment variables streaming reads
(``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... for S3).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from soda_mega.data.streaming_compat import streaming_module

DOWNLOAD_TIMEOUT_S = 120.0


def is_remote(out: str | os.PathLike) -> bool:
    """True for ``scheme://...`` outputs (``s3://bucket/ds``); local paths (and ``file``) are not."""
    scheme = urllib.parse.urlparse(str(out)).scheme
    return len(scheme) > 1 and scheme != "file"


class BuildTarget:
    """A build's output: ``root`` is the local folder written to (``OUT`` itself, or a stage)."""

    def __init__(self, out: str | os.PathLike, staging: str | os.PathLike | None = None) -> None:
        self.out = str(out)
        self.remote = self.out.rstrip("/") if is_remote(out) else None
        self._own_stage = False
        if self.remote is None:
            self.root = Path(out)
        elif staging is not None:
            self.root = Path(staging)
        else:
            self.root = Path(tempfile.mkdtemp(prefix="soda-build-stage-"))
            self._own_stage = True
        self._uploader = None

    def __repr__(self) -> str:
        return f"BuildTarget({self.out!r})"

    # ------------------------------------------------------------- remote only
    def uploader(self):
        """streaming's ``CloudUploader`` from ``root`` to the remote prefix (made once)."""
        if self._uploader is None:
            upload = streaming_module("storage.upload")
            # NOTE: the stage is not empty by design (exist_ok); streaming warns about that on its
            # logger at every construction, which says nothing useful here.
            log = logging.getLogger(upload.__name__)
            level = log.level
            log.setLevel(logging.ERROR)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._uploader = upload.CloudUploader.get((str(self.root), self.remote), exist_ok=True)
            finally:
                log.setLevel(level)
        return self._uploader

    def url(self, rel: str) -> str:
        return f"{self.remote}/{rel}"

    def publish(self, rel: str) -> None:
        """Upload ``root/rel`` to ``remote/rel`` (the local copy is removed); no-op when local."""
        if self.remote is not None:
            self.uploader().upload_file(rel)

    def listing(self, rel_prefix: str) -> list[str]:
        """Paths (relative to the remote prefix) of the remote objects under ``rel_prefix``."""
        assert self.remote is not None
        base = urllib.parse.urlparse(self.remote).path.strip("/")
        keys = self.uploader().list_objects(rel_prefix) or []
        cut = len(base) + 1 if base else 0
        return sorted(k[cut:] if base and k.startswith(base + "/") else k for k in keys)

    def fetch(self, rels: list[str], threads: int = 16) -> None:
        """Download ``remote/rel`` to ``root/rel`` for each rel (replacing local copies)."""
        assert self.remote is not None
        download = streaming_module("storage.download")

        def one(rel: str) -> None:
            local = self.root / rel
            local.unlink(missing_ok=True)
            download.CloudDownloader.direct_download(self.url(rel), str(local), DOWNLOAD_TIMEOUT_S)

        if len(rels) <= 1:
            for rel in rels:
                one(rel)
            return
        with ThreadPoolExecutor(max_workers=min(threads, len(rels))) as pool:
            list(pool.map(one, rels))

    def close(self) -> None:
        """Remove a stage this target made itself."""
        if self._own_stage:
            shutil.rmtree(self.root, ignore_errors=True)
