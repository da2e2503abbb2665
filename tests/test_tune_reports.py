"""Train reports reach the Tune trial in order, the last one included, when the run ends right after it.

The trial functions here call the Train callback the way Train's controller does (after_report, from
another thread) and return at once: the timing under which Ray's TuneReportCallback leaves trials
RUNNING forever or drops their last report (metamae/distributed/tune_reports.py): with
`train_run(TuneReportCallback())` in place of `report_to_tune(train_run)`, the first test hangs.
The last three end a trial whose process dies, and stop one with Tune, at its last report and before:
its (stand-in) Train run ends, and its reservation with the autoscaler goes with it.
"""
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import ray
from ray import tune
from ray.train import Checkpoint
from ray.util.state import list_actors

from metamae.distributed.tune_reports import CHECKPOINT_PATH, CancelTrainReservations, report_to_tune
from metamae.private_apis import cancel_reservation, reservations, reserve, train_reservation

REPORTS = 3
RUN = SimpleNamespace(run_id="stand-in")     # what Train passes its callbacks as run_context, in part
RESERVATION = train_reservation(RUN)         # the name Train reserves a run's workers under


def reports_then_return(config):
    """A trial whose 'Train run' reports REPORTS times from another thread, the last with a checkpoint,
    and ends the moment its last report is handed over."""
    def train_run(callback):
        def controller():
            for i in range(REPORTS):
                last = i == REPORTS - 1
                checkpoint = Checkpoint.from_directory(config["checkpoint"]) if last else None
                callback.after_report(RUN, [{"i": i, "trial": config["trial"]}, {"i": -1}], checkpoint)
        thread = threading.Thread(target=controller)
        thread.start()
        thread.join()
        return "finished"
    assert report_to_tune(train_run) == "finished"


@ray.remote(num_cpus=0, max_concurrency=2)
class Controller:
    """Stands in for Ray Train's controller: reserves a worker's resources with the cluster's autoscaling
    coordinator as Train does, makes `reports` reports (the last with the validation score), then takes a
    second to shut down, cancels its reservation and leaves `folder`/ended; aborted, it leaves
    `folder`/aborted."""

    def __init__(self, folder, reports):
        self.folder, self.reports = Path(folder), reports
        reserve(RESERVATION, [{"CPU": 0.1}], expire_after_s=180)

    def run(self, callback):
        for i in range(self.reports):
            last = i == self.reports - 1
            callback.after_report(RUN, [{"i": i, **({"validation": 0.9} if last else {})}], None)
            time.sleep(0.1)
        time.sleep(1)
        ray.get(cancel_reservation(RESERVATION))
        (self.folder / "ended").touch()

    def abort(self):
        (self.folder / "aborted").touch()
        ray.actor.exit_actor()


def runs_a_controller(config):
    def train_run(callback):
        controller = Controller.remote(config["folder"], config["reports"])
        ray.get(controller.run.remote(callback))
    report_to_tune(train_run, is_last=lambda report: "validation" in report)


def dies_holding_a_reservation(config):
    """A trial whose process dies while its (stand-in) Train run holds a reservation."""
    controller = Controller.remote(config["folder"], 0)
    ray.get(controller.__ray_ready__.remote())                 # its reservation is made

    def train_run(callback):
        callback.after_report(RUN, [{"i": 0}], None)
        time.sleep(2)                                          # the report reaches Tune
        os._exit(1)
    report_to_tune(train_run)


def fails_after_one_report(config):
    def train_run(callback):
        callback.after_report(RUN, [{"i": 0}], None)
        raise FloatingPointError("total loss is NaN at step 10")
    report_to_tune(train_run)


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


def stopped_at(i, reports, tmp_path):
    """Run one trial of `runs_a_controller` that Tune stops at report i; its result and the reservations left."""
    tuner = tune.Tuner(tune.with_resources(runs_a_controller, {"cpu": 0.1}),
                       param_space={"folder": str(tmp_path), "reports": reports},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="stopped", verbose=0,
                                                 stop={"i": i}, callbacks=[CancelTrainReservations()]))
    (result,) = tuner.fit()
    return result, reservations()


def test_a_trial_whose_process_dies_has_its_reservation_cancelled(local_ray, tmp_path):
    tuner = tune.Tuner(tune.with_resources(dies_holding_a_reservation, {"cpu": 0.1}),
                       param_space={"folder": str(tmp_path)},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="died", verbose=0,
                                                 callbacks=[CancelTrainReservations()]))
    (result,) = tuner.fit()
    assert result.error is not None and result.metrics["i"] == 0
    assert RESERVATION not in reservations()


def test_a_trial_stopped_at_its_last_report_ends_after_its_train_run(local_ray, tmp_path):
    """ASHA stops every trial at its last step (max_t): the Train run has ended (its reservation
    cancelled, its workers freed) before Tune sees that report, and the report reaches Tune."""
    result, reservations = stopped_at(2, 3, tmp_path)
    assert result.error is None and result.metrics["validation"] == 0.9
    assert (tmp_path / "ended").exists() and not (tmp_path / "aborted").exists()
    assert RESERVATION not in reservations, reservations


def test_a_trial_stopped_early_ends_its_train_run_and_its_reservation(local_ray, tmp_path):
    """ASHA stops a trial at a rung: its reservation is cancelled by the time Tune returns, not left
    to expire 180 s later, and its Train run ends, aborted by the trial or killed with its actor (the
    trial's abort is best effort: Tune may end the trial's actor first)."""
    result, reservations = stopped_at(3, 600, tmp_path)
    assert result.error is None and result.metrics["i"] == 3
    assert RESERVATION not in reservations, reservations
    deadline = time.time() + 30
    while list_actors(filters=[("class_name", "=", "Controller"), ("state", "=", "ALIVE")]):
        assert time.time() < deadline, "the stopped trial's Train run (its controller) is still alive after 30 s"
        time.sleep(0.5)
    assert not (tmp_path / "ended").exists()
