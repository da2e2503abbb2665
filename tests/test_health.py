"""Health signals: the inner step raising the support loss, a collapsed encoder, and a NaN, flagged in
the run's reports and log, and a rule that stops such a trial in a real Tune run."""

import pytest
import torch
from ray import tune

from metamae.config import DatasetConfig
from metamae.data.synthetic import synthetic
from metamae.health import COLLAPSE_SPREAD, Health, unhealthy
from metamae.linear_eval import online_probe
from tests.conftest import SPECS, random_batch, tiny_model
from tune import sweep


def support_change(inner_lr: float) -> dict[str, float]:
    """Health's numbers after five MetaMAE loss evaluations at inner-step size `inner_lr`."""
    model = tiny_model("timeseries", inner_lr=inner_lr)
    health, generator = Health(), torch.Generator().manual_seed(0)
    for _ in range(5):
        health.step(model(random_batch(SPECS["timeseries"], 16, generator, torch.float64)).scalars())
    return health.read()


def test_the_inner_step_raising_the_support_loss_on_average_is_flagged_once():
    fine = support_change(0.5)                                        # a real MetaMAE step lowers it
    assert fine["support_change"] < 0 and fine["support_rises"] == 0.0
    health = Health()
    for before, after in [(1.0, 1.3), (1.0, 0.9), (2.0, 2.1)]:      # up on average: +0.1
        health.step({"support_before": before, "support_after": after, "total": 1.0})
    assert health.read()["support_change"] == pytest.approx(0.1) and health.read()["support_rises"] == 1.0
    [line] = health.new_warnings(step=75)
    assert line.startswith("step 75: the inner step raises the support loss") and "objective.inner_lr" in line
    assert health.new_warnings(step=150) == []                       # said once per run
    assert "support_change" not in Health().read()                   # MAE has no support loss


def test_a_collapsed_encoder_is_flagged_and_a_fresh_one_is_not():
    data = synthetic(SPECS["tabular"], num_classes=3, train=64, test=16, seed=0)
    dataset = DatasetConfig(name="t", num_classes=3, metric="accuracy", batch_size=16)
    model = tiny_model("tabular", dtype=torch.float32)
    fresh = online_probe(model, data, dataset, examples=32)
    with torch.no_grad():
        for parameter in model.tokenizer.parameters():                # every example's tokens: positions only
            parameter.zero_()
    collapsed = online_probe(model, data, dataset, examples=32)
    assert fresh.feature_spread > 10 * COLLAPSE_SPREAD and collapsed.feature_spread < COLLAPSE_SPREAD
    health = Health()
    health.probed(collapsed.feature_spread)
    assert health.read()["collapsed"] == 1.0 and unhealthy(health.read()) == ["collapsed"]


def reports_support_rising_from_step_3(config):
    for step in range(1, 11):
        tune.report({"step": step, "probe": 0.5, "support_rises": float(step >= 3)})


@pytest.mark.parametrize("stop_unhealthy, last_step", [(True, 4), (False, 10)])
def test_an_unhealthy_trial_is_stopped_by_rule_after_the_grace_period(local_ray, tmp_path, stop_unhealthy, last_step):
    stop = sweep.StopUnhealthy(grace_period=4) if stop_unhealthy else None
    results = tune.Tuner(reports_support_rising_from_step_3,
                         run_config=tune.RunConfig(storage_path=str(tmp_path), name="health", stop=stop,
                                                   verbose=0)).fit()
    assert results[0].metrics["step"] == last_step
