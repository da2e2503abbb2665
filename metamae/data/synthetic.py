"""Small synthetic datasets for every modality kind, with class structure a linear probe can learn.

Each class has its own pattern (frequencies, feature means, token distribution, image template);
each example is that pattern plus noise. For tests and smoke runs, not for claims.
"""
from __future__ import annotations

import numpy as np

from metamae.data.arrays import ArrayDataset, Split
from metamae.modality import Spec


def _timeseries(rng, labels, num_classes, channels, length):
    freqs = rng.uniform(1, 6, size=(num_classes, channels))                       # cycles per window
    phase = rng.uniform(0, 2 * np.pi, size=(len(labels), channels, 1))
    t = np.arange(length) / length
    x = np.sin(2 * np.pi * freqs[labels][:, :, None] * t + phase)                  # N × C × L
    return x + 0.3 * rng.standard_normal(x.shape)


def _tabular(rng, labels, num_classes, features):
    means = rng.standard_normal((num_classes, features))
    return (means[labels] + 0.7 * rng.standard_normal((len(labels), features)))[:, None, :]   # N × 1 × F


def _tokens(rng, labels, num_classes, vocab, length):
    logits = 2.0 * rng.standard_normal((num_classes, vocab))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)             # class × V
    cumulative = probs[labels].cumsum(axis=1)                                       # N × V
    draws = rng.random((len(labels), length, 1))
    return np.minimum((draws > cumulative[:, None, :]).sum(axis=2), vocab - 1)     # N × L ids


def _image(rng, labels, num_classes, channels, height, width):
    coarse = rng.standard_normal((num_classes, channels, 2, 2))
    templates = coarse.repeat(height // 2 + 1, axis=2)[:, :, :height].repeat(width // 2 + 1, axis=3)[..., :width]
    return templates[labels] + 0.5 * rng.standard_normal((len(labels), channels, height, width))


def _inputs(spec: Spec, rng: np.random.Generator, labels: np.ndarray, num_classes: int):
    if spec.kind == "timeseries":
        x = _timeseries(rng, labels, num_classes, spec.channels, spec.length)
    elif spec.kind == "tabular":
        x = _tabular(rng, labels, num_classes, spec.features)
    elif spec.kind == "tokens":
        return _tokens(rng, labels, num_classes, spec.vocab, spec.length).astype(np.int64)
    elif spec.kind == "image":
        x = _image(rng, labels, num_classes, spec.channels, spec.height, spec.width)
    else:
        return (_inputs(spec.image, rng, labels, num_classes), _inputs(spec.text, rng, labels, num_classes))
    return x.astype(np.float32)


def synthetic(spec: Spec, num_classes: int = 4, train: int = 256, test: int = 128, seed: int = 0) -> ArrayDataset:
    """A dataset of `spec`'s shape: `train` + `test` examples, balanced over `num_classes`.

    All examples are drawn in one pass, so train and test share the class patterns.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(train + test) % num_classes
    x = _inputs(spec, rng, labels, num_classes)
    order = rng.permutation(train + test)
    data = Split(x, labels.astype(np.int64)).take(order)
    head, tail = np.arange(train), np.arange(train, train + test)
    return ArrayDataset(f"synthetic_{spec.kind}", spec, data.take(head), data.take(tail))
