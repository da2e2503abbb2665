"""Train reports reach the Tune trial in order, the last one included, when the run ends right after it.

The trial functions here call the Train callback the way Train's controller does (after_report, from
another thread) and return at once: the timing under which Ray's TuneReportCallback leaves trials
RUNNING forever or drops their last report (metamae/distributed/tune_reports.py): with
`train_run(TuneReportCallback())` in place of `report_to_tune(train_run)`, the first test hangs.
The last test stops a trial with Tune and checks that its (stand-in) Train run was aborted.
"""
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray import cloudpickle, tune
from ray.train import Checkpoint

from metamae.distributed.tune_reports import CHECKPOINT_PATH, report_to_tune

REPORTS = 3


def reports_then_return(config):
    """A trial whose 'Train run' reports REPORTS times from another thread, the last with a checkpoint,
    and ends the moment its last report is handed over."""
    def train_run(callback):
        def controller():
            for i in range(REPORTS):
                last = i == REPORTS - 1
                checkpoint = Checkpoint.from_directory(config["checkpoint"]) if last else None
                callback.after_report(None, [{"i": i, "trial": config["trial"]}, {"i": -1}], checkpoint)
        thread = threading.Thread(target=controller)
        thread.start()
        thread.join()
        return "finished"
    assert report_to_tune(train_run) == "finished"


@ray.remote(num_cpus=0, max_concurrency=2)
class Controller:
    """Stands in for Ray Train's controller: reports on and on until it is aborted, then leaves `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def run(self, callback):
        for i in range(600):
            callback.after_report(None, [{"i": i}], None)
            time.sleep(0.1)

    def abort(self):
        Path(self.marker).touch()
        ray.actor.exit_actor()


def reports_until_aborted(config):
    def train_run(callback):
        controller = Controller.remote(config["marker"])
        ray.get(controller.run.remote(callback))
    report_to_tune(train_run)


def fails_after_one_report(config):
    def train_run(callback):
        callback.after_report(None, [{"i": 0}], None)
        raise FloatingPointError("total loss is NaN at step 10")
    report_to_tune(train_run)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import a test module
    yield
    ray.shutdown()


def run(trial, space, tmp_path):
    tuner = tune.Tuner(tune.with_resources(trial, {"cpu": 0.1}), param_space=space,
                       tune_config=tune.TuneConfig(max_concurrent_trials=4),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="reports", verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def test_every_trial_gets_every_report_when_its_run_ends_right_after_the_last(local_ray, tmp_path):
    trials = 8
    results = run(reports_then_return, {"trial": tune.grid_search(list(range(trials))),
                                        "checkpoint": str(tmp_path)}, tmp_path)
    assert not results.errors
    assert sorted(r.metrics["trial"] for r in results) == list(range(trials))
    for result in results:
        history = result.metrics_dataframe
        assert list(history["i"]) == list(range(REPORTS)), "rank 0's reports, in order, none lost"
        assert result.metrics[CHECKPOINT_PATH] == str(tmp_path)


def test_a_failed_run_fails_its_trial_after_its_reports(local_ray, tmp_path):
    results = run(fails_after_one_report, {}, tmp_path)
    (result,) = results
    assert "total loss is NaN at step 10" in str(result.error)
    assert list(result.metrics_dataframe["i"]) == [0]


def test_a_trial_that_tune_stops_aborts_its_train_run(local_ray, tmp_path):
    """ASHA stops trials; the Train run of a stopped trial is aborted (which cancels its reservation
    with the autoscaler and frees its workers), not left running until the trial's actor is killed."""
    marker = tmp_path / "aborted"
    tuner = tune.Tuner(tune.with_resources(reports_until_aborted, {"cpu": 0.1}), param_space={"marker": str(marker)},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="stopped", verbose=0,
                                                 stop={"i": 3}))
    (result,) = tuner.fit()
    assert result.error is None and result.metrics["i"] == 3
    assert marker.exists(), "the stopped trial did not abort its Train run"
