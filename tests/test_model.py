"""The dual-stream UNet and the model container: shapes, stream separation, save/load."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import DiffDisModel


def _inputs(model: DiffDisModel, batch: int = 4):
    size = model.latent_size
    latents = torch.randn(batch, model.latent_channels, size, size)
    timesteps = torch.randint(0, 1000, (batch,))
    return latents, timesteps


def test_shapes_of_both_passes(make_model, encode):
    model = make_model()
    text = model.encode_text(**encode(["a handwritten 7"] * 4))
    latents, timesteps = _inputs(model)
    assert text.condition.shape == (4, 32, 64)
    assert text.query.shape == (4, 64)
    torch.testing.assert_close(text.query.norm(dim=-1), torch.ones(4))
    gen = model(latents, timesteps, text.condition)
    assert gen.noise_pred.shape == latents.shape and gen.query_pred is None
    align = model(latents, torch.zeros(4, dtype=torch.long), None, query=torch.randn(4, 64),
                  query_timesteps=timesteps, run_decoder=False)
    assert align.noise_pred is None and align.query_pred.shape == (4, 64)


def test_generation_output_ignores_every_text_query_parameter(make_model, encode):
    """The text token is absent from the generation pass: perturbing the whole text-query path
    (fusion text projections and FFNs, query time embedding, head) leaves ε̂ unchanged, while
    perturbing an image-path weight does change it (so the comparison can fail)."""
    model = make_model()
    text = model.encode_text(**encode(["a handwritten 3"] * 4))
    latents, timesteps = _inputs(model)
    before = model(latents, timesteps, text.condition).noise_pred
    query_path = [p for n, p in model.unet.named_parameters()
                  if any(key in n for key in ("text_in", "text_out", "ff_text", "norm_ff_text", "query_time", "head."))]
    assert len(query_path) > 10
    with torch.no_grad():
        for param in query_path:
            param.add_(torch.randn_like(param))
    torch.testing.assert_close(model(latents, timesteps, text.condition).noise_pred, before, rtol=0, atol=0)
    with torch.no_grad():
        model.unet.conv_in.weight.add_(0.1)
    assert not torch.allclose(model(latents, timesteps, text.condition).noise_pred, before)


def test_alignment_output_depends_on_image_and_query(make_model):
    """The query path starts closed (zero-initialised ``text_in``, the default) and opens by training:
    at init ê_0 depends on the image only; once the projections are non-zero it depends on e_t too."""
    model = make_model()
    latents, timesteps = _inputs(model)
    query = torch.randn(4, 64)
    zero_t = torch.zeros(4, dtype=torch.long)

    def predict(lat, q):
        return model(lat, zero_t, None, query=q, query_timesteps=timesteps, run_decoder=False).query_pred

    base = predict(latents, query)
    assert (predict(latents + 0.5 * torch.randn_like(latents), query) - base).abs().max() > 1e-3
    torch.testing.assert_close(predict(latents, torch.randn(4, 64)), base, rtol=0, atol=0)
    text_in = [m.text_in for m in model.unet.modules() if hasattr(m, "text_in")]
    assert len(text_in) == 3 and all(bool((layer.weight == 0).all()) for layer in text_in)  # 2 fusion blocks + head
    with torch.no_grad():
        for layer in text_in:
            layer.weight.normal_(0, 0.02)
    assert (predict(latents, torch.randn(4, 64)) - base).abs().max() > 1e-3


def test_random_init_of_the_query_path_is_a_config_switch(make_model):
    from dataclasses import replace  # noqa: PLC0415

    model = make_model()
    random_init = make_model(unet=replace(model.config.unet, zero_init_query_in=False))
    assert bool((model.unet.head.text_in.weight == 0).all())
    assert random_init.unet.head.text_in.weight.abs().sum() > 0


def test_baseline_architectures_drop_their_parts(make_model):
    gen_only = make_model(discrimination=False)
    dis_only = make_model(generation=False)
    unified = make_model()
    names = lambda m: {n.split(".")[0] for n, _ in m.unet.named_parameters()}  # noqa: E731
    assert "head" in names(unified) and "up_levels" in names(unified)
    assert "head" not in names(gen_only) and "query_time_embedding" not in names(gen_only)
    assert "up_levels" not in names(dis_only) and "conv_out" not in names(dis_only)
    assert not any("text_in" in n for n, _ in gen_only.unet.named_parameters())
    latents, timesteps = _inputs(gen_only)
    with pytest.raises(ValueError, match="gen-only"):
        gen_only(latents, timesteps, None, query=torch.randn(4, 64), query_timesteps=timesteps)
    with pytest.raises(ValueError, match="dis-only"):
        dis_only(latents, timesteps, None)


def test_save_and_load_round_trip_gives_identical_outputs(make_model, encode, tmp_path):
    model = make_model(seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = DiffDisModel.from_pretrained(tmp_path / "m").eval()
    tokens = encode(["the number five, written by hand", "a handwritten 1"])
    latents, timesteps = _inputs(model, batch=2)
    for m in (model, loaded):
        m.text = m.encode_text(**tokens)
    torch.testing.assert_close(loaded.text.query, model.text.query, rtol=0, atol=0)
    torch.testing.assert_close(loaded(latents, timesteps, loaded.text.condition).noise_pred,
                               model(latents, timesteps, model.text.condition).noise_pred, rtol=0, atol=0)
    assert loaded.config == model.config and loaded.tokens == model.tokens


def test_query_head_reads_the_token_states_and_round_trips(make_model, encode, tmp_path):
    """model.text_encoder.query_head_layers: e comes from the head's own layers, c does not change, and
    the head's weights survive save/load. Padding after EOS must not reach e (causal, EOS-pooled)."""
    from dataclasses import replace  # noqa: PLC0415

    plain = make_model(seed=3)
    headed = make_model(seed=3, text_encoder=replace(plain.config.text_encoder, query_head_layers=1))
    assert plain.text_encoder.query_head is None and len(headed.text_encoder.query_head.layers) == 1
    tokens = encode(["the number five, written by hand", "a handwritten 1"])
    with torch.no_grad():
        a, b = plain.encode_text(**tokens), headed.encode_text(**tokens)
        torch.testing.assert_close(b.condition, a.condition, rtol=0, atol=0)  # the shared encoder is the same
        assert (b.query - a.query).abs().max() > 1e-3
        length = int(tokens["attention_mask"].sum(-1).max())
        assert length < tokens["input_ids"].shape[1]
        shorter = {k: v[:, :length] for k, v in tokens.items()}  # the same captions with less padding
        torch.testing.assert_close(headed.encode_text(**shorter).query, b.query, rtol=1e-5, atol=1e-6)
    headed.save_pretrained(tmp_path / "m")
    loaded = DiffDisModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(**tokens).query, b.query, rtol=0, atol=0)
    with pytest.raises(ValueError, match="query_head_layers"):
        replace(plain.config.text_encoder, query_head_layers=-1).validate()


def test_from_pretrained_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffDisModel.from_pretrained(tmp_path)


def test_kl_autoencoder_latents_are_downscaled(make_model, tiny_config):
    from dataclasses import replace

    from pretrain.model.config import AutoencoderConfig

    model = make_model(image_size=16, autoencoder=replace(AutoencoderConfig(), kind="kl", block_out_channels=[8, 8], norm_num_groups=4))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = model.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8) and model.latent_size == 8
    assert model.decode_latents(latents).shape == (2, 3, 16, 16)
    assert not any(p.requires_grad for p in model.autoencoder.parameters())


@pytest.mark.parametrize("config_name", ["tiny.yaml", "demo.yaml"])
def test_every_eval_prompt_fits_the_text_length(config_name):
    """A prompt truncated before its class word would be identical across classes (zero-shot at chance)."""
    from data_pipeline.digits import class_prompts
    from pretrain.config import CONFIGS_DIR, load_run_config
    from pretrain.data import training_captions
    from pretrain.model.tokenizer import train_tokenizer

    config = load_run_config(CONFIGS_DIR / config_name)
    text = config.model.text_encoder
    tokenizer = train_tokenizer(training_captions(config), vocab_size=text.tokenizer_vocab_size,
                                    max_length=text.max_length, kind=text.tokenizer_kind)
    for prompts in class_prompts():
        for prompt in prompts:
            length = len(tokenizer(prompt)["input_ids"])
            assert length <= text.max_length, f"{config_name}: '{prompt}' is {length} tokens > {text.max_length}"


def test_unknown_word_embedding_starts_at_zero_and_stays_there(tiny_config, tmp_path):
    """model.text_encoder.zero_init_unknown_token: the word tokenizer's <|unk|> row starts at zero (random
    with the switch off), training on captions without it leaves it at zero under AdamW's weight decay, and
    a saved model keeps the unknown token's id."""
    from dataclasses import replace  # noqa: PLC0415

    from pretrain.data import training_captions  # noqa: PLC0415
    from pretrain.model.tokenizer import tokenize, train_tokenizer  # noqa: PLC0415
    from pretrain.trainer import tokenizer_spec  # noqa: PLC0415

    text = replace(tiny_config.model.text_encoder, tokenizer_kind="word")
    word_tokenizer = train_tokenizer(training_captions(tiny_config), vocab_size=text.tokenizer_vocab_size,
                                     max_length=text.max_length, kind="word")
    spec = tokenizer_spec(word_tokenizer)
    unk = spec.unk_token_id
    assert unk is not None and unk == word_tokenizer.unk_token_id

    def embedding_table(model: DiffDisModel) -> torch.Tensor:
        return model.text_encoder.model.text_model.embeddings.token_embedding.weight

    torch.manual_seed(0)
    model = DiffDisModel(replace(tiny_config.model, text_encoder=text), spec)
    torch.manual_seed(0)
    random_unk = DiffDisModel(replace(tiny_config.model, text_encoder=replace(text, zero_init_unknown_token=False)), spec)
    assert embedding_table(model)[unk].abs().max() == 0
    assert embedding_table(random_unk)[unk].norm() > 0.05  # the init's scale (std 0.02 over 64 dims)
    others = [i for i in range(spec.vocab_size) if i != unk]
    torch.testing.assert_close(embedding_table(model)[others], embedding_table(random_unk)[others], rtol=0, atol=0)

    optimizer = torch.optim.AdamW(model.text_encoder.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = tokenize(word_tokenizer, training_captions(tiny_config)[:16], text.max_length)
    assert not (tokens["input_ids"] == unk).any()
    for _ in range(3):
        optimizer.zero_grad()
        model.encode_text(**tokens).query.pow(3).sum().backward()
        optimizer.step()
    assert embedding_table(model)[unk].abs().max() == 0
    assert (embedding_table(model)[others] - embedding_table(random_unk)[others]).abs().max() > 1e-3  # it trained

    model.save_pretrained(tmp_path / "m")
    assert DiffDisModel.from_pretrained(tmp_path / "m").tokens.unk_token_id == unk
