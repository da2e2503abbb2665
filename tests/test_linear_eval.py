"""Linear evaluation: every metric, the probe on frozen features, per-token features."""
import pytest
import torch

from metamae.config import DatasetConfig, ProbeConfig
from metamae.data.synthetic import synthetic
from metamae.linear_eval import head_outputs, linear_probe, score
from metamae.model import MetaMAE, ObjectiveConfig
from tests.conftest import TINY, SPECS


def test_scores_come_from_the_libraries():
    y = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[3., 0, 0], [0, 3., 0], [0, 3., 0], [0, 0, 3.]])
    assert score("accuracy", logits, y) == 0.75
    assert score("weighted_f1", logits, y) == pytest.approx(0.75)    # sklearn f1_score, weighted
    assert score("binary_accuracy", torch.tensor([[2.], [-1.], [0.5]]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    multilabel = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    assert score("auroc", multilabel.float() * 2 - 1, multilabel) == 1.0
    assert score("spearman", torch.tensor([[1.], [2.], [3.]]), torch.tensor([10., 20., 25.])) == pytest.approx(1.0)
    assert score("pearson", torch.tensor([[1.], [2.], [3.]]), torch.tensor([2., 4., 6.])) == pytest.approx(1.0)
    assert head_outputs("binary_accuracy", 2) == 1 and head_outputs("accuracy", 10) == 10


def test_probe_leaves_the_encoder_frozen_and_learns_synthetic_classes():
    data = synthetic(SPECS["tabular"], num_classes=3, train=240, test=120, seed=0)
    torch.manual_seed(0)
    model = MetaMAE(data.spec, TINY, ObjectiveConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = DatasetConfig(name="t", num_classes=3, metric="accuracy", batch_size=32)
    result = linear_probe(model, data, dataset, ProbeConfig(epochs=60, lr=1e-2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.test > 0.6 and result.metric == "accuracy"


def test_per_token_probe_uses_one_feature_per_token():
    data = synthetic(SPECS["tokens"], num_classes=2, train=64, test=32, seed=0)
    data.train.y = data.train.x % 2                            # a label per token: its parity
    data.test.y = data.test.x % 2
    torch.manual_seed(0)
    model = MetaMAE(data.spec, TINY, ObjectiveConfig())
    dataset = DatasetConfig(name="t", num_classes=2, metric="accuracy", batch_size=16, per_token=True)
    result = linear_probe(model, data, dataset, ProbeConfig(epochs=30, lr=1e-2))
    assert result.test > 0.9                                   # the token's own embedding tells its parity
    data.train.y[:, -3:] = data.test.y[:, -3:] = 7             # padding, out of the probe's classes
    padded = DatasetConfig(name="t", num_classes=2, metric="accuracy", batch_size=16, per_token=True, ignore_label=7)
    assert linear_probe(model, data, padded, ProbeConfig(epochs=30, lr=1e-2)).test > 0.9
