"""Sources enumerate items in a fixed order, load captions and bytes, and name what is wrong."""

from __future__ import annotations

import json
import logging
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_pipeline.digits import TRAIN_TEMPLATES, caption_for, load_digits_split
from data_pipeline.shard_config import SourceConfig
from data_pipeline.sources import SourceError, open_source, resolve_kind
from data_pipeline.transforms import Rejected
from tests.shard_helpers import ImageServer, jpeg, write_folder


def _load(source, item):
    caption = source.loader.caption(item)
    return source.loader.fetch(item, caption)


def test_folder_lists_sorted_images_with_sidecar_captions(tmp_path):
    root = write_folder(tmp_path / "imgs", 5)
    (root / "sub").mkdir()
    (root / "sub" / "extra.png").write_bytes(jpeg(50))  # no sidecar: empty caption
    (root / "notes.md").write_text("ignored")
    source = open_source(SourceConfig(path=str(root)), 16)
    assert source.kind == "folder" and len(source) == 6
    assert [item[0] for item in source.items] == [f"img-{i:03d}.jpg" for i in range(5)] + ["sub/extra.png"]
    raw = _load(source, source.items[2])
    assert raw.caption == "a picture of noise number 2" and raw.data == jpeg(2)
    assert raw.meta == {"source": "folder", "path": "img-002.jpg"}
    assert _load(source, source.items[5]).caption == ""
    assert source.num_units(4) == 2 and source.unit_items(1, 4) == source.items[4:]


@pytest.mark.parametrize("suffix", ["csv", "tsv", "parquet", "jsonl"])
def test_tables_in_every_format_read_urls_and_captions(tmp_path, suffix):
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    (tmp_path / "b.jpg").write_bytes(jpeg(2))
    rows = {"image_url": ["a.jpg", f"file://{tmp_path}/b.jpg"], "text": ["first", "second"]}
    path = tmp_path / f"table.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.table(rows), path)
    elif suffix == "jsonl":
        path.write_text("".join(json.dumps({"image_url": u, "text": t}) + "\n" for u, t in zip(*rows.values())))
    else:
        sep = "\t" if suffix == "tsv" else ","
        path.write_text(f"image_url{sep}text\n" + "".join(f"{u}{sep}{t}\n" for u, t in zip(*rows.values())))
    source = open_source(SourceConfig(path=str(path), url_column="image_url", caption_column="text"), 16)
    assert source.kind == "table" and [item[2] for item in source.items] == ["first", "second"]
    assert _load(source, source.items[0]).data == jpeg(1)  # relative to the table's folder
    assert _load(source, source.items[1]).data == jpeg(2)


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("url,text\nx.jpg,hi\n")
    with pytest.raises(SourceError, match=r"t\.csv.*'caption'.*caption_column.*url, text"):
        open_source(SourceConfig(path=str(path)), 16)


def test_missing_paths_are_named(tmp_path):
    for path in (tmp_path / "nope.csv", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match=str(path)):
            open_source(SourceConfig(path=str(path)), 16)


def test_http_download_failures(tmp_path):
    with ImageServer({"/ok.jpg": jpeg(3)}, slow_s=2.0) as server:
        path = tmp_path / "t.csv"
        path.write_text(f"url,caption\n{server.url}/ok.jpg,a\n{server.url}/missing.jpg,b\n{server.url}/slow/ok.jpg,c\n")
        source = open_source(SourceConfig(path=str(path), download_timeout=0.3, download_retries=1), 16)
        assert _load(source, source.items[0]).data == jpeg(3)
        for item, detail in ((source.items[1], "404"), (source.items[2], "slow/ok.jpg")):
            with pytest.raises(Rejected) as rejected:
                _load(source, item)
            assert rejected.value.reason == "failed_download" and detail in str(rejected.value)


def _img2dataset_shard(path, count: int, start: int = 0) -> None:
    """img2dataset's layout: keys 000000000.., jpg/txt/json, json holding url, caption, status."""
    with wds.TarWriter(str(path)) as writer:
        for i in range(start, start + count):
            meta = {"url": f"http://example.com/{i}.jpg", "caption": f"caption {i}", "key": f"{i:09d}", "status": "success"}
            writer.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"caption {i}", "json": json.dumps(meta).encode()})


def test_img2dataset_shards_are_enumerated_in_shard_then_member_order(tmp_path):
    _img2dataset_shard(tmp_path / "00000.tar", 3)
    _img2dataset_shard(tmp_path / "00001.tar", 2, start=3)
    (tmp_path / "00000_stats.json").write_text("{}")
    assert resolve_kind(SourceConfig(path=str(tmp_path))) == "shards"
    source = open_source(SourceConfig(path=str(tmp_path)), 16)
    assert [key for _, key in source.items] == [f"{i:09d}" for i in range(5)]
    source.loader.prepare(source.items[2:4])  # a unit spanning both shards
    raw = _load(source, source.items[3])
    assert raw.caption == "caption 3" and raw.data == jpeg(3) and raw.meta["url"] == "http://example.com/3.jpg"
    braces = open_source(SourceConfig(path=str(tmp_path) + "/{00000..00001}.tar"), 16)
    assert braces.items == source.items


def test_truncated_input_shard_gives_its_whole_samples_and_is_named(tmp_path, caplog):
    _img2dataset_shard(tmp_path / "00000.tar", 3)
    _img2dataset_shard(tmp_path / "00001.tar", 4, start=3)
    broken = tmp_path / "00001.tar"
    with tarfile.open(broken) as tar:
        members = tar.getmembers()  # 3 members per sample: jpg, json, txt
    broken.write_bytes(broken.read_bytes()[:members[7].offset_data + 100])  # cut inside sample 5's json
    with caplog.at_level(logging.WARNING, logger="data_pipeline.sources"):
        source = open_source(SourceConfig(path=str(tmp_path)), 16)
    assert [key for _, key in source.items] == [f"{i:09d}" for i in range(5)]  # 5 is cut, 6 never read
    assert len(source.problems) == 1 and str(broken) in source.problems[0] and "2 whole sample(s)" in source.problems[0]
    assert source.problems[0] in caplog.text
    source.loader.prepare(source.items[3:5])  # the worker reads the same whole samples
    assert _load(source, source.items[4]).caption == "caption 4"


def test_digits_source_fixed_captions_and_labels():
    source = open_source(SourceConfig(path="digits:heldout", caption_seed=1), 8)
    split = load_digits_split("heldout", image_size=8)
    assert source.kind == "digits" and len(source) == len(split) == 359
    raws = [_load(source, i) for i in range(20)]
    assert [r.meta["label"] for r in raws] == split.labels[:20].tolist()
    assert all(r.caption in {caption_for(r.meta["label"], t) for t in range(len(TRAIN_TEMPLATES))} for r in raws)
    assert len({r.caption.replace(str(r.meta["label"]), "") for r in raws}) > 3  # templates vary across samples
    again = open_source(SourceConfig(path="digits:heldout", caption_seed=1), 8)
    assert [_load(again, i).caption for i in range(20)] == [r.caption for r in raws]
    other_seed = open_source(SourceConfig(path="digits:heldout", caption_seed=2), 8)
    assert [_load(other_seed, i).caption for i in range(20)] != [r.caption for r in raws]
    assert raws[0].image.size == (8, 8)


def test_digits_captions_per_image_repeats_the_split_with_distinct_captions():
    copies = 3
    source = open_source(SourceConfig(path="digits:heldout", captions_per_image=copies), 8)
    single = open_source(SourceConfig(path="digits:heldout"), 8)
    n = len(single)
    assert len(source) == copies * n
    for position in (0, 7, n - 1):
        raws = [_load(source, position + v * n) for v in range(copies)]
        assert len({r.meta["original_key"] for r in raws}) == 1  # the same image ...
        assert len({r.caption for r in raws}) == copies  # ... with a different caption each time
        assert [r.meta["caption_variant"] for r in raws] == list(range(copies))
        assert raws[0].caption == _load(single, position).caption  # variant 0 is the one-caption shard's
    # consecutive items (one shard) are distinct images, never two captions of one image
    assert len({_load(source, i).meta["original_key"] for i in range(n, n + 20)}) == 20
