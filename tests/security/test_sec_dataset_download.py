"""Issue 32 item 4 (downloads): an object on the server larger than its split says it is. Before,
a 400 MB shard object whose index says 2,163 bytes was downloaded whole and only then compared
with the index (index.json, soda_meta.json and doc_lengths.npy likewise, against no size at
all). Now an ``s3://`` download asks for the bytes it may take and stops one byte past them:
exit 2, one line naming the object and its limit, nothing of it left in the cache.

The CLI runs in a child whose file-size limit (``RLIMIT_FSIZE``) is below the planted object:
a download that goes on writing it fails there (EFBIG: "File too large"; Python ignores
SIGXFSZ) instead of filling the disk."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sec_dataset_helpers import REPO, assert_refused, plain_split, tiny_layout
from soda_mega.data.schema import LENGTHS_FILE, META_FILE
from soda_mega.data.shard_contract import INDEX_FILE

PLANTED = 6 << 20   # bytes of the planted object
FSIZE = 2 << 20     # the child's largest file
JSON_LIMIT = 4096   # MAX_JSON_BYTES in the child (the real 256 MiB would be slow to upload)

_CHILD = textwrap.dedent("""
    import resource, sys
    resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from soda_mega.data import shard_contract
    shard_contract.MAX_JSON_BYTES = {json_limit}
    from soda_mega.cli import main
    sys.exit(main(sys.argv[1:]))
""").format(fsize=FSIZE, json_limit=JSON_LIMIT)


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])),
               PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(REPO))


def _upload(s3_server, root, planted: dict[str, bytes]) -> str:
    bucket = s3_server.new_bucket()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            key = str(path.relative_to(root))
            body = planted.get(key)
            if body is None:
                s3_server.client.upload_file(str(path), bucket, f"ds/{key}")
            else:
                s3_server.client.put_object(Bucket=bucket, Key=f"ds/{key}", Body=body)
    return f"s3://{bucket}/ds"


@pytest.mark.parametrize("name, why", [
    ("shard.00000.mds", "raw_data.bytes says"),
    ("shard.00000.mds.zstd", "zip_data.bytes says"),
    (INDEX_FILE, f"{JSON_LIMIT:,} at most"),
    (META_FILE, f"{JSON_LIMIT:,} at most"),
    (LENGTHS_FILE, "8 bytes for each of the 12 documents"),
])
def test_an_object_larger_than_its_split_says_stops_at_its_size(s3_server, tmp_path, name, why):
    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout(), compression="zstd" if name.endswith(".zstd") else None)
    body = b" " * PLANTED if name.endswith(".json") else bytes(PLANTED)
    url = _upload(s3_server, root, {f"train/{name}": body})
    cache = tmp_path / "cache"
    proc = _run(s3_server.env({**os.environ, "SODA_MEGA_CACHE": str(cache)}), "data", "inspect", url)
    assert "File too large" not in proc.stderr, "the download went on past the file-size limit"
    line = assert_refused(proc, f"{url}/train/{name}", why, "the download stopped there")
    assert "more than" in line
    big = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 64 << 10]
    assert not big, f"downloaded bytes left in the cache: {big}"


def test_a_split_of_the_sizes_it_says_is_read(s3_server, tmp_path):
    root = tmp_path / "ds"
    plain_split(root / "train", tiny_layout(), compression="zstd")
    url = _upload(s3_server, root, {})
    proc = _run(s3_server.env({**os.environ, "SODA_MEGA_CACHE": str(tmp_path / "cache")}),
                "data", "inspect", "--verify", url)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
