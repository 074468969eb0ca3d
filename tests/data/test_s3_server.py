"""The test S3 server is real: mosaicml-streaming's own uploader and downloader reach it."""

from __future__ import annotations


def test_streaming_round_trip_through_local_s3(s3_server, tmp_path):
    from soda_mega.data.streaming_compat import streaming_module

    bucket = s3_server.new_bucket()
    src = tmp_path / "a.bin"
    src.write_bytes(b"soda" * 1000)
    s3_server.client.upload_file(str(src), bucket, "dir/a.bin")
    assert s3_server.keys(bucket) == ["dir/a.bin"]

    downloader = streaming_module("storage").CloudDownloader
    out = tmp_path / "b.bin"
    downloader.direct_download(f"s3://{bucket}/dir/a.bin", str(out), timeout=30)
    assert out.read_bytes() == src.read_bytes()
