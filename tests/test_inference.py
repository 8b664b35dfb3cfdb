"""Sampling determinism, the query chain, and the metric functions."""

from __future__ import annotations

import pytest
import torch

from pretrain.diffusion import DiffusionConfig
from pretrain.inference import class_queries, predict_queries, recall_at_k, sample_images, topk_accuracy


def test_ddim_sampling_is_deterministic_under_a_seed(make_model, tokenizer):
    model = make_model()
    prompts = ["a handwritten 7", "a handwritten digit two"]

    def run(seed):
        return sample_images(model, tokenizer, prompts, DiffusionConfig(), steps=3, guidance=2.0,
                             generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == (2, 3, 16, 16) and first.abs().max() <= 1
    torch.testing.assert_close(run(0), first, rtol=0, atol=0)
    assert not torch.allclose(run(1), first)


def test_query_chain_is_unit_norm_deterministic_and_image_dependent(make_model):
    model = make_model()
    latents = torch.rand(3, 3, 16, 16) * 2 - 1

    def run(images, seed=0, steps=4, guidance=1.0):
        return predict_queries(model, images, DiffusionConfig(), steps, guidance, torch.Generator().manual_seed(seed))

    queries = run(latents)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(run(latents), queries, rtol=0, atol=0)
    assert (run(torch.rand(3, 3, 16, 16) * 2 - 1) - queries).abs().max() > 1e-4


def test_class_queries_average_prompt_ensembles(make_model, tokenizer):
    model = make_model()
    queries = class_queries(model, tokenizer, [["a handwritten 1", "digit 1 (one)"], ["a handwritten 2"]])
    assert queries.shape == (2, model.query_dim)
    torch.testing.assert_close(queries.norm(dim=-1), torch.ones(2))


def test_topk_and_recall():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 1, 2])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0
    assert recall_at_k(scores, 1) == pytest.approx(1 / 3)
