"""Offline tokenizer for the text encoder, trained on our captions: byte-level BPE or word-level.

Nothing is ever downloaded: the tokenizer is trained from the captions at hand and
saved next to the checkpoints. Two kinds (``model.text_encoder.tokenizer_kind``):

- ``bpe`` (the code default): byte-level BPE. Its base alphabet is all 256 bytes, so any
  text tokenizes into sub-pieces and nothing is lost. Right for a large caption corpus, where
  the merges cover the language.
- ``word``: one token per word (punctuation split off), and one ``<|unk|>`` for any word
  the captions never used. Right for a small, closed caption set (the built-in digits and
  scenes): there, BPE's merges cover only the training words, so an unseen prompt word
  ("illustration") is spelled out in ~10 single-byte tokens the text encoder never trained,
  and those pieces, not the class word, decide the pooled query. That cost our CLIP baseline
  20+ points of zero-shot accuracy on the digits shards (docs/design-notes.md, "The
  tokenizer"). An unseen word as one untrained token is what a large tokenizer (CLIP's 49k
  BPE) gives a small model too.

Every encoded text is ``<|startoftext|> ... <|endoftext|>`` and always contains exactly
one EOS, even when truncated: the CLIP text model pools the hidden state at the EOS
position as the sentence embedding, so a missing EOS would pool an arbitrary token and
a duplicate one would be ambiguous. Truncation therefore cuts the content, never EOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"  # the word-level tokenizer's token for every word the captions never used

TokenizerKind = Literal["bpe", "word"]
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "word")

# Trainer order fixes the ids: pad=0, eos=1, bos=2. EOS must not be id 2: a CLIP text
# model whose config has eos_token_id == 2 falls back to the legacy pooling rule
# "argmax of the input ids", which is only right for OpenAI's original vocabulary.
_SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN]


def _bpe_backend(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _word_backend(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=[*_SPECIAL_TOKENS, UNK_TOKEN], show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _build_backend(texts: Iterable[str], vocab_size: int, max_length: int, kind: str = "bpe") -> Tokenizer:
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"model.text_encoder.tokenizer_kind={kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
    backend = (_word_backend if kind == "word" else _bpe_backend)(texts, vocab_size)
    bos_id, eos_id = backend.token_to_id(BOS_TOKEN), backend.token_to_id(EOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, bos_id), (EOS_TOKEN, eos_id)],
    )
    # Stored in tokenizer.json so a bare json file still knows its maximum length.
    backend.enable_truncation(max_length)
    return backend


def _wrap(backend: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN if backend.token_to_id(UNK_TOKEN) is not None else None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1000, max_length: int = 32, kind: TokenizerKind = "bpe"
) -> PreTrainedTokenizerFast:
    """Train a lowercase tokenizer of ``kind`` ("bpe" or "word") on ``texts``, wrapped for ``transformers``."""
    return _wrap(_build_backend(texts, vocab_size, max_length, kind), max_length)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder written by ``save_pretrained``, or a bare ``tokenizer.json``.

    Only local files are read (``local_files_only``), so a wrong path fails fast with
    ``FileNotFoundError`` instead of being mistaken for a Hub model id.
    """
    path = Path(path)
    if path.is_dir():
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if path.is_file():
        backend = Tokenizer.from_file(str(path))
        if backend.truncation is None:
            raise ValueError(f"{path} has no truncation length; save it with train_tokenizer")
        return _wrap(backend, backend.truncation["max_length"])
    raise FileNotFoundError(f"no tokenizer folder or tokenizer.json at {path}")


def tokenize(
    tokenizer: PreTrainedTokenizerFast, captions: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Encode ``captions`` to int64 ``input_ids`` and ``attention_mask`` of shape (B, max_length).

    Long captions are truncated inside BOS ... EOS, so each row keeps exactly one EOS.
    """
    encoded = tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of the special tokens, e.g. to configure the text encoder's ``eos_token_id``."""
    return {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
