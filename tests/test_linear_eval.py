"""Linear evaluation: every metric, the converged probe and the paper's, the validation split that
chooses (never a test example), per-token features, the raw-input baseline and paired intervals."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from metamae.config import DatasetConfig, ProbeConfig
from metamae.data.arrays import Split
from metamae.data.digits import digits
from metamae.data.synthetic import synthetic
from metamae.linear_eval import (Features, carve_validation, decide, head_outputs, linear_probe, paired_bootstrap,
                                 raw_input_probe, score)
from metamae.model import MetaMAE, ObjectiveConfig
from tests.conftest import SPECS, TINY

DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, metric="accuracy", source="digits")


def test_scores_come_from_the_libraries():
    y = np.array([0, 1, 2, 2])
    logits = np.array([[3., 0, 0], [0, 3., 0], [0, 3., 0], [0, 0, 3.]])
    assert score("accuracy", decide("accuracy", logits), y) == 0.75
    assert score("weighted_f1", decide("weighted_f1", logits), y) == pytest.approx(0.75)    # sklearn, weighted
    binary = decide("binary_accuracy", np.array([[2.], [-1.], [0.5]]))
    assert score("binary_accuracy", binary, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    multilabel = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert score("auroc", decide("auroc", multilabel * 2.0 - 1), multilabel) == 1.0
    assert score("spearman", decide("spearman", np.array([[1.], [2.], [3.]])), np.array([10., 20., 25.])) == 1.0
    assert score("pearson", np.array([1., 2., 3.]), np.array([2., 4., 6.])) == pytest.approx(1.0)
    assert head_outputs("binary_accuracy", 2) == 1 and head_outputs("accuracy", 10) == 10


def test_the_raw_input_probe_on_the_digits_is_a_converged_fit():
    """A converged logistic regression on the digits' raw pixels reads about 0.96; the paper's Adam head
    at lr 1e-4 is nowhere near after a few epochs."""
    data = digits()
    result = raw_input_probe(data, DIGITS, ProbeConfig())
    assert result.test >= 0.95 and result.validation >= 0.95 and result.converged
    assert result.splits == {"fit": "train less its validation 20%", "test": "test",
                             "validation": "20% of train (seed 0, stratified by class where possible)"}
    predictions = result.test_predictions
    assert len(predictions.predictions) == len(data.test) == len(predictions.labels) == len(predictions.examples)
    assert raw_input_probe(data, DIGITS, ProbeConfig(method="paper", epochs=2)).test < 0.9


def test_no_test_example_reaches_the_choice():
    """The validation part comes from the training split; the test labels change only the test score."""
    data = digits()
    honest = raw_input_probe(data, DIGITS, ProbeConfig(l2=[1e-2, 1.0, 100.0]))
    scrambled = replace(data, test=Split(data.test.x, np.random.default_rng(0).permutation(data.test.y)))
    blind = raw_input_probe(scrambled, DIGITS, ProbeConfig(l2=[1e-2, 1.0, 100.0]))
    assert (blind.validation, blind.l2, blind.train) == (honest.validation, honest.l2, honest.train)
    assert np.array_equal(blind.test_predictions.predictions, honest.test_predictions.predictions)
    assert blind.test < 0.3


def test_the_validation_part_is_carved_by_example_and_stratified():
    rows = Features(np.zeros((300, 2), np.float32), np.repeat(np.arange(3), 100), np.arange(300))
    fit, validation = carve_validation(rows, stratify=True, fraction=0.2, seed=0)
    assert len(validation.y) == 60 and np.bincount(validation.y).tolist() == [20, 20, 20]
    assert not set(fit.example) & set(validation.example)
    tokens = Features(np.zeros((40, 2), np.float32), np.arange(40) % 2, np.repeat(np.arange(10), 4))   # 4 per example
    fit, validation = carve_validation(tokens, stratify=False, fraction=0.2, seed=0)
    assert len(set(validation.example)) == 2 and len(validation.y) == 8
    assert not set(fit.example) & set(validation.example)


def test_a_dataset_with_its_own_validation_split_chooses_on_it(tmp_path):
    from metamae.data.shards import ShardDataset, ShardWriter
    data = synthetic(SPECS["tabular"], num_classes=3, train=200, test=80, seed=0)
    writer = ShardWriter(tmp_path, "t", data.spec, 3, "accuracy", progress=False)
    writer.add("train", data.train.x[:150], data.train.y[:150])
    writer.add("val", data.train.x[150:], data.train.y[150:])
    writer.add("test", data.test.x, data.test.y)
    writer.finish()
    dataset = DatasetConfig(name="t", num_classes=3, metric="accuracy", batch_size=32, probe_validation_split="val")
    result = raw_input_probe(ShardDataset(tmp_path), dataset, ProbeConfig())
    assert result.splits == {"fit": "train", "validation": "val", "test": "test"}


def test_probe_leaves_the_encoder_frozen_and_learns_synthetic_classes():
    data = synthetic(SPECS["tabular"], num_classes=3, train=240, test=120, seed=0)
    torch.manual_seed(0)
    model = MetaMAE(data.spec, TINY, ObjectiveConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = DatasetConfig(name="t", num_classes=3, metric="accuracy", batch_size=32)
    for probe in (ProbeConfig(), ProbeConfig(method="paper", epochs=60, lr=1e-2)):
        result = linear_probe(model, data, dataset, probe)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert result.test > 0.6 and result.metric == "accuracy"


@pytest.mark.parametrize("metric", ["binary_accuracy", "auroc", "spearman", "weighted_f1"])
def test_the_converged_probe_fits_every_label_kind(metric):
    data = synthetic(SPECS["tabular"], num_classes=2, train=240, test=120, seed=0)
    if metric == "auroc":                                  # two labels: the class, and its opposite
        data.train.y, data.test.y = (np.stack([s.y, 1 - s.y], axis=1) for s in (data.train, data.test))
    if metric == "spearman":
        data.train.y, data.test.y = (s.x[:, 0, 0] * 2.0 + 0.1 * s.y for s in (data.train, data.test))
    dataset = DatasetConfig(name="t", num_classes=2, metric=metric, batch_size=32)
    assert raw_input_probe(data, dataset, ProbeConfig()).test > 0.7


def test_per_token_probe_uses_one_feature_per_token():
    data = synthetic(SPECS["tokens"], num_classes=2, train=64, test=32, seed=0)
    data.train.y = data.train.x % 2                            # a label per token: its parity
    data.test.y = data.test.x % 2
    torch.manual_seed(0)
    model = MetaMAE(data.spec, TINY, ObjectiveConfig())
    dataset = DatasetConfig(name="t", num_classes=2, metric="accuracy", batch_size=16, per_token=True)
    result = linear_probe(model, data, dataset, ProbeConfig())
    assert result.test > 0.9                                   # the token's own embedding tells its parity
    assert raw_input_probe(data, dataset, ProbeConfig()).test == 1.0      # its one-hot tells it exactly
    data.train.y[:, -3:] = data.test.y[:, -3:] = 7             # padding, out of the probe's classes
    padded = DatasetConfig(name="t", num_classes=2, metric="accuracy", batch_size=16, per_token=True, ignore_label=7)
    assert linear_probe(model, data, padded, ProbeConfig()).test > 0.9


def test_a_paired_bootstrap_interval_brackets_the_gain_and_narrows_with_examples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    better = np.where(rng.random(2000) < 0.9, y, 1 - y)       # right 90 % of the time
    worse = np.where(rng.random(2000) < 0.8, y, 1 - y)        # right 80 %
    gain, low, high = paired_bootstrap("accuracy", better, worse, y)
    assert low < gain < high and 0.05 < low and high < 0.15
    _, small_low, small_high = paired_bootstrap("accuracy", better[:100], worse[:100], y[:100])
    assert small_high - small_low > 2 * (high - low)
    _, f1_low, f1_high = paired_bootstrap("weighted_f1", better, worse, y, resamples=200)
    assert 0 < f1_low < f1_high
    with pytest.raises(ValueError, match="the same rows"):
        paired_bootstrap("accuracy", better, worse[:10], y)


def test_auroc_scores_the_labels_that_have_both_classes_and_fits_a_single_label():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])              # the second label has no positive here
    assert score("auroc", np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.2], [0.1, 0.4]]), y) == 1.0
    data = synthetic(SPECS["tabular"], num_classes=2, train=240, test=120, seed=0)
    data.train.y, data.test.y = data.train.y[:, None], data.test.y[:, None]        # N × 1 labels
    dataset = DatasetConfig(name="t", num_classes=1, metric="auroc", batch_size=32)
    result = raw_input_probe(data, dataset, ProbeConfig())
    assert result.test > 0.7 and result.test_predictions.predictions.shape == (120, 1)


def test_the_bootstrap_resamples_whole_examples_for_per_token_rows():
    rng = np.random.default_rng(0)
    examples = np.repeat(np.arange(100), 20)                      # 100 sequences of 20 tokens
    y = rng.integers(0, 2, 2000)
    right = rng.random(100) < 0.7                                 # a probe right on whole sequences, or wrong
    a = np.where(np.repeat(right, 20), y, 1 - y)
    b = np.where(rng.random(2000) < 0.6, y, 1 - y)
    _, low, high = paired_bootstrap("accuracy", a, b, y, examples)
    _, row_low, row_high = paired_bootstrap("accuracy", a, b, y)
    assert high - low > 2 * (row_high - row_low)                  # rows of one sequence are not independent


def test_raw_inputs_too_wide_to_hold_are_refused_and_a_validation_split_must_be_its_own():
    from metamae.linear_eval import raw_feature_count
    from metamae.modality import ImageSpec, ImageTextSpec, TokenSpec
    coco = ImageTextSpec(ImageSpec(3, 224, 224, 16), TokenSpec(30522, 32))
    assert raw_feature_count(coco) == 3 * 224 * 224 + 32 * 30522
    assert raw_feature_count(TokenSpec(4, 250)) == 1000 and raw_feature_count(TokenSpec(4, 250), per_token=True) == 4
    with pytest.raises(ValueError, match="probe_validation_split is 'test'"):
        DatasetConfig(name="t", probe_validation_split="test")
