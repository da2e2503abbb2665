"""A Tune trial that runs a Ray Train run: Train's reports reach Tune in order, the last one included.

    Train controller ──after_report──▶ Queue actor ──get──▶ trial thread: tune.report(...)
    (a thread of the trial runs TorchTrainer.fit)            until the run has ended and the queue is empty

When Tune stops the trial (ASHA), the trial aborts its Train run through the controller, as Ctrl-C
does for a Train run in a script: the run cancels its reservation with the cluster's autoscaler and
frees its workers' placement group at once. Killed with the trial's actor instead, the run leaves its
reservation until it expires (180 s in Ray 2.60), and an autoscaling cluster keeps nodes for it.

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
from queue import Empty
from typing import Any, Callable, Dict, List, Optional

import ray
from ray import tune
from ray.train import Checkpoint
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

CHECKPOINT_PATH = "checkpoint_path"     # the report's key for the path of the checkpoint it saved
ABORT_TIMEOUT_S = 30                    # for the controller to cancel its reservation and free its workers


class ReportQueue(UserCallback):
    """A Ray Train callback (it runs in Train's controller): queues rank 0's metrics of every report,
    with the path of the checkpoint saved with it, and the controller's handle. The queue is
    unbounded: Train never waits on Tune."""

    def __init__(self):
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context: Any, metrics: List[Dict[str, Any]], checkpoint: Optional[Checkpoint]):
        report = dict(metrics[0])
        if checkpoint is not None:
            report[CHECKPOINT_PATH] = checkpoint.path
        self.queue.put((report, ray.get_runtime_context().current_actor))


def report_to_tune(train_run: Callable[[UserCallback], Any], poll_s: float = 0.5) -> Any:
    """Inside a Tune trial: run `train_run(callback)` (a Ray Train fit given its callback) in a thread,
    tune.report each of its reports from this thread, and return its result or raise its error.

    When Tune stops the trial (ASHA), tune.report exits this thread: the Train run, if it is still on,
    is aborted first.
    """
    reports = ReportQueue()
    outcome: Dict[str, Any] = {}
    controller = None

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
                report, controller = reports.queue.get(timeout=poll_s)
            except Empty:
                continue
            tune.report(report)
    except SystemExit:                                          # Tune stopped the trial
        if thread.is_alive():
            abort(controller)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")


def abort(controller: ray.actor.ActorHandle) -> None:
    """Abort a Train run the way Ctrl-C does: its controller cancels the run's reservation with the
    autoscaler, ends its workers, removes their placement group and exits."""
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass                                                    # it exited (as abort does), or is stuck
