"""`data build` into s3:// (issue 12, item 3) against a real S3 server (moto, its own process):
the objects equal a local build byte for byte; an interrupted build rerun skips the uploaded
units; parts of one build meet in the same prefix."""

from __future__ import annotations

import pytest

from build_helpers import codes_corpus, tiny_config, tree_bytes
from soda_mega.cli import main
from soda_mega.data.write.builder import BuildError, build_dataset, finalize_dataset


def _remote_tree(s3_server, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for key in s3_server.keys(bucket, prefix + "/"):
        out[key[len(prefix) + 1:]] = s3_server.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def _interrupt_after(n: int):
    def hook(name: str, completed: int) -> None:
        if completed == n:
            raise KeyboardInterrupt(f"simulated kill after {name}")
    return hook


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    src = tmp_path_factory.mktemp("remote_in")
    manifest = codes_corpus(src, n=7)
    local = src / "local"
    build_dataset(local, [manifest], "speech", tiny_config(), show_progress=False)
    return manifest, tree_bytes(local)


def test_remote_build_equals_the_local_build_and_resumes(s3_server, local_build, tmp_path):
    manifest, expected = local_build
    bucket = s3_server.new_bucket()
    out = f"s3://{bucket}/speech"
    stage = tmp_path / "stage"
    with pytest.raises(KeyboardInterrupt):
        build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False, staging=stage,
                      on_unit_done=_interrupt_after(2))
    partial = _remote_tree(s3_server, bucket, "speech")
    assert ".build/plan.json" in partial and ".build/units/u000001.json" in partial
    assert ".build/units/u000002.json" not in partial and "train/index.json" not in partial
    stamps = {k: s3_server.client.head_object(Bucket=bucket, Key=f"speech/{k}")["LastModified"]
              for k in partial if k.startswith(".build/units/")}
    result = build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False, staging=stage)
    assert result.finalized and result.units == 4 and result.units_resumed == 2 and result.units_built == 2
    assert _remote_tree(s3_server, bucket, "speech") == expected
    for k, stamp in stamps.items():  # the uploaded units were not redone
        assert s3_server.client.head_object(Bucket=bucket, Key=f"speech/{k}")["LastModified"] == stamp
    assert not [p for p in stage.rglob("*") if p.is_file()]  # nothing kept on the stage
    # another plan into the same prefix is refused (nothing remote is ever deleted)
    with pytest.raises(BuildError, match="other inputs or settings.*valid_fraction"):
        build_dataset(out, [manifest], "speech", tiny_config("--data.valid_fraction=0.5"), show_progress=False)


def test_remote_parts_meet_in_one_prefix(s3_server, local_build, capsys):
    manifest, expected = local_build
    bucket = s3_server.new_bucket()
    out = f"s3://{bucket}/speech"
    first = build_dataset(out, [manifest], "speech", tiny_config(), show_progress=False, part=(1, 2))
    assert not first.finalized and first.units_missing == 2
    with pytest.raises(BuildError, match="2 of 4 units are not built yet"):
        finalize_dataset(out, show_progress=False)
    common = ["--manifest", str(manifest), "--preset", "tiny", "--quiet", "--data.build_workers=0",
              "--data.valid_fraction=0.3", "--data.build_unit_recordings=2", "--data.shard_size_limit=4096"]
    assert main(["data", "build", out, *common, "--part", "0/2"]) == 0
    assert "built speech dataset s3://" in capsys.readouterr().out
    assert _remote_tree(s3_server, bucket, "speech") == expected
    s3_server.client.delete_object(Bucket=bucket, Key="speech/train/index.json")
    assert main(["data", "build", "--finalize", out, "--quiet"]) == 0
    assert _remote_tree(s3_server, bucket, "speech") == expected


def test_remote_prefix_holding_other_things_is_refused(s3_server, local_build):
    manifest, _ = local_build
    bucket = s3_server.new_bucket()
    s3_server.client.put_object(Bucket=bucket, Key="speech/notes.txt", Body=b"mine")
    with pytest.raises(BuildError, match="not empty and holds no soda-mega build"):
        build_dataset(f"s3://{bucket}/speech", [manifest], "speech", tiny_config(), show_progress=False)
