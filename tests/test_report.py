"""The sweep report, read from a real Ray Tune + Optuna sweep: every trial with its status, config and
outcome, the best config (by validation) and its checkpoint, the baselines and the verdict against them,
the failures, the health flags, the plots; and a sweep still in progress."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from tune.report import MIN_TRIALS_FOR_IMPORTANCES, write_report

REPO = Path(__file__).resolve().parents[1]
DIVERGING_LR = 1.0
# Tried in this order, one at a time: each of the first five beats every earlier probe, so ASHA keeps
# it; the sixth diverges; the seventh trails every earlier probe and ASHA stops it at its first rung.
POINTS = [{"objective.inner_lr": lr, "objective.mask_ratio": ratio}
          for lr, ratio in [(0.05, 0.5), (0.1, 0.7), (0.2, 0.4), (0.3, 0.6), (0.4, 0.8), (DIVERGING_LR, 0.5),
                            (0.01, 0.5)]]
BEST, FAILED, STOPPED = POINTS[4], POINTS[5], POINTS[6]


LABELS = np.arange(200) % 2                       # the test split's labels


def predictions_scoring(accuracy: float) -> np.ndarray:
    """Test predictions whose accuracy on LABELS is `accuracy`: the first rows right, the rest wrong."""
    right = round(accuracy * len(LABELS))
    return np.where(np.arange(len(LABELS)) < right, LABELS, 1 - LABELS)


def save_predictions(path: Path, accuracy: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, predictions=predictions_scoring(accuracy), labels=LABELS, examples=np.arange(len(LABELS)))


def pretrain_stand_in(config, runs: Path):
    """Reports as a pretraining trial does: the probe, loss terms and health as it trains, then the
    validation score (`validation`) and the test score, whose predictions it writes where a trial does."""
    inner_lr, mask_ratio = config["objective.inner_lr"], config["objective.mask_ratio"]
    if inner_lr >= DIVERGING_LR:
        raise FloatingPointError(f"total loss is NaN at step 10 with inner_lr={inner_lr}")
    health = {"support_change": inner_lr - 0.35, "support_rises": float(inner_lr > 0.35)}
    for step in (10, 20, 30, 40):
        tune.report({"step": step, "probe": inner_lr * step, "total": 1 / step, "reconstruction": mask_ratio / step,
                     **health})
    save_predictions(runs / tune.get_context().get_trial_id() / "test_predictions.npz", held_out_accuracy(config))
    tune.report({"step": 50, "probe": inner_lr * 50, "total": 0.02, "reconstruction": mask_ratio / 50, **health,
                 "validation": objective(config), "test": held_out_accuracy(config),
                 "checkpoint_path": f"/checkpoints/{inner_lr}"})


def objective(config):
    return config["objective.inner_lr"] + config["objective.mask_ratio"] / 10


def held_out_accuracy(config):
    return 0.5 + objective(config) / 2


BASELINES = {"random_init": 0.55, "raw_input": 0.95}      # test accuracies; validation ones: the same less 0.01


def write_baselines(experiment: Path) -> None:
    """What the sweep writes before its trials (tune/sweep.py: baseline_probes_once)."""
    splits = {"fit": "train less its validation 20%", "validation": "20% of train (seed 0, stratified)",
              "test": "test"}
    experiment.mkdir(parents=True, exist_ok=True)
    (experiment / "baselines.json").write_text(json.dumps({"config": {}, "probes": {
        name: {"metric": "accuracy", "method": "converged", "validation": accuracy - 0.01, "test": accuracy,
               "train": 1.0, "splits": splits, **({"probe": 0.3} if name == "random_init" else {})}
        for name, accuracy in BASELINES.items()}}))
    for name, accuracy in BASELINES.items():
        save_predictions(experiment / "baselines" / f"{name}.npz", accuracy)


class FinalMetricOptunaSearch(OptunaSearch):
    """OptunaSearch told only of the final report: the objective is missing from the others."""

    def on_trial_result(self, trial_id, result):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, local_ray):
    """A finished sweep folder: the Tune experiment `digits` and its Optuna study in optuna.db."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    write_baselines(sweep_dir / "digits")
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir}/optuna.db")
    search = FinalMetricOptunaSearch(metric="validation", mode="max", storage=storage, study_name="digits",
                                     points_to_evaluate=POINTS)
    asha = ASHAScheduler(metric="probe", mode="max", time_attr="training_iteration", grace_period=1,
                         reduction_factor=2)
    space = {key: tune.uniform(0.0, DIVERGING_LR) for key in POINTS[0]}
    # No metric in TuneConfig: Tune refuses one beside a scheduler that has its own.
    trial = tune.with_parameters(pretrain_stand_in, runs=sweep_dir / "digits" / "runs")
    tuner = tune.Tuner(trial, param_space=space,
                       tune_config=tune.TuneConfig(search_alg=search, scheduler=asha, num_samples=len(POINTS),
                                                   max_concurrent_trials=1, reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(sweep_dir), name="digits", verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    results = tuner.fit()     # probe-only reports lack `validation`: see metamae.process.ENVIRONMENT
    assert len(results.errors) == 1
    return sweep_dir


def config_of(row):
    return {key: row[key] for key in POINTS[0]}


def test_the_csv_holds_every_trial_with_its_status_config_and_outcome(sweep):
    write_report(sweep)
    table = pd.read_csv(sweep / "digits.csv")
    baselines = table[table["outcome"] == "baseline"]
    assert list(baselines["trial_id"]) == ["baseline: random-init encoder", "baseline: raw-input probe"]
    assert list(baselines["test"]) == [0.55, 0.95] and list(baselines["validation"]) == [0.54, 0.94]
    table = table[table["outcome"] != "baseline"]
    assert [config_of(row) for _, row in table.iterrows()] == POINTS
    assert table["trial_id"].is_unique
    failed, stopped = table.iloc[POINTS.index(FAILED)], table.iloc[POINTS.index(STOPPED)]
    assert failed["status"] == "ERROR" and "total loss is NaN at step 10" in failed["error"]
    assert stopped["status"] == "TERMINATED" and stopped["step"] < 50 and pd.isna(stopped["validation"])
    finished = table.dropna(subset=["validation"])
    assert len(finished) == 5 and (finished["status"] == "TERMINATED").all() and (finished["step"] == 50).all()
    for _, row in finished.iterrows():
        assert row["validation"] == pytest.approx(objective(config_of(row)))
        assert row["test"] == pytest.approx(held_out_accuracy(config_of(row)))
        assert (row["health"] == "support_rises") == (row["objective.inner_lr"] > 0.35)
        assert row["probe"] == pytest.approx(row["objective.inner_lr"] * 50)
        assert row["checkpoint_path"] == f"/checkpoints/{row['objective.inner_lr']}"
        assert row["time_total_s"] > 0


def test_the_report_names_the_best_config_its_checkpoint_the_failures_and_the_plots(sweep):
    report = write_report(sweep).read_text()
    best = pd.read_csv(sweep / "digits.csv").iloc[POINTS.index(BEST)]
    assert f"**Best** (by validation): validation {objective(BEST):.4g}, test {held_out_accuracy(BEST):.4g} (trial " \
           f"`{best['trial_id']}`) with `objective.inner_lr=0.4`, `objective.mask_ratio=0.8`." in report
    assert f"Best checkpoint: `/checkpoints/{BEST['objective.inner_lr']}`" in report
    assert "7 trials: 5 finished, 1 stopped early, 1 failed, 0 pending or running" in report
    assert "### Failed trials\n\n- `" in report
    assert "`objective.inner_lr=1`, `objective.mask_ratio=0.5`: FloatingPointError: total loss is NaN" in report
    assert report.count("| TERMINATED |") == 6 and report.count("| ERROR |") == 1
    plots = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert [Path(plot).stem for plot in plots] == ["digits_validation_vs_params", "digits_probe_curves",
                                                   "digits_history", "digits_importances"]
    assert all((sweep / plot).stat().st_size > 10_000 for plot in plots)
    assert "- Health: 2 of 7 trials flagged: " in report and "support_rises" in report and "NaN loss" in report


def test_the_reports_first_lines_say_whether_the_chosen_configuration_beats_each_baseline(sweep):
    """The best trial by validation scores 0.74 test accuracy on 200 examples: far above the random-init
    encoder's 0.55, below the raw inputs' 0.95; each gain with a paired bootstrap interval."""
    lines = write_report(sweep).read_text().splitlines()
    verdict = lines[2]
    assert verdict.startswith("**digits: the chosen configuration does not beat the raw-input probe.**")
    assert f"chosen on its validation accuracy ({objective(BEST):.4f}), scores test accuracy 0.7400" in verdict
    assert "against the random-init encoder (test 0.5500): +0.1900 [95 % CI +0.1" in verdict
    assert "it **beats** it" in verdict
    assert "against the raw-input probe (test 0.9500): -0.2100 [95 % CI -0.2" in verdict
    assert "it is **worse** than it" in verdict


def test_the_report_reads_the_search_bounds_and_the_early_stopping_signals_ranking(sweep):
    report = write_report(sweep).read_text()
    # the best inner_lr, 0.4, lies at 40 % of its range [0, 1]; the mask ratio 0.8 at 80 %: neither is flagged
    assert "- No best value lies within 5 % of a bound of its range." in report
    # the probe is inner_lr × step and the objective rises with inner_lr: the ranking is perfect at every step
    assert "final validation score of the 5 finished trials, Spearman's ρ: step 10: ρ = +1.00" in report


def test_the_command_line_writes_the_report_and_names_a_folder_without_a_sweep(sweep, tmp_path):
    storage = f"sqlite:///{sweep}/optuna.db"
    done = subprocess.run([sys.executable, "tune/report.py", str(sweep), "--storage", storage], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(sweep / "report.md")
    refused = subprocess.run([sys.executable, "tune/report.py", str(tmp_path)], cwd=REPO, capture_output=True,
                             text=True)
    assert refused.returncode == 1 and f"{tmp_path} holds no sweep" in refused.stderr


def test_a_sweep_folder_without_its_study_is_refused_naming_it(sweep, tmp_path):
    shutil.copytree(sweep / "digits", tmp_path / "digits")
    with pytest.raises(FileNotFoundError, match="optuna.db"):
        write_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Optuna study named 'digits'"):
        write_report(tmp_path, storage=f"sqlite:///{tmp_path}/other.db")


def test_a_sweep_in_progress_is_reported_from_what_is_there(sweep, tmp_path):
    """No trial with its final report yet, one result.json mid-write, a study with 0 then 1 complete trials."""
    shutil.copytree(sweep / "digits", tmp_path / "digits")
    results = list((tmp_path / "digits").glob("*/result.json"))
    writing = next(result for result in results if result.read_text())   # not the failed trial's: empty
    first_report = writing.read_text().splitlines()[0]
    writing.write_text(first_report + "\n" + first_report[:20])   # Tune is writing the second line
    for result in results:
        if result != writing:
            result.unlink()
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=storage, study_name="digits", direction="maximize")

    report = write_report(tmp_path, storage).read_text()
    table = pd.read_csv(tmp_path / "digits.csv")
    trials = table[table["outcome"] != "baseline"]
    assert len(trials) == len(POINTS) and trials["validation"].isna().all()
    assert trials["step"].tolist().count(10) == 1 and trials["step"].isna().sum() == len(POINTS) - 1
    assert "No trial has finished yet: no best config." in report
    assert ("**digits**: no trial has finished, so no configuration can be compared with the baselines "
            "(random-init encoder test 0.5500, raw-input probe test 0.9500).") in report
    assert f"Parameter importances need {MIN_TRIALS_FOR_IMPORTANCES} completed Optuna trials; the study has 0." \
           in report
    assert "digits_probe_curves.png" in report and "digits_history.png" not in report

    distributions = {key: optuna.distributions.FloatDistribution(0.0, DIVERGING_LR) for key in BEST}
    study.add_trial(optuna.trial.create_trial(params=BEST, distributions=distributions, value=objective(BEST)))
    report = write_report(tmp_path, storage).read_text()
    assert "the study has 1." in report and (tmp_path / "plots" / "digits_history.png").stat().st_size > 0


def test_a_searched_choice_has_no_bounds_to_be_near():
    from tune.report import near_bounds
    study = optuna.create_study(direction="maximize")
    distributions = {"model.size": optuna.distributions.CategoricalDistribution(["tiny", "small"]),
                     "objective.inner_lr": optuna.distributions.FloatDistribution(0.05, 5.0, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"model.size": "tiny", "objective.inner_lr": 4.9},
                                              distributions=distributions, value=0.9))
    best = pd.Series({"model.size": "tiny", "objective.inner_lr": 4.9})
    [line] = near_bounds(best, study, ["model.size", "objective.inner_lr"])
    assert line.startswith("- `objective.inner_lr=4.9` lies within 5% of its range's high bound (5)")
