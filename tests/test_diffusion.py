"""Both diffusion tasks, masking, gradient routing, the unified loss and the baselines."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from pretrain.diffusion import DiffDisObjective, DiffusionConfig, LossConfig, add_noise, query_to_diffusion_space
from pretrain.losses import symmetric_info_nce


def _objective(model, **loss):
    return DiffDisObjective(model, DiffusionConfig(), LossConfig(**loss))


def _pixels(batch=4, size=16):
    return torch.rand(batch, 3, size, size) * 2 - 1


def test_generation_pass_ignores_the_text_query(make_model, encode):
    objective = _objective(make_model())
    text = objective.model.encode_text(**encode(["a handwritten 7"] * 4))
    other = replace(text, query=torch.nn.functional.normalize(torch.randn_like(text.query), dim=-1))
    latents = _pixels()
    outs = []
    for features in (text, other):
        torch.manual_seed(0)
        outs.append(objective.generation_pass(latents, features)[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_alignment_pass_ignores_the_caption_condition_but_not_the_image(make_model, encode):
    objective = _objective(make_model())
    text = objective.model.encode_text(**encode(["a handwritten 7"] * 4))
    other_caption = objective.model.encode_text(**encode(["the number two, written by hand"] * 4))
    leaked = replace(text, condition=other_caption.condition)
    assert not torch.allclose(leaked.condition, text.condition)
    latents = _pixels()

    def run(features, images):
        torch.manual_seed(1)
        return objective.alignment_pass(images, features)

    base = run(text, latents)
    torch.testing.assert_close(run(leaked, latents), base, rtol=0, atol=0)
    assert (run(text, _pixels()) - base).abs().max() > 1e-4


PARTS = {
    "encoder_path": "model.unet.down_levels", "middle": "model.unet.mid_fusion", "head": "model.unet.head",
    "decoder": "model.unet.up_levels", "text_encoder": "model.text_encoder", "temperature": "temperature",
}


def _grad_norms(objective, term: str, encode) -> dict[str, float]:
    """Backpropagate one loss term ("loss" = the unified loss, "align" = L_ITA, "gen" = L_IG) and
    return the summed gradient norm of each part of the network."""
    objective.zero_grad(set_to_none=True)
    tokens = encode(["a handwritten 7", "a handwritten 3", "digit 5 (five)", "a scan of a handwritten one"])
    latents = _pixels()
    torch.manual_seed(0)
    if term == "loss":
        objective(**tokens, pixels=latents)["loss"].backward()
    else:
        text = objective.model.encode_text(**tokens)
        if term == "align":
            symmetric_info_nce(objective.alignment_pass(latents, text), text.query, objective.temperature()).backward()
        else:
            torch.nn.functional.mse_loss(*objective.generation_pass(latents, text)).backward()
    return {
        part: sum(p.grad.norm().item() for n, p in objective.named_parameters() if n.startswith(prefix) and p.grad is not None)
        for part, prefix in PARTS.items()
    }


def test_gradients_reach_both_streams_head_and_text_encoder(make_model, encode):
    norms = _grad_norms(_objective(make_model()), "loss", encode)
    assert all(value > 0 for value in norms.values()), norms


def test_alignment_loss_sends_no_gradient_to_the_decoder(make_model, encode):
    align = _grad_norms(_objective(make_model()), "align", encode)
    assert align["decoder"] == 0 and align["head"] > 0 and align["text_encoder"] > 0 and align["encoder_path"] > 0
    gen = _grad_norms(_objective(make_model()), "gen", encode)
    assert gen["decoder"] > 0 and gen["head"] == 0
    # L_IG does not train the text encoder by default (the contrastive text encoder is read, not
    # reshaped, by generation); the switch restores it, and gen-only always trains it through L_IG
    assert gen["text_encoder"] == 0
    assert _grad_norms(_objective(make_model(), text_grad_from_generation=True), "gen", encode)["text_encoder"] > 0
    assert _grad_norms(_objective(make_model(discrimination=False)), "gen", encode)["text_encoder"] > 0


def test_generation_trains_the_text_encoder_from_the_configured_step_on(make_model, encode):
    """loss.text_grad_from_generation_start = 3: the trainer's set_progress(step, total) closes L_IG's
    text gradient before step 3 and opens it from step 3; the default start (0) opens it at once."""
    delayed = _objective(make_model(), text_grad_from_generation=True, text_grad_from_generation_start=3)
    assert _grad_norms(delayed, "gen", encode)["text_encoder"] == 0  # before the trainer's first call: step 0
    delayed.set_progress(2, 10)
    assert _grad_norms(delayed, "gen", encode)["text_encoder"] == 0
    delayed.set_progress(3, 10)
    assert _grad_norms(delayed, "gen", encode)["text_encoder"] > 0
    at_once = _objective(make_model(), text_grad_from_generation=True)
    assert _grad_norms(at_once, "gen", encode)["text_encoder"] > 0
    with pytest.raises(ValueError, match="loss.text_grad_from_generation_start"):
        LossConfig(text_grad_from_generation_start=-1)


def _align_grads(objective, encode) -> dict[str, torch.Tensor]:
    """Gradients of L_ITA alone on every UNet parameter, for one fixed draw."""
    objective.zero_grad(set_to_none=True)
    tokens = encode(["a handwritten 7", "a handwritten 3", "digit 5 (five)", "a scan of a handwritten one"])
    text = objective.model.encode_text(**tokens)
    torch.manual_seed(0)
    prediction = objective.alignment_pass(_pixels(), text)
    symmetric_info_nce(prediction, text.query, objective.temperature()).backward()
    return {n: p.grad.clone() for n, p in objective.model.unet.named_parameters() if p.grad is not None}, prediction


def _users(objective, term: str, encode) -> set[str]:
    """The UNet parameters in the autograd graph of one loss term: zero-initialised ones count too."""
    _grad_norms(objective, term, encode)
    return {name for name, parameter in objective.model.unet.named_parameters() if parameter.grad is not None}


def test_parameter_roles_are_the_passes_that_use_each_parameter(make_model, encode):
    model = make_model(unet=replace(make_model().config.unet, align_adapter_dim=8))
    roles = model.unet.parameter_roles()
    by_role = {role: {name for name, r in roles.items() if r == role} for role in ("alignment", "generation", "shared")}
    assert all(by_role.values()) and sum(map(len, by_role.values())) == len(list(model.unet.parameters()))
    assert any("align_adapter" in name for name in by_role["alignment"])
    objective = _objective(model)
    assert _users(objective, "align", encode) == by_role["shared"] | by_role["alignment"]
    assert _users(objective, "gen", encode) == by_role["shared"] | by_role["generation"]
    # baselines: gen-only has nothing alignment-only, dis-only nothing generation-only
    assert "alignment" not in make_model(discrimination=False).unet.parameter_roles().values()
    assert "generation" not in make_model(generation=False).unet.parameter_roles().values()


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_align_grad_to_shared_scales_only_the_shared_stream_gradient(make_model, encode, scale):
    unet_config = replace(make_model().config.unet, align_adapter_dim=8)
    full, full_prediction = _align_grads(_objective(make_model(unet=unet_config)), encode)
    scaled, prediction = _align_grads(_objective(make_model(unet=unet_config), align_grad_to_shared=scale), encode)
    torch.testing.assert_close(prediction, full_prediction, rtol=0, atol=0)  # values are untouched
    roles = make_model(unet=unet_config).unet.parameter_roles()
    shared = [n for n in full if roles[n] == "shared"]
    own = [n for n in full if roles[n] == "alignment"]
    assert len(shared) > 10 and any("align_adapter" in n for n in own) and any(n.startswith("head.") for n in own)
    for name in own:  # the text stream, head and adapters learn from L_ITA exactly as before
        torch.testing.assert_close(scaled[name], full[name], rtol=1e-5, atol=1e-8)
    assert sum(full[n].norm() for n in shared) > 1e-3
    for name in shared:
        torch.testing.assert_close(scaled.get(name, torch.zeros_like(full[name])), scale * full[name],
                                   rtol=1e-4, atol=1e-8)


def _text_encoder_grads(objective, encode) -> dict[str, torch.Tensor]:
    """Gradients of the objective's loss on every text-encoder parameter, for one fixed draw."""
    objective.zero_grad(set_to_none=True)
    tokens = encode(["a handwritten 7", "a handwritten 3", "digit 5 (five)", "a scan of a handwritten one"])
    torch.manual_seed(0)
    objective(**tokens, pixels=_pixels())["loss"].backward()
    return {n: p.grad.clone() for n, p in objective.model.text_encoder.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("scale", [0.0, 0.25])
def test_align_grad_to_text_scales_only_the_transformer_gradient_of_the_query(make_model, encode, scale):
    """dis-only, so the loss is L_ITA alone: the projection to e learns exactly as before, every
    transformer weight by ``scale`` times its gradient (0: not at all)."""
    full = _text_encoder_grads(_objective(make_model(generation=False)), encode)
    scaled = _text_encoder_grads(_objective(make_model(generation=False), align_grad_to_text=scale), encode)
    projection = [n for n in full if n.startswith("model.text_projection")]
    transformer = [n for n in full if n.startswith("model.text_model")]
    assert projection and len(transformer) > 10 and sum(full[n].norm() for n in transformer) > 1e-3
    for name in projection:
        torch.testing.assert_close(scaled[name], full[name], rtol=1e-5, atol=1e-8)
    for name in transformer:
        torch.testing.assert_close(scaled.get(name, torch.zeros_like(full[name])), scale * full[name],
                                   rtol=1e-4, atol=1e-7)
    # with generation, L_IG still trains the transformer through c when L_ITA's share is closed
    closed = _text_encoder_grads(_objective(make_model(), align_grad_to_text=0.0, text_grad_from_generation=True), encode)
    assert sum(closed[n].norm() for n in transformer) > 1e-3
    with pytest.raises(ValueError, match="loss.align_grad_to_text"):
        LossConfig(align_grad_to_text=-0.1)


def test_query_head_learns_from_l_ita_where_the_transformer_does_not(make_model, encode):
    """With model.text_encoder.query_head_layers and align_grad_to_text 0, L_ITA trains the query's own
    layers and projection, and no weight the caption condition c comes from."""
    plain = make_model(generation=False)
    headed = make_model(generation=False, text_encoder=replace(plain.config.text_encoder, query_head_layers=1))
    grads = _text_encoder_grads(_objective(headed, align_grad_to_text=0.0), encode)
    assert not any(n.startswith("model.text_model") for n in grads)
    for prefix in ("query_head.", "query_head_norm.", "model.text_projection."):
        assert sum(g.norm() for n, g in grads.items() if n.startswith(prefix)) > 1e-4, prefix


def test_alignment_adapter_starts_as_identity_and_stays_out_of_generation(make_model, encode):
    plain = make_model()
    adapted = make_model(unet=replace(plain.config.unet, align_adapter_dim=8))
    adapters = [n for n, _ in adapted.unet.named_parameters() if "align_adapter" in n]
    assert adapters and not any("up_levels" in n for n in adapters)
    # same weights elsewhere: copy them over, then both models must agree on both tasks at init
    missing = adapted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"unet.{n}" for n in adapters)
    tokens = encode(["a handwritten 7"] * 4)
    latents = _pixels()
    outputs = {}
    for name, model in (("plain", plain), ("adapted", adapted)):
        torch.manual_seed(3)
        text = model.encode_text(**tokens)
        outputs[name] = (_objective(model).alignment_pass(latents, text), _objective(model).generation_pass(latents, text)[0])
    torch.testing.assert_close(outputs["adapted"][0], outputs["plain"][0], rtol=0, atol=0)  # ê_0
    torch.testing.assert_close(outputs["adapted"][1], outputs["plain"][1], rtol=0, atol=0)  # ε̂_z


def test_align_grad_to_shared_is_refused_where_parameters_are_not_swappable(tmp_path):
    from pretrain.config import RunConfig  # noqa: PLC0415
    from pretrain.trainer import Trainer  # noqa: PLC0415

    config = RunConfig()
    config.loss.align_grad_to_shared = 0.0
    config.deepspeed.zero_stage = 3
    with pytest.raises(ValueError, match="align_grad_to_shared"):
        Trainer(config, tmp_path)
    assert LossConfig(align_grad_to_shared=0.5).align_grad_to_shared == 0.5  # in range: accepted as given
    with pytest.raises(ValueError, match="align_grad_to_shared"):
        LossConfig(align_grad_to_shared=1.5)


@pytest.mark.parametrize("variant", ["gen-only", "dis-only"])
def test_baselines_train_with_only_their_loss(make_model, encode, variant):
    fields = {"gen-only": {"discrimination": False}, "dis-only": {"generation": False}}[variant]
    objective = _objective(make_model(**fields), align_weight=0.0 if variant == "gen-only" else 1.0)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
    tokens = encode(["a handwritten 7", "a handwritten 3", "digit 5 (five)", "a scan of a handwritten one"] * 2)
    pixels = _pixels(8)
    first = last = None
    for step in range(12):
        torch.manual_seed(step % 2)
        losses = objective(**tokens, pixels=pixels)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        active = "loss_gen" if variant == "gen-only" else "loss_align"
        inactive = "loss_align" if variant == "gen-only" else "loss_gen"
        assert losses[inactive].item() == 0.0
        torch.testing.assert_close(losses["loss"].detach(), losses[active])
        first = losses[active].item() if first is None else first
        last = losses[active].item()
    assert last < first


def test_noising_matches_the_closed_form():
    alphas = torch.linspace(0.99, 0.01, 1000)
    clean, noise = torch.randn(3, 8), torch.randn(3, 8)
    t = torch.tensor([0, 500, 999])
    expected = alphas[t].sqrt()[:, None] * clean + (1 - alphas[t]).sqrt()[:, None] * noise
    torch.testing.assert_close(add_noise(clean, noise, t, alphas), expected)


def test_query_scaling_puts_unit_scale_on_each_coordinate():
    query = torch.randn(512, 64)
    scaled = query_to_diffusion_space(query, DiffusionConfig(query_gamma=0.5))
    torch.testing.assert_close(scaled.norm(dim=-1), torch.full((512,), 0.5 * 8.0))
    unscaled = query_to_diffusion_space(query, DiffusionConfig(query_scale_sqrt_dim=False))
    torch.testing.assert_close(unscaled.norm(dim=-1), torch.ones(512))


def test_info_nce_is_low_for_matched_pairs_and_symmetric():
    targets = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(100.0)
    matched = symmetric_info_nce(targets.clone(), targets, scale)
    shuffled = symmetric_info_nce(targets.roll(1, dims=0), targets, scale)
    assert matched.item() < 0.05 < shuffled.item()
    torch.testing.assert_close(symmetric_info_nce(targets, targets.roll(1, 0), scale), shuffled)


def test_temperature_is_clamped():
    from pretrain.losses import LearnableTemperature

    temperature = LearnableTemperature(init_temperature=0.001, max_scale=100.0)
    assert temperature().item() == pytest.approx(100.0)
    assert LearnableTemperature(0.07)().item() == pytest.approx(1 / 0.07, rel=1e-5)


# -- a scheduled alignment weight (loss.align_weight_final) ----------------------------------------
def test_align_weight_falls_along_a_half_cosine_and_is_constant_without_a_final_value():
    constant = LossConfig(align_weight=0.05)
    assert [constant.align_weight_at(p) for p in (0.0, 0.5, 1.0)] == [0.05, 0.05, 0.05]
    falling = LossConfig(align_weight=0.05, align_weight_final=0.01)
    assert falling.align_weight_at(0.0) == pytest.approx(0.05) and falling.align_weight_at(1.0) == pytest.approx(0.01)
    assert falling.align_weight_at(0.5) == pytest.approx(0.03)  # the midpoint of a half cosine
    assert falling.align_weight_at(0.25) == pytest.approx(0.01 + 0.04 * (0.5 + 0.5 * 2 ** -0.5))
    assert falling.align_weight_at(-1.0) == pytest.approx(0.05) and falling.align_weight_at(2.0) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="loss.align_weight_final"):
        LossConfig(align_weight_final=-0.1)


@pytest.mark.integration
def test_the_trainer_sets_the_scheduled_align_weight_each_step_and_the_loss_uses_it(tmp_path):
    """5 steps from λ = 1 to λ = 0: the logged λ follows the schedule by step (first 1, last 0), and
    every step's loss is L_IG + λ·L_ITA with that λ."""
    from pretrain.config import CONFIGS_DIR, load_run_config  # noqa: PLC0415
    from pretrain.trainer import Trainer  # noqa: PLC0415

    config = load_run_config(CONFIGS_DIR / "tiny.yaml", [
        "data.source=digits", "model.image_size=8", "train.steps=5", "train.log_every=1", "train.batch_size=8",
        "train.checkpoint_every=100", "loss.align_weight=1.0", "loss.align_weight_final=0.0", "health.enabled=false"])
    Trainer(config, tmp_path / "run").train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    expected = [0.5 * (1 + math.cos(math.pi * index / 4)) for index in range(5)]
    assert [r["align_weight"] for r in records] == pytest.approx(expected, abs=1e-6)
    for record in records:
        assert record["loss"] == pytest.approx(record["loss_gen"] + record["align_weight"] * record["loss_align"], rel=1e-5)


def test_alignment_only_captions_reach_l_ita_and_leave_l_ig_unchanged(make_model, encode):
    """``align_input_ids`` (alignment-only word dropout) change what L_ITA scores and nothing of L_IG:
    the generation pass reads ``input_ids`` whatever the alignment pass reads."""
    objective = _objective(make_model())
    tokens = encode(["a handwritten 7", "a handwritten 3", "digit 5 (five)", "a scan of a handwritten one"])
    dropped = tokens["input_ids"].clone()
    dropped[:, 1] = dropped[0, 2]  # every caption's first word replaced by one token

    def losses(**extra):
        torch.manual_seed(0)
        return objective(**tokens, pixels=_pixels(), **extra)

    plain, same, other = losses(), losses(align_input_ids=tokens["input_ids"]), losses(align_input_ids=dropped)
    for key in ("loss_gen", "loss_align"):
        torch.testing.assert_close(same[key], plain[key])
    torch.testing.assert_close(other["loss_gen"], plain["loss_gen"])
    assert abs(float(other["loss_align"] - plain["loss_align"])) > 1e-4
