"""The sweep report, read from a real Ray Tune + Optuna sweep: every trial with its status, config and
outcome, the best config and its checkpoint, the failures, the plots; and a sweep still in progress."""
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from ray import cloudpickle, tune
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


def pretrain_stand_in(config):
    """Reports as a pretraining trial does: the probe and loss terms as it trains, then the objective."""
    inner_lr, mask_ratio = config["objective.inner_lr"], config["objective.mask_ratio"]
    if inner_lr >= DIVERGING_LR:
        raise FloatingPointError(f"total loss is NaN at step 10 with inner_lr={inner_lr}")
    for step in (10, 20, 30, 40):
        tune.report({"step": step, "probe": inner_lr * step, "total": 1 / step, "reconstruction": mask_ratio / step})
    tune.report({"step": 50, "probe": inner_lr * 50, "total": 0.02, "reconstruction": mask_ratio / 50,
                 "objective": objective(config), "checkpoint_path": f"/checkpoints/{inner_lr}"})


def objective(config):
    return config["objective.inner_lr"] + config["objective.mask_ratio"] / 10


class FinalMetricOptunaSearch(OptunaSearch):
    """OptunaSearch told only of the final report: the objective is missing from the others."""

    def on_trial_result(self, trial_id, result):
        if self.metric in result:
            super().on_trial_result(trial_id, result)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep folder: the Tune experiment `digits` and its Optuna study in optuna.db."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    ray.init(num_cpus=2, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import a test module
    storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir}/optuna.db")
    search = FinalMetricOptunaSearch(metric="objective", mode="max", storage=storage, study_name="digits",
                                     points_to_evaluate=POINTS)
    asha = ASHAScheduler(metric="probe", mode="max", time_attr="training_iteration", grace_period=1,
                         reduction_factor=2)
    space = {key: tune.uniform(0.0, DIVERGING_LR) for key in POINTS[0]}
    # No metric in TuneConfig: Tune refuses one beside a scheduler that has its own.
    tuner = tune.Tuner(pretrain_stand_in, param_space=space,
                       tune_config=tune.TuneConfig(search_alg=search, scheduler=asha, num_samples=len(POINTS),
                                                   max_concurrent_trials=1, reuse_actors=True),
                       run_config=tune.RunConfig(storage_path=str(sweep_dir), name="digits", verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # probe-only reports lack `objective`
            results = tuner.fit()
    finally:
        ray.shutdown()
    assert len(results.errors) == 1
    return sweep_dir


def config_of(row):
    return {key: row[key] for key in POINTS[0]}


def test_the_csv_holds_every_trial_with_its_status_config_and_outcome(sweep):
    write_report(sweep)
    table = pd.read_csv(sweep / "digits.csv")
    assert [config_of(row) for _, row in table.iterrows()] == POINTS
    assert table["trial_id"].is_unique
    failed, stopped = table.iloc[POINTS.index(FAILED)], table.iloc[POINTS.index(STOPPED)]
    assert failed["status"] == "ERROR" and "total loss is NaN at step 10" in failed["error"]
    assert stopped["status"] == "TERMINATED" and stopped["step"] < 50 and pd.isna(stopped["objective"])
    finished = table.dropna(subset=["objective"])
    assert len(finished) == 5 and (finished["status"] == "TERMINATED").all() and (finished["step"] == 50).all()
    for _, row in finished.iterrows():
        assert row["objective"] == pytest.approx(objective(config_of(row)))
        assert row["probe"] == pytest.approx(row["objective.inner_lr"] * 50)
        assert row["checkpoint_path"] == f"/checkpoints/{row['objective.inner_lr']}"
        assert row["time_total_s"] > 0


def test_the_report_names_the_best_config_its_checkpoint_the_failures_and_the_plots(sweep):
    report = write_report(sweep).read_text()
    best = pd.read_csv(sweep / "digits.csv").iloc[POINTS.index(BEST)]
    assert f"**Best**: objective {objective(BEST):.4g} (trial `{best['trial_id']}`) with " \
           "`objective.inner_lr=0.4`, `objective.mask_ratio=0.8`." in report
    assert f"Best checkpoint: `/checkpoints/{BEST['objective.inner_lr']}`" in report
    assert "7 trials: 5 finished, 1 stopped early, 1 failed, 0 pending or running" in report
    assert "### Failed trials\n\n- `" in report
    assert "`objective.inner_lr=1`, `objective.mask_ratio=0.5`: FloatingPointError: total loss is NaN" in report
    assert report.count("| TERMINATED |") == 6 and report.count("| ERROR |") == 1
    plots = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert [Path(plot).stem for plot in plots] == ["digits_objective_vs_params", "digits_probe_curves",
                                                   "digits_history", "digits_importances"]
    assert all((sweep / plot).stat().st_size > 10_000 for plot in plots)


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
    assert len(table) == len(POINTS) and table["objective"].isna().all()
    assert table["step"].tolist().count(10) == 1 and table["step"].isna().sum() == len(POINTS) - 1
    assert "No trial has finished yet: no best config." in report
    assert f"Parameter importances need {MIN_TRIALS_FOR_IMPORTANCES} completed Optuna trials; the study has 0." \
           in report
    assert "digits_probe_curves.png" in report and "digits_history.png" not in report

    distributions = {key: optuna.distributions.FloatDistribution(0.0, DIVERGING_LR) for key in BEST}
    study.add_trial(optuna.trial.create_trial(params=BEST, distributions=distributions, value=objective(BEST)))
    report = write_report(tmp_path, storage).read_text()
    assert "the study has 1." in report and (tmp_path / "plots" / "digits_history.png").stat().st_size > 0
