"""Tests for the offline tokenizers: byte-level BPE and word-level (``tokenizer_kind``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.digits import TRAIN_TEMPLATES, caption_for, class_prompts
from pretrain.model.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    load_tokenizer,
    special_token_ids,
    tokenize,
    train_tokenizer,
)

MAX_LENGTH = 16
TRAIN_CAPTIONS = [caption_for(label, t) for label in range(10) for t in range(len(TRAIN_TEMPLATES))]
LONG_CAPTION = " ".join(caption_for(label, 0) for label in range(10))


@pytest.fixture(scope="module", params=["bpe", "word"])
def tokenizer(request):
    """Each behaviour both kinds share is tested on both."""
    return train_tokenizer(TRAIN_CAPTIONS, vocab_size=500, max_length=MAX_LENGTH, kind=request.param)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_tokenizer(TRAIN_CAPTIONS, vocab_size=500, max_length=MAX_LENGTH, kind="bpe")


@pytest.fixture(scope="module")
def word_tokenizer():
    return train_tokenizer(TRAIN_CAPTIONS, vocab_size=500, max_length=MAX_LENGTH, kind="word")


def test_special_token_ids(tokenizer) -> None:
    ids = special_token_ids(tokenizer)
    assert ids == {
        "bos": tokenizer.convert_tokens_to_ids(BOS_TOKEN),
        "eos": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "pad": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    }
    assert len(set(ids.values())) == 3
    assert ids["eos"] != 2  # 2 would switch CLIP's text model to its legacy argmax pooling
    assert tokenizer.model_max_length == MAX_LENGTH
    assert len(tokenizer) <= 500


def test_every_text_is_wrapped_in_bos_eos(tokenizer) -> None:
    ids = special_token_ids(tokenizer)
    encoded = tokenizer("a handwritten 7")["input_ids"]
    assert encoded[0] == ids["bos"] and encoded[-1] == ids["eos"]
    assert encoded.count(ids["eos"]) == 1 and encoded.count(ids["bos"]) == 1
    assert tokenizer.decode(encoded, skip_special_tokens=True).strip() == "a handwritten 7"


def test_lowercase_normalisation(tokenizer) -> None:
    shouted = tokenizer("A Photo of the NUMBER Seven")["input_ids"]
    assert shouted == tokenizer("a photo of the number seven")["input_ids"]


def test_training_words_become_single_tokens(tokenizer) -> None:
    # BPE merges frequent caption words, so the class word is one token, not letters.
    content = tokenizer("seven")["input_ids"][1:-1]
    assert len(content) == 1


def test_unseen_word_splits_into_known_pieces(bpe_tokenizer) -> None:
    tokenizer = bpe_tokenizer
    content = tokenizer("zebra")["input_ids"][1:-1]
    assert len(content) > 1
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in content
    assert all(0 <= i < len(tokenizer) for i in content)
    assert set(content).isdisjoint(special_token_ids(tokenizer).values())
    assert tokenizer.decode(content).strip() == "zebra"


def test_eval_prompts_roundtrip_through_decode(bpe_tokenizer) -> None:
    tokenizer = bpe_tokenizer
    for per_class in class_prompts():
        for prompt in per_class:
            ids = tokenizer(prompt)["input_ids"]
            assert tokenizer.decode(ids, skip_special_tokens=True).strip() == prompt


def test_padding_to_max_length(tokenizer) -> None:
    ids = special_token_ids(tokenizer)
    batch = tokenize(tokenizer, ["seven", "a photo of the number two"], MAX_LENGTH)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, MAX_LENGTH)
    assert batch["input_ids"].dtype == torch.int64
    first = batch["input_ids"][0].tolist()
    (seven_id,) = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("seven"))
    assert first[:3] == [ids["bos"], seven_id, ids["eos"]]
    assert first[3:] == [ids["pad"]] * (MAX_LENGTH - 3)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1] + [0] * (MAX_LENGTH - 3)
    lengths = batch["attention_mask"].sum(dim=1)
    assert torch.all((batch["input_ids"] != ids["pad"]).sum(dim=1) == lengths)


def test_truncation_keeps_exactly_one_eos_last(tokenizer) -> None:
    ids = special_token_ids(tokenizer)
    assert len(tokenizer(LONG_CAPTION)["input_ids"]) > 3 * MAX_LENGTH
    batch = tokenize(tokenizer, [LONG_CAPTION, "nine"], MAX_LENGTH)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        row = row.tolist()
        content = row[: int(mask.sum())]
        assert content[0] == ids["bos"]
        assert content[-1] == ids["eos"]
        assert row.count(ids["eos"]) == 1
    long_row = batch["input_ids"][0].tolist()
    assert ids["pad"] not in long_row and batch["attention_mask"][0].all()
    # The kept content is the start of the caption.
    full = tokenizer(LONG_CAPTION)["input_ids"]
    assert long_row[:-1] == full[: MAX_LENGTH - 1]


def test_save_load_round_trip_gives_identical_ids(tokenizer, tmp_path: Path) -> None:
    captions = ["a photo of the number seven", "zebra crossing", LONG_CAPTION, "THIS IS NINE"]
    expected = tokenize(tokenizer, captions, MAX_LENGTH)
    tokenizer.save_pretrained(tmp_path / "tok")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", str(tmp_path / "tok")):
        loaded = load_tokenizer(path)
        assert special_token_ids(loaded) == special_token_ids(tokenizer)
        assert loaded.model_max_length == MAX_LENGTH
        got = tokenize(loaded, captions, MAX_LENGTH)
        assert torch.equal(got["input_ids"], expected["input_ids"])
        assert torch.equal(got["attention_mask"], expected["attention_mask"])


def test_load_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        load_tokenizer(missing)


def test_word_level_gives_each_unseen_word_one_unknown_token(word_tokenizer, bpe_tokenizer) -> None:
    # "an illustration depicting seven": BPE spells the three unseen words out in byte pieces the
    # text encoder never trained on (the cause of the zero-shot loss measured in the design notes);
    # word-level gives one <|unk|> per unseen word and the class word its training id.
    unk = word_tokenizer.convert_tokens_to_ids(UNK_TOKEN)
    assert unk not in special_token_ids(word_tokenizer).values()
    (seven,) = word_tokenizer("seven")["input_ids"][1:-1]
    assert seven != unk
    assert word_tokenizer("an illustration depicting seven")["input_ids"][1:-1] == [unk, unk, unk, seven]
    assert len(bpe_tokenizer("an illustration depicting seven")["input_ids"][1:-1]) > 10
    for caption in TRAIN_CAPTIONS:  # every training word is in the vocabulary, and decodes back
        ids = word_tokenizer(caption)["input_ids"]
        assert unk not in ids
        assert word_tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == caption.replace(" ", "")


def test_unknown_tokenizer_kind_names_the_field() -> None:
    with pytest.raises(ValueError, match="tokenizer_kind"):
        train_tokenizer(TRAIN_CAPTIONS, kind="sentencepiece")


def test_run_config_rejects_an_unknown_tokenizer_kind_by_field() -> None:
    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415

    assert load_run_config(CONFIGS_DIR / "demo.yaml").model.text_encoder.tokenizer_kind == "word"
    with pytest.raises(Exception, match="tokenizer_kind"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["model.text_encoder.tokenizer_kind=bytes"])


def test_caption_unk_rate_replaces_words_at_that_rate_and_never_special_tokens(word_tokenizer) -> None:
    from pretrain.data import unknown_word_ids  # noqa: PLC0415

    tokens = tokenize(word_tokenizer, TRAIN_CAPTIONS * 20, MAX_LENGTH)
    ids = tokens["input_ids"]
    unk = word_tokenizer.unk_token_id
    special = torch.isin(ids, torch.tensor(list(special_token_ids(word_tokenizer).values())))
    words = tokens["attention_mask"].bool() & ~special
    dropped = unknown_word_ids(tokens, word_tokenizer, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(dropped[~words], ids[~words])  # BOS, EOS and padding untouched
    changed = dropped != ids
    assert torch.all(dropped[changed] == unk)
    assert changed.sum() / words.sum() == pytest.approx(0.2, abs=0.02)  # ~7,000 word tokens
    again = unknown_word_ids(tokens, word_tokenizer, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)  # the generator alone decides


def test_caption_unk_rate_needs_the_word_tokenizer_and_a_rate_below_one() -> None:
    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415

    assert load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.1"]).data.caption_unk_rate == 0.1
    with pytest.raises(Exception, match="caption_unk_rate.*tokenizer_kind=word"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.1", "model.text_encoder.tokenizer_kind=bpe"])
    with pytest.raises(Exception, match="caption_unk_rate"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=1.0"])


def test_alignment_only_word_dropout_keeps_the_generation_captions_clean(word_tokenizer) -> None:
    """With ``data.caption_unk_alignment_only`` the batch carries the clean ``input_ids`` and, beside
    them, ``align_input_ids`` with the same draw of dropped words the plain option would have made."""
    from types import SimpleNamespace  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415
    from pretrain.data import make_batch  # noqa: PLC0415

    samples = [{"caption": c, "image": np.zeros((8, 8, 3), np.uint8)} for c in TRAIN_CAPTIONS * 4]
    runtime = SimpleNamespace(bf16=False)
    both = load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.3", "data.caption_unk_alignment_only=false"])
    split = load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.3", "data.caption_unk_alignment_only=true"])
    clean = tokenize(word_tokenizer, [s["caption"] for s in samples], both.model.text_encoder.max_length)["input_ids"]
    dropped_everywhere = make_batch(samples, word_tokenizer, both, runtime, torch.Generator().manual_seed(3))
    dropped_for_alignment = make_batch(samples, word_tokenizer, split, runtime, torch.Generator().manual_seed(3))
    assert "align_input_ids" not in dropped_everywhere
    assert torch.equal(dropped_for_alignment["input_ids"], clean)
    assert torch.equal(dropped_for_alignment["align_input_ids"], dropped_everywhere["input_ids"])
    assert (dropped_for_alignment["align_input_ids"] == word_tokenizer.unk_token_id).sum() > 10
    with pytest.raises(Exception, match="caption_unk_alignment_only.*caption_unk_rate=0"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0", "data.caption_unk_start_fraction=0",
                                                     "data.caption_unk_alignment_only=true"])


def test_word_dropout_starts_at_its_fraction_of_training_with_draws_fixed_by_seed_rank_and_step() -> None:
    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415
    from pretrain.data import caption_rng_for_step  # noqa: PLC0415

    late = load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.1", "data.caption_unk_start_fraction=0.25",
                                                        "train.steps=400"])
    assert caption_rng_for_step(late, rank=0, step=99) is None and caption_rng_for_step(late, rank=0, step=100) is not None
    draw = lambda config, rank, step: torch.rand(4, generator=caption_rng_for_step(config, rank, step))  # noqa: E731
    assert torch.equal(draw(late, 0, 150), draw(late, 0, 150))  # a resumed run repeats the step's draws
    assert not torch.equal(draw(late, 0, 150), draw(late, 1, 150)) and not torch.equal(draw(late, 0, 150), draw(late, 0, 151))
    from_start = load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.1", "data.caption_unk_start_fraction=0"])
    assert caption_rng_for_step(from_start, rank=0, step=0) is not None
    no_dropout = ["data.caption_unk_rate=0", "data.caption_unk_start_fraction=0", "data.caption_unk_alignment_only=false"]
    assert caption_rng_for_step(load_run_config(CONFIGS_DIR / "demo.yaml", no_dropout), rank=0, step=500) is None
    with pytest.raises(Exception, match="caption_unk_start_fraction"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0.1", "data.caption_unk_start_fraction=1.0"])
    with pytest.raises(Exception, match="caption_unk_start_fraction=0.25 does nothing with data.caption_unk_rate=0"):
        load_run_config(CONFIGS_DIR / "demo.yaml", ["data.caption_unk_rate=0", "data.caption_unk_alignment_only=false",
                                                     "data.caption_unk_start_fraction=0.25"])
