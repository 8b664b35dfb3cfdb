"""Pure metric functions of the evaluation suites: classification, retrieval, Fréchet distance.

Kept apart from the models so each can be checked on constructed inputs with a known answer.
"""

from __future__ import annotations

import numpy as np
import torch

from pretrain.inference import topk_accuracy


def mean_per_class_recall(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class's rows whose top-1
    prediction is right (CLIP_benchmark's ``mean_per_class_recall``; balanced accuracy). Unlike top-1
    it is not dominated by the largest classes of an unbalanced set."""
    predicted = scores.argmax(dim=1)
    recalls = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]
    return float(np.mean(recalls))


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``top1``, ``top5`` (top-k with k capped at the number of classes), ``mean_per_class_recall``, ``n``
    for an (N, classes) score matrix and N true labels."""
    labels = labels.to(scores.device)
    return {"top1": topk_accuracy(scores, labels, 1), "top5": topk_accuracy(scores, labels, 5),
            "mean_per_class_recall": mean_per_class_recall(scores, labels), "n": int(len(labels))}


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, regularization: float = 10.0) -> float:
    """Held-out accuracy of a multinomial logistic regression fit on ``train_features`` (rows L2-normalised
    first, as zero-shot scores them). Beside a zero-shot figure it says which side fails: a high probe with
    a low zero-shot figure means the image features hold the answer and the class prompts miss it."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415 - only the probe needs it

    def unit(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.float64)
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    classifier = LogisticRegression(C=regularization, max_iter=2000).fit(unit(train_features), train_labels)
    return float(classifier.score(unit(test_features), test_labels))


def retrieval_metrics(similarity: torch.Tensor, owner: torch.Tensor | None = None) -> dict[str, float]:
    """Image→text and text→image recall@{1,5,10} for an (images, captions) similarity; caption j belongs
    to image ``owner[j]`` (default j: one caption per image). With several captions per image (COCO,
    Flickr30k) image→text counts a hit when ANY of the image's captions ranks within k, text→image when
    the caption's image does (CLIP_benchmark's convention)."""
    images, captions = similarity.shape
    owner = torch.arange(captions) if owner is None else torch.as_tensor(owner)
    owner = owner.to(similarity.device)
    if owner.shape != (captions,) or int(owner.max()) >= images or int(owner.min()) < 0:
        raise ValueError(f"owner must give an image index in [0, {images}) for each of {captions} captions")
    metrics: dict[str, float] = {"n_images": int(images), "n_captions": int(captions)}
    for k in (1, 5, 10):
        top_captions = similarity.topk(min(k, captions), dim=1).indices  # (images, k) caption indices
        metrics[f"i2t_r{k}"] = (owner[top_captions] == torch.arange(images, device=owner.device)[:, None]).any(1).float().mean().item()
        top_images = similarity.T.topk(min(k, images), dim=1).indices  # (captions, k) image indices
        metrics[f"t2i_r{k}"] = (top_images == owner[:, None]).any(1).float().mean().item()
    return metrics


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. 6):
    ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2}). In Inception-v3 pool features this is FID; in
    any other network's features it is a different number on a different scale."""
    from scipy import linalg  # noqa: PLC0415 - scipy loads in ~0.3 s; only this metric needs it

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with the same d, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # singular product (fewer samples than dimensions): regularise, as pytorch-fid does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real  # imaginary parts are numerical noise of the square root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


def frechet_distance_spectral(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The same distance as :func:`frechet_distance` with the root's trace from eigenvalues,
    Tr((Σ_a Σ_b)^{1/2}) = Σ_i √λ_i(Σ_a Σ_b) (real and ≥ 0: a product of two PSD matrices), as torchmetrics'
    FID computes it; used for FID, where scipy's ``sqrtm`` of a 2048×2048 product takes ~20 s of one core.
    With Σ = CᵀC (C the centred features over √(n−1)) the nonzero λ_i(Σ_a Σ_b) are the squared singular
    values of C_a C_bᵀ (n_a × n_b), so fewer samples than dimensions cost one small SVD and need no
    regularising; otherwise λ_i = eig(Σ_a^{1/2} Σ_b Σ_a^{1/2}), two symmetric eigendecompositions."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, d) with the same d, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples per set")
    centred_a = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    centred_b = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    if min(len(a), len(b)) <= a.shape[1]:
        trace_root = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum()
    else:
        values, vectors = np.linalg.eigh(centred_a.T @ centred_a)
        root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
        product = root_a @ (centred_b.T @ centred_b) @ root_a
        trace_root = np.sqrt(np.linalg.eigvalsh(product).clip(min=0)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + (centred_a**2).sum() + (centred_b**2).sum() - 2 * trace_root)
