"""Per-sample transforms: every rejection has its named reason; resize modes give the right sizes."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from data_pipeline.shard_config import FilterConfig, ImageConfig
from data_pipeline.transforms import RawSample, Rejected, check_caption, load_scorer, resize, transform
from tests.shard_helpers import corrupt_jpeg, huge_png, jpeg, truncated_jpeg


def _png(size: tuple[int, int], mode: str = "RGB", color=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def _reason(data: bytes, image=None, filters=None, caption="a caption") -> str:
    filters = filters or FilterConfig()
    try:
        check_caption(caption, filters)
        transform(RawSample(caption, {}, data=data), "000000000", image or ImageConfig(size=8), filters)
    except Rejected as rejected:
        return rejected.reason
    return "ok"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (jpeg(0), "ok"),
        (corrupt_jpeg(), "failed_decode"),
        (truncated_jpeg(), "failed_decode"),
        (b"this is not an image", "failed_decode"),
        (b"", "failed_decode"),
        (huge_png(), "too_large"),
    ],
)
def test_decode_failures_have_their_reason(data, reason):
    assert _reason(data) == reason


def test_max_pixels_is_the_configured_limit_not_pillows():
    declared = huge_png(3000, 3000)  # 9 MP: under Pillow's default guard
    assert _reason(declared, ImageConfig(size=8, max_pixels=8_999_999)) == "too_large"
    assert _reason(_png((40, 40)), ImageConfig(size=8, max_pixels=1600)) == "ok"
    assert _reason(_png((40, 41)), ImageConfig(size=8, max_pixels=1600)) == "too_large"


def test_size_and_aspect_filters():
    filters = FilterConfig(min_image_size=20, max_aspect_ratio=2.0)
    assert _reason(_png((19, 40)), filters=filters) == "too_small"
    assert _reason(_png((20, 40)), filters=filters) == "ok"
    assert _reason(_png((20, 41)), filters=filters) == "bad_aspect"


@pytest.mark.parametrize(
    ("caption", "filters", "reason"),
    [
        ("", FilterConfig(), "empty_caption"),
        ("   ", FilterConfig(), "empty_caption"),
        ("", FilterConfig(allow_empty_caption=True), "ok"),
        ("abcd", FilterConfig(min_caption_length=5), "caption_length"),
        ("abcde", FilterConfig(min_caption_length=5), "ok"),
        ("abcdef", FilterConfig(max_caption_length=5), "caption_length"),
    ],
)
def test_caption_filters(caption, filters, reason):
    assert _reason(jpeg(1), filters=filters, caption=caption) == reason


@pytest.mark.parametrize(
    ("mode", "source", "expected"),
    [
        ("center_crop", (40, 20), (16, 16)),
        ("pad", (40, 20), (16, 16)),
        ("keep_ratio", (40, 20), (32, 16)),
        ("keep_ratio", (10, 30), (16, 48)),
        ("center_crop", (8, 8), (16, 16)),  # upscales, as img2dataset does
    ],
)
def test_resize_modes(mode, source, expected):
    assert resize(Image.new("RGB", source, (255, 0, 0)), 16, mode).size == expected


def test_pad_adds_black_borders_and_crop_keeps_the_centre():
    picture = Image.new("RGB", (40, 20), (255, 255, 255))
    padded = resize(picture, 16, "pad")
    assert padded.getpixel((8, 0)) == (0, 0, 0) and padded.getpixel((8, 8)) == (255, 255, 255)
    halves = Image.new("RGB", (60, 20), (255, 0, 0))
    halves.paste((0, 0, 255), (20, 0, 40, 20))  # blue centre third
    assert resize(halves, 16, "center_crop").getpixel((8, 8))[2] > 200


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encoded_sample_metadata_and_format(fmt):
    sample = transform(RawSample("cap", {"source": "table", "url": "http://x/1.png", "label": 3},
                                 data=_png((30, 20), "RGBA", (0, 0, 0, 0))),
                       "000010002", ImageConfig(size=8, format=fmt, quality=80), FilterConfig())
    decoded = Image.open(io.BytesIO(sample.image_bytes))
    assert decoded.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt] and decoded.size == (8, 8)
    assert decoded.convert("RGB").getpixel((4, 4))[0] > 240  # transparent composited onto white
    record = sample.tar_record()
    meta = json.loads(record["json"])
    assert set(record) == {"__key__", fmt, "txt", "json"} and record["txt"] == b"cap"
    assert meta["original_width"] == 30 and meta["original_height"] == 20 and meta["label"] == 3
    assert meta["url"] == "http://x/1.png" and meta["key"] == "000010002" and len(meta["sha256"]) == 64


def test_transform_is_deterministic():
    make = lambda: transform(RawSample("c", {}, data=jpeg(5, (50, 30))), "k", ImageConfig(size=16), FilterConfig())  # noqa: E731
    assert make().image_bytes == make().image_bytes


def test_scorer_hook_filters_low_scores():
    scorer = load_scorer("tests.shard_helpers:brightness_score")
    filters = FilterConfig(scorer="tests.shard_helpers:brightness_score", min_score=0.5)
    bright = RawSample("c", {}, data=_png((8, 8), color=(250, 250, 250)))
    dark = RawSample("c", {}, data=_png((8, 8), color=(5, 5, 5)))
    assert transform(bright, "k", ImageConfig(size=8, format="png"), filters, scorer).meta["score"] > 0.9
    with pytest.raises(Rejected) as rejected:
        transform(dark, "k", ImageConfig(size=8), filters, scorer)
    assert rejected.value.reason == "low_score"


@pytest.mark.parametrize("path", ["tests.shard_helpers:no_such_fn", "no_such_module_xyz:fn"])
def test_bad_scorer_path_is_named(path):
    with pytest.raises(ValueError, match=path.split(":")[0]):
        load_scorer(path)
