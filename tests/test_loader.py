"""The shard loader: rank/worker split, exact resume, world-size change, bad data, S3, img2dataset
layout, and the trainer training from shards."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline.loader import NoShardForRankError, ShardStream, merge_states
from data_pipeline.manifest import Manifest, ShardEntry, write_manifest

SHARDS, PER_SHARD = 6, 5


def image_bytes(value: int, size=(8, 8), fmt="PNG") -> bytes:
    pixels = np.random.default_rng(value).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shards(directory, shards=SHARDS, per_shard=PER_SHARD, size=(8, 8), manifest=True, broken=None) -> list[str]:
    """``shards`` × ``per_shard`` samples in img2dataset's layout (``{key}.png|jpg``, ``.txt``, ``.json``)
    plus a manifest; ``broken`` maps a key to "decode" (garbage image) or "caption" (no .txt)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    broken = broken or {}
    entries, keys = [], []
    for shard in range(shards):
        path = directory / f"part-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for index in range(per_shard):
                key = f"{shard:04d}{index:05d}"
                value = shard * 100 + index
                sample = {"__key__": key, "png": image_bytes(value, size), "txt": f"a photo of thing {value}",
                          "json": {"key": key, "label": value % 10, "status": "success"}}
                if broken.get(key) == "decode":
                    sample["png"] = b"not an image at all"
                if broken.get(key) == "caption":
                    del sample["txt"]
                writer.write(sample)
                keys.append(key)
        data = path.read_bytes()
        entries.append(ShardEntry(path.name, per_shard, len(data), hashlib.sha256(data).hexdigest()))
    if manifest:
        write_manifest(str(directory), Manifest(entries))
    return keys


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shards")
    keys = write_shards(directory)
    return str(directory), keys


def take(stream, n) -> list[str]:
    return [next(stream)["key"] for _ in range(n)]


def rest_of_epoch(stream) -> list[str]:
    """Keys until the stream starts its next epoch (the first sample of that epoch is dropped)."""
    epoch, keys = stream.epoch, []
    while True:
        sample = next(stream)
        if stream.epoch != epoch:
            return keys
        keys.append(sample["key"])


def roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_sample_exactly_once_per_epoch(dataset, workers):
    directory, keys = dataset
    streams = [ShardStream(directory, seed=3, rank=r, world_size=2, num_workers=workers, shuffle_buffer=4) for r in range(2)]
    for epoch in range(2):
        seen = [take(s, 15) for s in streams]  # 6 shards x 5 samples split over 2 ranks: 15 each
        assert sorted(seen[0] + seen[1]) == sorted(keys), epoch
        assert all(s.epoch == epoch for s in streams)
    first = ShardStream(directory, seed=3, rank=0, world_size=2, num_workers=workers, shuffle_buffer=4)
    assert take(first, 15) != take(first, 15)  # the next epoch is reshuffled


def test_samples_are_the_images_captions_and_labels_written(dataset):
    directory, _ = dataset
    sample = next(ShardStream(directory, seed=0, shuffle_buffer=0))
    shard, index = int(sample["key"][:4]), int(sample["key"][4:])
    value = shard * 100 + index
    assert sample["caption"] == f"a photo of thing {value}" and sample["label"] == value % 10
    expected = np.asarray(Image.open(io.BytesIO(image_bytes(value))).convert("RGB"))
    assert sample["image"].dtype == np.uint8 and np.array_equal(sample["image"], expected)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [7, 13, 22])  # mid-shard; just before the epoch end; inside epoch 1
def test_resume_continues_exactly(dataset, workers, cut):
    directory, _ = dataset
    make = lambda: ShardStream(directory, seed=5, rank=0, world_size=2, num_workers=workers, shuffle_buffer=3)  # noqa: E731
    straight = take(make(), 40)
    first = make()
    before = take(first, cut)
    state = roundtrip(first.state_dict())
    first.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert before + take(resumed, 40 - cut) == straight


def test_resume_with_another_worker_count_neither_repeats_nor_skips(dataset):
    directory, keys = dataset
    first = ShardStream(directory, seed=5, num_workers=2, shuffle_buffer=3)
    before = take(first, 12)
    resumed = ShardStream(directory, seed=5, num_workers=0, shuffle_buffer=3)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert sorted(before + rest_of_epoch(resumed)) == sorted(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_world_size_change_restores_exactly_the_rest_of_the_epoch(dataset, workers):
    directory, keys = dataset
    make = lambda rank, world: ShardStream(directory, seed=7, rank=rank, world_size=world,  # noqa: E731
                                           num_workers=workers, shuffle_buffer=3)
    # 2 ranks -> 1
    ranks = [make(0, 2), make(1, 2)]
    consumed = take(ranks[0], 4) + take(ranks[1], 8)
    merged = roundtrip(merge_states([r.state_dict() for r in ranks]))
    single = make(0, 1)
    single.load_state_dict(merged)
    rest = rest_of_epoch(single)
    assert sorted(consumed + rest) == sorted(keys) and len(rest) == len(keys) - 12
    # 1 -> 2, from a position mid-way through that epoch
    single = make(0, 1)
    single.load_state_dict(merged)
    more = take(single, 5)
    merged_again = roundtrip(merge_states([single.state_dict()]))
    halves = []
    for rank in range(2):
        stream = make(rank, 2)
        stream.load_state_dict(merged_again)
        halves.append(rest_of_epoch(stream))
    assert not set(halves[0]) & set(halves[1]) and all(halves)
    assert sorted(consumed + more + halves[0] + halves[1]) == sorted(keys)


def test_trainer_reshard_hook_resumes_shard_positions_at_another_world_size(dataset):
    """The trainer's world-size-change path (pretrain.checkpoint.reshard) finds the stream's
    merge_states method: 2 saved rank positions load into a 1-rank stream and yield the rest."""
    from pretrain.checkpoint import reshard  # noqa: PLC0415

    directory, keys = dataset
    ranks = [ShardStream(directory, seed=3, rank=r, world_size=2, shuffle_buffer=3) for r in range(2)]
    consumed = take(ranks[0], 5) + take(ranks[1], 5)
    saved = [roundtrip(r.state_dict()) for r in ranks]
    single = ShardStream(directory, seed=3, rank=0, world_size=1, shuffle_buffer=3)
    single.load_state_dict(reshard("data", single, saved, 0, 1))
    rest = rest_of_epoch(single)
    assert sorted(consumed + rest) == sorted(keys) and len(rest) == len(keys) - 10


def test_merge_counts_ranks_ahead_by_an_epoch_as_done(dataset):
    directory, keys = dataset
    ranks = [ShardStream(directory, seed=1, rank=r, world_size=2, shuffle_buffer=0) for r in range(2)]
    head = take(ranks[0], 17)  # rank 0 finished epoch 0 and read 2 samples of epoch 1
    lagging = take(ranks[1], 6)
    single = ShardStream(directory, seed=1, shuffle_buffer=0)
    single.load_state_dict(merge_states([r.state_dict() for r in ranks]))
    assert single.epoch == 0
    assert sorted(head[:15] + lagging + rest_of_epoch(single)) == sorted(keys)


def test_position_from_another_world_size_must_be_merged_first(dataset):
    directory, _ = dataset
    state = ShardStream(directory, rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="merge_states"):
        ShardStream(directory, rank=0, world_size=1).load_state_dict(state)


@pytest.mark.parametrize("cut", [0.3, 0.55, 0.8, 0.99, "boundary"])  # in member data, headers, padding
def test_truncated_shard_is_reported_with_name_and_count(tmp_path, caplog, cut):
    write_shards(tmp_path, shards=2)
    path = tmp_path / "part-000001.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    content_end = members[-1].offset_data + members[-1].size
    at = members[6].offset if cut == "boundary" else int(content_end * cut)
    path.write_bytes(path.read_bytes()[:at])
    stream = ShardStream(str(tmp_path), shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="diffdis.data"):
        keys = rest_of_epoch(stream)
    assert "part-000001.tar" in stream.stats.truncated
    read = stream.stats.truncated["part-000001.tar"]
    from_shard = sum(k.startswith("0001") for k in keys) + sum(k.startswith("part-000001.tar") for k in stream.stats.skipped_keys)
    assert 0 < read < PER_SHARD and from_shard == read and sum(k.startswith("0000") for k in keys) == PER_SHARD
    assert stream.stats.count_mismatch["part-000001.tar"] == [read, PER_SHARD]
    assert f"shard part-000001.tar is truncated or corrupt after {read} sample(s)" in caplog.text
    assert f"shard part-000001.tar gave {read} sample(s), its manifest entry says {PER_SHARD}" in caplog.text


def test_corrupt_samples_are_skipped_counted_and_logged_by_key(tmp_path, caplog):
    keys = write_shards(tmp_path, shards=2, broken={"000000002": "decode", "000100004": "caption"})
    stream = ShardStream(str(tmp_path), shuffle_buffer=0, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="diffdis.data"):
        got = rest_of_epoch(stream)
    assert sorted(got) == sorted(set(keys) - {"000000002", "000100004"})
    assert stream.stats.skipped == {"decode_error": 1, "missing_caption": 1}
    assert "'000000002' of shard part-000000.tar: decode_error" in caplog.text
    assert "'000100004' of shard part-000001.tar: missing_caption" in caplog.text


def test_a_rank_without_a_shard_fails_fast(tmp_path):
    write_shards(tmp_path, shards=2)
    with pytest.raises(NoShardForRankError, match=r"2 shard\(s\) cannot feed world size 3"):
        ShardStream(str(tmp_path), rank=2, world_size=3)


def test_missing_shard_is_an_error_naming_it(tmp_path):
    write_shards(tmp_path, shards=2)
    (tmp_path / "part-000001.tar").unlink()
    stream = ShardStream(str(tmp_path), shuffle_buffer=0)
    with pytest.raises(FileNotFoundError, match="part-000001.tar"):
        take(stream, 10)


def test_resampled_mode_is_seeded_per_rank_and_resumes_exactly(dataset):
    directory, keys = dataset
    make = lambda rank: ShardStream(directory, seed=2, rank=rank, world_size=2, resampled=True, shuffle_buffer=3)  # noqa: E731
    straight = take(make(0), 30)
    assert set(straight) <= set(keys) and len(set(straight)) < 30  # drawn with replacement
    assert take(make(1), 30) != straight
    first = make(0)
    before = take(first, 11)
    resumed = make(0)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.state_dict()["drawn"] == 11
    assert before + take(resumed, 19) == straight


def test_s3_gives_the_same_samples_as_local_files(dataset, s3_endpoint):
    directory, _ = dataset
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(directory + "/", f"{s3_endpoint.bucket}/shards/", recursive=True)
    url = f"s3://{s3_endpoint.bucket}/shards"
    for workers in (0, 2):
        remote = take(ShardStream(url, seed=4, num_workers=workers), 30)
        local = take(ShardStream("file://" + directory, seed=4, num_workers=workers), 30)
        assert remote == local
    brace = take(ShardStream(f"{url}/part-{{000000..000005}}.tar", seed=4, shuffle_buffer=0), 30)
    assert sorted(brace) == sorted(local)


def test_img2dataset_shards_load_unchanged_and_ours_load_in_plain_webdataset(tmp_path):
    # img2dataset: 9-digit keys, jpg at another size, json with url/caption/status, no manifest
    with wds.TarWriter(str(tmp_path / "00000.tar")) as writer:
        for index in range(4):
            key = f"{index:09d}"
            writer.write({"__key__": key, "jpg": image_bytes(index, size=(12, 10), fmt="JPEG"), "txt": f"caption {index}",
                          "json": {"url": f"http://example.com/{index}.jpg", "key": key, "status": "success",
                                   "caption": f"caption {index}", "width": 12, "height": 10}})
    samples = [next(s) for s in [ShardStream(str(tmp_path / "00000.tar"), image_size=8, shuffle_buffer=0)] for _ in range(4)]
    assert [s["key"] for s in samples] == [f"{i:09d}" for i in range(4)]
    assert all(s["image"].shape == (8, 8, 3) and s["label"] == -1 for s in samples)
    assert samples[2]["caption"] == "caption 2"
    ours = tmp_path / "ours"
    keys = write_shards(ours, shards=2)
    plain = wds.WebDataset(str(ours / "part-{000000..000001}.tar"), shardshuffle=False).decode("rgb8")
    loaded = list(plain)
    assert [s["__key__"] for s in loaded] == keys
    assert loaded[0]["png"].shape == (8, 8, 3) and loaded[0]["json"]["label"] == 0


def test_globs_and_directories_without_manifest(tmp_path):
    keys = write_shards(tmp_path, shards=3, manifest=False)
    for spec in (str(tmp_path / "part-*.tar"), str(tmp_path), [str(tmp_path / "part-000000.tar"), str(tmp_path / "part-00000[12].tar")]):
        assert sorted(take(ShardStream(spec, seed=0), 15)) == sorted(keys)


# -- the trainer on shards -------------------------------------------------------------------------
@pytest.mark.integration
def test_trainer_trains_from_shards_and_resumes_the_data_position(tmp_path):
    from pretrain.checkpoint import tag_for  # noqa: PLC0415
    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415
    from pretrain.data import make_batch  # noqa: PLC0415
    from pretrain.trainer import Trainer  # noqa: PLC0415

    class RecordingTrainer(Trainer):
        """Records the keys of every batch (the trainer's own next_batch, plus the keys)."""

        def next_batch(self):
            samples = [next(self.batches) for _ in range(self.micro_batch)]
            self.keys = getattr(self, "keys", []) + [[s["key"] for s in samples]]
            return make_batch(samples, self.tokenizer, self.config, self.runtime)

    write_shards(tmp_path / "shards", shards=4, per_shard=6)
    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [
        "model.image_size=8", "data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.num_workers=2",
        "data.shuffle_buffer=4", "train.steps=6", "train.batch_size=8", "train.checkpoint_every=3",
        "train.keep_last=0", "train.log_every=1"])
    straight = RecordingTrainer(config, tmp_path / "straight")
    straight.train()
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / tag_for(3), resumed_dir / "checkpoints" / tag_for(3))
    shutil.copytree(tmp_path / "straight" / "tokenizer", resumed_dir / "tokenizer")
    resumed = RecordingTrainer(config, resumed_dir, resume="auto")
    resumed.train()
    assert resumed.keys == straight.keys[3:]
    assert len({k for batch in straight.keys[:3] for k in batch}) == 24  # one epoch of 4 x 6, no repeat
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(resumed_dir) == pytest.approx(losses(tmp_path / "straight")[3:], abs=1e-6)
    state = json.loads((tmp_path / "straight" / "checkpoints" / tag_for(3) / "trainer_state" / "rank-00000.json").read_text())
    assert state["data"]["mode"] == "epoch" and state["data"]["samples"] == 24
