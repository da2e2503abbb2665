"""A Tune trial that runs a Ray Train run: Train's reports reach Tune in order, the last one included.

    Train controller ──after_report──▶ Queue actor ──get──▶ trial thread: tune.report(...)
    (a thread of the trial runs TorchTrainer.fit)            until the run has ended and the queue is empty

A Train run ends before its trial does: its reservation with the cluster's autoscaler is cancelled
and its workers are freed. Killed with the trial's actor instead, the run leaves its reservation
until it expires (180 s in Ray 2.60), and an autoscaling cluster keeps nodes for it. A trial that
Tune stops early cannot wait for its run to end (Tune ends the trial's actor without waiting), so
the sweep's driver cancels the reservation of every trial that ends (CancelTrainReservations).

Why not Ray's TuneReportCallback (Ray 2.60): it hands each report through a one-slot queue that
the trial actor's *main* thread empties and reports again from there. When the Train run ends right
after its last report, the marker Tune's function wrapper reports when the trial function returns
can take the trial's one-slot result queue first. The main thread then either blocks forever
putting the last report into the full slot (the trial stays RUNNING, its Train run long finished,
its resources held) or returns the marker and the last report, with the objective, is lost.
tests/test_tune_reports.py reproduces the race with TuneReportCallback and checks this module
against it. Here every tune.report comes from the trial's own thread, the path Tune is built for.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from queue import Empty
from typing import Any, Callable, Dict, List, Optional

import ray
from ray import tune
from ray.train import Checkpoint
from ray.util.queue import Queue

from metamae.loop import CHECKPOINT_PATH
from metamae.private_apis import abort_train_run, cancel_reservation, train_callback_base, train_reservation

TRAIN_RESERVATION = "train_reservation" # the report's key for its Train run's reservation
END_TIMEOUT_S = 30                      # for the controller to end the run's workers


@dataclass(frozen=True)
class TrainRun:
    """The Ray Train run that made a report: its controller (an actor) and the name of its
    reservation with the cluster's autoscaling coordinator."""
    controller: ray.actor.ActorHandle
    reservation: str

    def end(self) -> None:
        """Abort the run now, as Ctrl-C does (which ends the workers and removes their placement
        group), before the trial's actor ends and the controller with it, if it can. Its reservation
        is cancelled by the sweep's driver (CancelTrainReservations)."""
        abort_train_run(self.controller, END_TIMEOUT_S)


class ReportQueue(train_callback_base()):
    """A Ray Train callback (it runs in Train's controller): queues rank 0's metrics of every report,
    with the path of the checkpoint saved with it, and the run that made it. The queue is unbounded:
    Train never waits on Tune."""

    def __init__(self):
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.run: Optional[TrainRun] = None

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[Checkpoint]):
        if self.run is None:
            self.run = TrainRun(ray.get_runtime_context().current_actor, train_reservation(run_context))
        report = {**metrics[0], TRAIN_RESERVATION: self.run.reservation}
        if checkpoint is not None:
            report[CHECKPOINT_PATH] = checkpoint.path
        self.queue.put((report, self.run))


class CancelTrainReservations(tune.Callback):
    """On the sweep's driver: when a trial ends (finished, stopped early, failed, or failed and to be
    retried), cancel its Train run's reservation (named in its reports) with the cluster's autoscaling
    coordinator, a detached actor. Such a trial cannot do it itself: Tune ends the trial's actor
    without waiting for it, or the actor is dead. A run that has ended has no reservation left, and
    cancelling it again does nothing."""

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._cancel(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._cancel(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._cancel(trial)

    @staticmethod
    def _cancel(trial: Any) -> None:
        reservation = (trial.last_result or {}).get(TRAIN_RESERVATION)
        if reservation:
            cancel_reservation(reservation)


def report_to_tune(train_run: Callable[[ReportQueue], Any], is_last: Callable[[dict], bool] = lambda report: False,
                   poll_s: float = 0.5) -> Any:
    """Inside a Tune trial: run `train_run(callback)` (a Ray Train fit given its callback) in a thread,
    tune.report each of its reports from this thread, and return its result or raise its error.

    The run's last report (`is_last`) goes to Tune once the run has ended, its reservation cancelled
    and its workers freed: ASHA stops a trial at its last step (max_t), and Tune then ends the trial's
    actor with no wait for this thread. When Tune stops the trial before that, tune.report exits this
    thread: the Train run, if it is still on, is aborted (TrainRun.end), as far as the trial's actor
    lasts, and the sweep's driver cancels its reservation (CancelTrainReservations).
    """
    reports = ReportQueue()
    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train_run(reports)
        except BaseException as error:      # re-raised in the trial's thread, where Tune sees it
            outcome["error"] = error

    thread = threading.Thread(target=run, name="ray-train-run", daemon=True)
    thread.start()
    try:
        while thread.is_alive() or not reports.queue.empty():   # a finished run has queued all its reports
            try:
                report, made_by = reports.queue.get(timeout=poll_s)
            except Empty:
                continue
            if is_last(report):
                thread.join()
            tune.report(report)
    except SystemExit:                                          # Tune stopped the trial
        if thread.is_alive():
            made_by.end()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
