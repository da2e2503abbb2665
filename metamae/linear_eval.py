"""Linear evaluation: a linear head trained on the frozen encoder's features.

Features are the mean of the encoder's output tokens without cls (per token for per-token tasks),
computed once with no masking. The head is trained with Adam (lr 1e-4, weight decay 1e-4, 100
epochs by default, as in the paper) and scored with the dataset's metric by scikit-learn or scipy.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from metamae.config import DatasetConfig, ProbeConfig
from metamae.data.arrays import Split, batches
from metamae.model import MetaMAE
from metamae.modality import to_device


@dataclass
class ProbeResult:
    metric: str
    test: float
    train: float


@torch.no_grad()
def extract_features(model: MetaMAE, data, split: str, batch_size: int, per_token: bool = False,
                     ignore_label: Optional[int] = None, max_batches: Optional[int] = None):
    """Frozen-encoder features of one split -> (N × D, labels), or per token (N·L × D, N·L labels)
    without the tokens labelled `ignore_label`; of the split's first `max_batches` batches if given."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    feats, labels = [], []
    for x, y in islice(data.stream(split, batch_size), max_batches):
        f = model.features(to_device(x, device), per_token=per_token)     # B × D or B × L × D
        f, y = f.reshape(-1, f.shape[-1]).cpu(), (y.reshape(-1) if per_token else y)
        if ignore_label is not None:
            keep = y != ignore_label
            f, y = f[keep], y[keep]
        feats.append(f)
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats).float(), torch.cat(labels)


def head_outputs(metric: str, num_classes: int) -> int:
    """Classes for multi-class metrics; one logit for binary and regression; one per label for AUROC."""
    return num_classes if metric in ("accuracy", "weighted_f1", "auroc") else 1


def probe_loss(metric: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if metric in ("accuracy", "weighted_f1"):
        return F.cross_entropy(out, y)
    if metric in ("binary_accuracy", "auroc"):
        return F.binary_cross_entropy_with_logits(out.reshape(y.shape), y.float())
    return F.mse_loss(out.reshape(-1), y.float())                          # regression


def score(metric: str, out: torch.Tensor, y: torch.Tensor) -> float:
    y, out = y.numpy(), out.numpy()
    if metric == "accuracy":
        return float(accuracy_score(y, out.argmax(axis=1)))
    if metric == "weighted_f1":
        return float(f1_score(y, out.argmax(axis=1), average="weighted"))
    if metric == "binary_accuracy":
        return float(accuracy_score(y, (out.reshape(-1) > 0).astype(y.dtype)))
    if metric == "auroc":
        return float(roc_auc_score(y, out, average="macro"))
    correlation = spearmanr if metric == "spearman" else pearsonr
    return float(correlation(out.reshape(-1), y.reshape(-1))[0])


def linear_probe(model: MetaMAE, data, dataset: DatasetConfig, cfg: ProbeConfig) -> ProbeResult:
    """Train a linear head on the frozen encoder's features of dataset.probe_train_split; score it on
    dataset.probe_test_split with the dataset's metric."""
    metric, batch_size = dataset.metric, cfg.batch_size or dataset.batch_size
    features = partial(extract_features, model, data, batch_size=batch_size, per_token=dataset.per_token,
                       ignore_label=dataset.ignore_label)
    train_x, train_y = features(dataset.probe_train_split)
    test_x, test_y = features(dataset.probe_test_split)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6      # MAE's probe: a BatchNorm without affine
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    torch.manual_seed(cfg.seed)
    head = nn.Linear(train_x.shape[1], head_outputs(metric, dataset.num_classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    features = Split(train_x.numpy(), train_y.numpy())
    for _ in range(cfg.epochs):
        for x, y in batches(features, min(batch_size, len(features)), rng):
            optimizer.zero_grad()
            probe_loss(metric, head(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        return ProbeResult(metric, test=score(metric, head(test_x), test_y),
                           train=score(metric, head(train_x), train_y))


def ridge_targets(metric: str, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as regression targets: one-hot classes, ±1 for binary, the labels for multi-label."""
    if metric in ("accuracy", "weighted_f1"):
        return F.one_hot(y, num_classes).double()
    if metric == "binary_accuracy":
        return (2.0 * y.double() - 1.0).reshape(-1, 1)
    return y.double().reshape(len(y), -1)


def online_probe(model: MetaMAE, data, dataset: DatasetConfig, examples: int, l2: float = 1e-2) -> float:
    """A fast probe that tracks linear evaluation during pretraining, for early stopping.

    Closed-form ridge regression of the labels on the standardised features of `examples` examples
    of the probe's training split, scored with the dataset's metric on the `examples` after them:
    held out from the fit, and never the test split that the final evaluation reports.
    """
    batch_size = dataset.batch_size
    x, y = extract_features(model, data, dataset.probe_train_split, batch_size, dataset.per_token,
                            dataset.ignore_label, max_batches=-(-2 * examples // batch_size))
    x, n = x.double(), len(y) // 2                    # rows: examples, or tokens for per-token tasks
    if n < 2:
        raise ValueError(f"the online probe needs at least 4 examples of the {dataset.probe_train_split!r} split")
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    design = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)   # N × (D+1)
    fit, held_out = design[:n], design[n:2 * n]
    targets = ridge_targets(dataset.metric, y[:n], dataset.num_classes)
    weights = torch.linalg.solve(fit.T @ fit + l2 * n * torch.eye(fit.shape[1], dtype=x.dtype), fit.T @ targets)
    return score(dataset.metric, held_out @ weights, y[n:2 * n])
