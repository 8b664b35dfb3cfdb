"""The Ray shard pipeline end to end on a real local Ray (started once), local files and moto S3.

Byte equality is the contract throughout: the same inputs and content config give the same
shards, stats and manifest whatever the store, the worker count, the window, or interruptions.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time
from dataclasses import replace

import fsspec
import pytest
import webdataset as wds

from data_pipeline.manifest import read_manifest
from data_pipeline.pipeline import run_pipeline
from data_pipeline.shard_config import FilterConfig, ImageConfig, RunOptions, ShardConfig, SourceConfig
from data_pipeline.storage import StorageError
from tests.shard_helpers import ImageServer, corrupt_jpeg, huge_png, jpeg, read_tree, truncated_jpeg, write_folder

pytestmark = pytest.mark.integration


@pytest.fixture
def s3(s3_endpoint):
    """The moto endpoint plus a fresh s3fs (fsspec caches filesystems across endpoints otherwise)."""
    import s3fs  # noqa: PLC0415

    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_endpoint, fsspec.filesystem("s3", skip_instance_cache=True)


def _config(path, **fields) -> ShardConfig:
    base = ShardConfig(source=SourceConfig(path=str(path)), image=ImageConfig(size=8), samples_per_shard=8,
                       run=RunOptions(max_in_flight=3))
    return replace(base, **fields)


def _local(path) -> dict[str, bytes]:
    return read_tree(fsspec.filesystem("file"), str(path))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_folder(tmp_path_factory.mktemp("src") / "imgs", 30)
    (root / "img-005.jpg").write_bytes(jpeg(3))  # an exact duplicate of img-003 → dropped in unit 0
    (root / "img-020.jpg").write_bytes(jpeg(1))  # a duplicate across shards (unit 2 of unit 0's image)
    return root


def test_file_and_s3_outputs_are_identical_and_reruns_do_nothing(ray_local, folder, tmp_path, s3):
    endpoint, fs = s3
    config = _config(folder)
    local = run_pipeline(config, f"file://{tmp_path}/out", progress=False)
    remote = run_pipeline(config, f"s3://{endpoint.bucket}/out", progress=False)
    files = _local(tmp_path / "out")
    assert files == read_tree(fs, f"{endpoint.bucket}/out")
    assert sorted(files) == ["manifest.json"] + [f"part-{i:06d}.{e}" for i in range(4) for e in ("stats.json", "tar")]
    assert local.counts == remote.counts == {"ok": 28, "duplicate": 2}
    assert local.samples == 28 and local.shards == 4 and local.units_written == 4
    again = run_pipeline(config, f"s3://{endpoint.bucket}/out", progress=False)
    assert again.nothing_to_do and again.units_written == 0 and not again.manifest_written
    assert read_tree(fs, f"{endpoint.bucket}/out") == files


def test_output_does_not_depend_on_workers_window_or_threads(ray_local, folder, tmp_path):
    serial = _config(folder, run=RunOptions(num_workers=1, max_in_flight=1, threads_per_worker=1))
    wide = _config(folder, run=RunOptions(num_workers=2, max_in_flight=4, threads_per_worker=3))
    run_pipeline(serial, str(tmp_path / "a"), progress=False)
    run_pipeline(wide, str(tmp_path / "b"), progress=False)
    assert _local(tmp_path / "a") == _local(tmp_path / "b")


def test_resume_rewrites_only_missing_or_damaged_shards(ray_local, folder, tmp_path):
    config = _config(folder)
    run_pipeline(config, str(tmp_path / "clean"), progress=False)
    clean = _local(tmp_path / "clean")
    out = tmp_path / "out"
    run_pipeline(config, str(out), progress=False)
    (out / "manifest.json").unlink()
    (out / "part-000001.tar").unlink()  # stats left behind: the tar is missing → redo
    (out / "part-000002.stats.json").unlink()  # tar left behind: not known complete → redo
    (out / "part-000003.tar").write_bytes(b"truncated")  # size mismatch → redo
    summary = run_pipeline(config, str(out), progress=False)
    assert summary.units_written == 3 and summary.units_reused == 1
    assert _local(out) == clean
    other = replace(config, image=ImageConfig(size=16))
    with pytest.raises(ValueError, match="different shard config"):
        run_pipeline(other, str(out), progress=False)


def test_bad_samples_are_skipped_and_counted_by_reason(ray_local, tmp_path):
    good = {f"/g{i}.jpg": jpeg(100 + i) for i in range(12)}
    bad = {"/corrupt.jpg": corrupt_jpeg(), "/text.jpg": b"plain text, not an image", "/trunc.jpg": truncated_jpeg(),
           "/huge.png": huge_png()}
    with ImageServer({**good, **bad}, slow_s=3.0) as server:
        rows = [(f"{server.url}{p}", f"good picture {p}") for p in good]
        rows[3:3] = [(f"{server.url}/corrupt.jpg", "corrupt"), (f"{server.url}/text.jpg", "text"),
                     (f"{server.url}/trunc.jpg", "truncated"), (f"{server.url}/g0.jpg", ""),
                     (f"{server.url}/missing.jpg", "404"), (f"{server.url}/slow/g1.jpg", "slow"),
                     (f"{server.url}/huge.png", "huge"), (f"{server.url}/g2.jpg", "same bytes as g2")]
        table = tmp_path / "urls.jsonl"
        table.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in rows))
        config = _config(table, source=SourceConfig(path=str(table), download_timeout=0.5, download_retries=0))
        summary = run_pipeline(config, str(tmp_path / "out"), progress=False)
    assert summary.counts == {"ok": 12, "failed_download": 2, "failed_decode": 3, "too_large": 1,
                              "empty_caption": 1, "duplicate": 1}
    assert summary.items == 20 and summary.shards == 3
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.total_samples == 12 and manifest.counts == summary.counts
    samples = list(wds.WebDataset(manifest.shard_urls(str(tmp_path / "out")), shardshuffle=False).decode("pil"))
    assert sorted(s["json"]["url"].rsplit("/", 1)[1] for s in samples) == sorted(p[1:] for p in good)
    stats = json.loads((tmp_path / "out" / "part-000000.stats.json").read_text())
    assert stats["counts"] == {"empty_caption": 1, "failed_decode": 3, "failed_download": 1, "ok": 3}
    assert stats["samples"] == 3 and len(stats["hashes"]) == 3


def test_shards_load_in_plain_webdataset_and_digits_keep_labels(ray_local, tmp_path):
    config = _config("digits:heldout", image=ImageConfig(size=8, format="png"), samples_per_shard=100,
                     filters=FilterConfig(dedup=False))
    summary = run_pipeline(config, str(tmp_path / "digits"), progress=False)
    assert summary.samples == 359 and summary.shards == 4
    urls = read_manifest(str(tmp_path / "digits")).shard_urls(str(tmp_path / "digits"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 359 and {"__key__", "png", "txt", "json"} <= samples[0].keys()
    assert samples[0]["__key__"] == "000000000" and samples[-1]["__key__"] == "000030058"
    assert samples[0]["png"].size == (8, 8) and samples[0]["png"].mode == "RGB"
    from data_pipeline.digits import load_digits_split  # noqa: PLC0415

    assert [s["json"]["label"] for s in samples] == load_digits_split("heldout", 8).labels.tolist()
    assert all(s["txt"] == s["json"]["caption"] for s in samples)


def test_img2dataset_layout_shards_are_a_source(ray_local, tmp_path):
    source = tmp_path / "i2d"
    source.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(source / f"{shard:05d}.tar")) as writer:
            for i in range(shard * 10, shard * 10 + 10):
                meta = {"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "status": "success"}
                writer.write({"__key__": f"{i:09d}", "jpg": jpeg(i, (24, 20)), "txt": f"caption {i}", "json": meta})
    summary = run_pipeline(_config(source, samples_per_shard=6), str(tmp_path / "out"), progress=False)
    assert summary.counts == {"ok": 20} and summary.shards == 4
    urls = read_manifest(str(tmp_path / "out")).shard_urls(str(tmp_path / "out"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["txt"] for s in samples] == [f"caption {i}" for i in range(20)]
    assert samples[13]["json"]["url"] == "http://example.com/13.jpg" and samples[13]["jpg"].size == (8, 8)
    assert samples[13]["json"]["original_width"] == 24


def test_s3_outage_mid_run_fails_naming_the_url_and_a_rerun_completes(ray_local, folder, tmp_path, s3):
    endpoint, fs = s3
    gate = tmp_path / "gate"
    hook = FilterConfig(scorer="tests.shard_helpers:gated_score", scorer_options={"gate": str(gate)})
    config = _config(folder, filters=hook)
    out = f"s3://{endpoint.bucket}/outage"
    errors: list[BaseException] = []

    def job():
        try:
            run_pipeline(config, out, progress=False)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while not fs.exists(f"{endpoint.bucket}/outage/part-000000.stats.json"):
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.1)
        fs.invalidate_cache()
    endpoint.stop()
    gate.touch()  # units 1.. finish now, and their uploads meet a dead endpoint
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], StorageError)
    assert f"{out}/part-000001.tar" in str(errors[0])
    endpoint.start()
    fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{endpoint.bucket}/outage"))
    assert "part-000000.tar" in left and "manifest.json" not in left and "part-000001.tar" not in left
    resumed = run_pipeline(config, out, progress=False)
    assert resumed.units_reused >= 1 and resumed.units_written <= 3
    run_pipeline(config, str(tmp_path / "clean"), progress=False)
    assert read_tree(fs, f"{endpoint.bucket}/outage") == _local(tmp_path / "clean")


def test_a_unit_with_every_sample_filtered_is_left_out_of_the_manifest(ray_local, tmp_path):
    """Unit 1 keeps nothing: it gets a stats file and no tar; reruns, resume and the loader cope."""
    from data_pipeline.loader import ShardStream  # noqa: PLC0415

    root = write_folder(tmp_path / "imgs", 24)
    for i in range(8, 16):
        (root / f"img-{i:03d}.txt").write_text("")  # every caption of unit 1 is empty
    config, out = _config(root), tmp_path / "out"
    summary = run_pipeline(config, str(out), progress=False)
    files = _local(out)
    assert sorted(files) == ["manifest.json", "part-000000.stats.json", "part-000000.tar", "part-000001.stats.json",
                             "part-000002.stats.json", "part-000002.tar"]
    assert summary.counts == {"ok": 16, "empty_caption": 8} and (summary.shards, summary.samples) == (2, 16)
    assert [s.name for s in read_manifest(str(out)).shards] == ["part-000000.tar", "part-000002.tar"]
    assert json.loads(files["part-000001.stats.json"])["name"] is None
    again = run_pipeline(config, str(out), progress=False)
    assert again.nothing_to_do and _local(out) == files
    (out / "manifest.json").unlink()
    (out / "part-000002.tar").unlink()
    resumed = run_pipeline(config, str(out), progress=False)
    assert (resumed.units_written, resumed.units_reused) == (1, 2) and _local(out) == files
    stream = ShardStream(str(out), shuffle_buffer=0)
    keys = [next(stream)["key"] for _ in range(16)]
    assert sorted(keys) == [f"0000000{i:02d}" for i in range(8)] + [f"0000200{i:02d}" for i in range(8)]
    assert stream.epoch == 0 and not stream.stats.truncated and not stream.stats.count_mismatch


def test_resharding_reports_a_truncated_input_shard_by_name(ray_local, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(source / f"{shard:05d}.tar")) as writer:
            for i in range(shard * 10, shard * 10 + 10):
                writer.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"caption {i}"})
    broken = source / "00001.tar"
    with tarfile.open(broken) as tar:
        members = tar.getmembers()
    broken.write_bytes(broken.read_bytes()[:members[8].offset])  # cut between members: tarfile sees no error
    summary = run_pipeline(_config(source), str(tmp_path / "out"), progress=False)
    assert len(summary.input_problems) == 1 and "00001.tar" in summary.input_problems[0]
    assert "truncated" in summary.input_problems[0] and "3 whole sample(s) used, '000000013' dropped" in summary.input_problems[0]
    assert summary.counts == {"ok": 13, "truncated_input_shards": 1}
    assert read_manifest(str(tmp_path / "out")).counts == summary.counts
