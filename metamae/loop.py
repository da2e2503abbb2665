"""One pretraining run, step by step: the loop that the plain command, a one-worker sweep trial and
every Ray Train worker run alike. Only its Session differs, which says where the run is:

    session                                  reports to              checkpoints          data-parallel
    LocalSession (this module)               a callback: a printed   RUN/checkpoint_<step>/   no
                                             line, or tune.report
    TrainSession (distributed/trainer.py)    ray.train.report        Ray Train's storage  DDP over the workers

Each step: the batch (in-memory data: a function of the step; shards: reshuffled from the step on
resume), the masking and support draws of step s from a generator seeded with (seed, s) and cut
into the workers' slices, dropout seeded with (seed, rank, s), the step (train.train_step). So a run
resumed from a checkpoint, or run on another number of workers or in another mode, sees the same
batches and the same draws. Every `log_every` steps a report; every `probe_every` the online probe
(rank 0), whose best model is kept in RUN/best/; every `checkpoint_every` a checkpoint; at the last
step the linear evaluation (results.json, the test predictions). A NaN loss ends the run at its step
with {'error': ...}, a stop the session asks for with a checkpoint of the last step and {'stopped': ...}.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol

import numpy as np
import torch
from tensorboardX import SummaryWriter

from metamae.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from metamae.config import ExecutionConfig, ProbeConfig
from metamae.data.arrays import ArrayDataset, Dataset, batches_from_step, endless_batches, to_tensors
from metamae.health import Health
from metamae.linear_eval import PREDICTIONS, linear_probe, online_probe
from metamae.modality import to_device
from metamae.model import MetaMAE
from metamae.process import start_training
from metamae.train import (NonFiniteLoss, RunRecipe, StopSignals, check_same_run, compile_loss, make_optimizer,
                           restore_optimizer, train_step)

BEST = "best"                   # the run folder's copy of the best checkpoint by the online probe
RESULTS = "results.json"
CHECKPOINT_PATH = "checkpoint_path"     # a report's key for the checkpoint saved with it
CHECKPOINT_PREFIX = "checkpoint_"       # checkpoint_<step, 8 digits>/checkpoint.pt, in every mode


class Session(Protocol):
    """Where a run runs: its place among the workers, and how it reports, checkpoints and stops."""
    rank: int
    world: int
    device: torch.device

    def prepare(self, model: MetaMAE) -> torch.nn.Module:
        """The model on this session's device, as the step calls it (DDP-wrapped over several workers)."""

    def saved(self) -> Iterator[tuple[str, ContextManager[Path]]]:
        """The run's checkpoints, newest first: each a name and a context giving its local folder."""

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        """Report the metrics (from every worker), with rank 0's checkpoint folder to keep."""

    def mean(self, scalars: dict[str, float]) -> dict[str, float]:
        """The scalars averaged over the workers: the same on every one."""

    def stop_requested(self) -> bool:
        """Whether the run should stop after this step, agreed by every worker."""

    def stream(self, step: int) -> Optional[Iterator]:
        """This worker's input batches from step+1 on where the session streams them (Ray Data), else None."""


def run_pretraining(run: RunRecipe, probe: ProbeConfig, execution: ExecutionConfig, data: Dataset, out_dir: Path,
                    session: Session) -> dict[str, Any]:
    """Pretrain from the session's latest checkpoint to run.train.steps and evaluate; the last metrics
    reported, or {'step', 'error'} (a NaN loss) or {'step', 'stopped'} (the session asked to stop)."""
    cfg, dataset, out_dir = run.train, run.dataset, Path(out_dir)
    rank, world, device = session.rank, session.world, session.device
    start_training(cfg)
    torch.manual_seed(cfg.seed)
    model = MetaMAE(data.spec, run.model, run.objective)
    state = restore(session.saved(), model, run)
    if state["step"] >= cfg.steps and state["metrics"] is not None:
        # A finished run started again (a resumed sweep reruns a trial whose last reports it had not
        # recorded): its final metrics, the validation score among them, go out again instead of nothing.
        session.report(state["metrics"], None)
        return state["metrics"]
    if cfg.compile:
        compile_loss(model)
    step_model = session.prepare(model)
    optimizer = make_optimizer(model, cfg)
    if state["optimizer"] is not None:
        restore_optimizer(optimizer, state["optimizer"])
    step, best = state["step"], state["best_probe"]
    if rank == 0:                                             # the rank that probes
        best = best_probe_so_far(out_dir, run, best)
    resumed_from = step

    writer = SummaryWriter(str(out_dir / "tensorboard")) if rank == 0 else None
    batches = session.stream(step) or inputs_from_step(data, run, rank, world, step)
    local_batch = dataset.batch_size // world
    timer, metrics, health = Throughput(), {"step": step}, Health()
    checkpoint = lambda step, metrics: save_to_report(out_dir, model, optimizer, step, run, best, metrics, rank)
    try:
        while step < cfg.steps:
            x = timer.wait_for(batches)
            step += 1
            torch.manual_seed(seed_for(cfg.seed, rank, step))               # dropout: a function of the step
            masking, support = step_noise(run, model.tokenizer.num_tokens, step, rank, world, device)
            try:
                with autocast(execution, device):
                    scalars = train_step(step_model, optimizer, to_device(x, device), step, masking, support,
                                         mean=session.mean)
            except NonFiniteLoss as error:                        # every worker stops at this step
                return {"step": step, "error": str(error)}
            timer.done(local_batch * world)
            health.step(scalars)

            last = step == cfg.steps
            if not last and session.stop_requested():
                metrics = {"step": step, **scalars, **timer.read(), "resumed_from_step": resumed_from}
                with checkpoint(step, metrics) as folder:
                    session.report(metrics, folder)
                return {"step": step, "stopped": True}
            probe_now = last or (execution.probe_every and step % execution.probe_every == 0)
            checkpoint_now = last or step % cfg.checkpoint_every == 0
            if not (last or probe_now or checkpoint_now or step % cfg.log_every == 0):
                continue
            metrics = {"step": step}                 # step and probe first: Tune's table shows the first four
            if probe_now and rank == 0:
                online = online_probe(model, data, dataset, execution.probe_examples)
                metrics["probe"] = online.score
                health.probed(online.feature_spread)
                if best is None or metrics["probe"] > best:
                    best = metrics["probe"]
                    save_checkpoint(out_dir / BEST / FILENAME, model, optimizer, step, run.to_dict(),
                                    best_probe=best)
            metrics.update({**scalars, **timer.read(), "resumed_from_step": resumed_from, **health.read()})
            if rank == 0:
                for line in health.new_warnings(step):
                    print(f"health: {line}", flush=True)
            if last and rank == 0:
                metrics.update(final_evaluation(model, data, probe, out_dir, step, metrics, run))
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(f"pretrain/{name}", value, step)
                writer.flush()
            with checkpoint(step, metrics) if checkpoint_now else contextlib.nullcontext() as folder:
                session.report(metrics, folder)
    finally:
        if writer is not None:
            writer.close()
    return metrics


@contextlib.contextmanager
def save_to_report(out_dir: Path, model: MetaMAE, optimizer, step: int, run: RunRecipe, best: Optional[float],
                   metrics: dict[str, Any], rank: int) -> Iterator[Optional[Path]]:
    """Rank 0: a folder holding this step's checkpoint (with the metrics reported with it), for the
    session to keep while the block runs; other ranks: None."""
    if rank != 0:
        yield None
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{CHECKPOINT_PREFIX}{step:08d}-",
                                     ignore_cleanup_errors=True) as folder:
        save_checkpoint(Path(folder) / FILENAME, model, optimizer, step, run.to_dict(), best_probe=best,
                        metrics=metrics)
        yield Path(folder)


def final_evaluation(model: MetaMAE, data, probe: ProbeConfig, out_dir: Path, step: int,
                     metrics: dict[str, float], run: RunRecipe) -> dict[str, float]:
    """The linear evaluation at the last step: `validation` is its score on the validation split (what a
    sweep chooses on), `test` and `fit` its scores on the test split and on the examples it was fitted to.
    Writes results.json (every score with its split) and the test predictions."""
    result = linear_probe(model, data, run.dataset, probe)
    result.test_predictions.save(out_dir / PREDICTIONS)
    scores = {"validation": result.validation, "test": result.test, "fit": result.train}
    (out_dir / RESULTS).write_text(json.dumps({"step": step, **metrics, **scores, "probe_result": result.summary()},
                                              indent=2))
    return scores


def restore(saved: Iterator[tuple[str, ContextManager[Path]]], model: MetaMAE, run: RunRecipe) -> dict[str, Any]:
    """Load the newest checkpoint that can be read into `model`, saying which where a newer one cannot;
    the step, best probe, optimizer state and metrics it holds (step 0 where there is none)."""
    unreadable = []
    for name, folder in saved:
        try:
            with folder as local:
                checkpoint = load_checkpoint(Path(local) / FILENAME)
        except (ValueError, FileNotFoundError) as error:
            print(f"cannot resume from {name}: {error}", flush=True)
            unreadable.append(name)
            continue
        check_same_run(checkpoint["config"], run, f"the checkpoint at {name}")
        model.load_state_dict(checkpoint["model"])
        if unreadable:
            print("resuming from the newest intact checkpoint instead", flush=True)
        print(f"resuming from {name} at step {checkpoint['step']}", flush=True)
        return {"step": checkpoint["step"], "best_probe": checkpoint.get("best_probe"),
                "optimizer": checkpoint["optimizer"], "metrics": checkpoint.get("metrics")}
    if unreadable:
        raise UnreadableCheckpoints(
            f"no checkpoint of this run can be read ({', '.join(os.path.basename(name) for name in unreadable)} in "
            f"{os.path.dirname(unreadable[0])}; the log says why for each): move the run folder aside to start "
            f"again, or choose another out_dir")
    return {"step": 0, "best_probe": None, "optimizer": None, "metrics": None}


class UnreadableCheckpoints(RuntimeError):
    """Every checkpoint of a run to be resumed is truncated or corrupt."""


def best_probe_so_far(out_dir: Path, run: RunRecipe, restored: Optional[float]) -> Optional[float]:
    """The online probe a new best must beat: the restored checkpoint's best, or the run folder's
    best/ copy's where a probe after that checkpoint improved it before a failure. A best/ of another
    dataset, model or objective, or one that cannot be read, does not count: this run's first
    probe replaces it."""
    path = out_dir / BEST / FILENAME
    if not path.is_file():
        return restored
    try:
        saved = load_checkpoint(path)
        check_same_run(saved["config"], run, str(path))
    except (ValueError, KeyError):
        return restored
    values = [v for v in (restored, saved.get("best_probe")) if v is not None]
    return max(values) if values else None


def inputs_from_step(data: Dataset, run: RunRecipe, rank: int, world: int, step: int) -> Iterator:
    """This worker's input batches for steps step+1, step+2, ...: its rows of each global batch.

    In-memory datasets: their rows of `batches_from_step`, exactly the batches of an uninterrupted
    run. Shards (one worker; several stream through Ray Data, TrainSession.stream): the local
    reader's batches, reshuffled from the step on resume.
    """
    split, batch_size, seed = run.dataset.pretrain_split, run.dataset.batch_size, run.train.seed
    if isinstance(data, ArrayDataset):
        local = batch_size // world
        rows = slice(rank * local, (rank + 1) * local)
        return (to_tensors(batch.x) for batch in batches_from_step(data.split(split), batch_size, seed, step, rows))
    return (x for x, _ in endless_batches(data, split, batch_size, seed=seed + step))


def step_noise(run: RunRecipe, num_tokens: int, step: int, rank: int, world: int, device):
    """Step s's masking and support draws for the global batch (seeded with (seed, s)); this worker's rows."""
    generator = torch.Generator().manual_seed(seed_for(run.train.seed, step))
    B, local = run.dataset.batch_size, run.dataset.batch_size // world
    masking = torch.rand(B, num_tokens, generator=generator)[rank * local:(rank + 1) * local]
    support = torch.rand(B, num_tokens, generator=generator)[rank * local:(rank + 1) * local]
    return masking.to(device), support.to(device)


def seed_for(*parts: int) -> int:
    """A seed that is a function of the parts (seed, rank, step), the same in every process."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def autocast(execution: ExecutionConfig, device: torch.device):
    """bfloat16 autocast on GPUs that support it (execution.bf16); nothing otherwise."""
    if execution.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Throughput:
    """Samples/s and the fraction of wall time spent waiting for data, since the last read."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.waited, self.samples = time.perf_counter(), 0.0, 0

    def wait_for(self, batches: Iterator):
        t = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - t
        return batch

    def done(self, samples: int) -> None:
        self.samples += samples

    def read(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        metrics = {"samples_per_s": self.samples / elapsed, "data_wait": self.waited / elapsed}
        self.reset()
        return metrics


# --------------------------------------------------------------------------------------------
# One process: the plain command and a one-worker sweep trial
# --------------------------------------------------------------------------------------------

class LocalSession:
    """A run in this process: checkpoints in its run folder (RUN/checkpoint_<step>/, the `keep` newest,
    each complete before an older one is removed), reports to `on_report` with the checkpoint's path,
    and a stop when `stop` says so (a signal handler's flag)."""
    rank, world = 0, 1

    def __init__(self, out_dir: Path, keep: int, device: str, on_report: Callable[[dict[str, Any]], None],
                 stop: Callable[[], bool] = lambda: False):
        self.out_dir, self.keep, self.device = Path(out_dir), keep, torch.device(device)
        self.on_report, self.stop_requested = on_report, stop

    def prepare(self, model: MetaMAE) -> torch.nn.Module:
        return model.to(self.device)

    def folders(self) -> list[Path]:
        """The run's checkpoint folders, newest first."""
        return sorted((path for path in self.out_dir.glob(f"{CHECKPOINT_PREFIX}*") if path.is_dir()),
                      key=lambda path: path.name, reverse=True)

    def saved(self) -> Iterator[tuple[str, ContextManager[Path]]]:
        return ((str(path), contextlib.nullcontext(path)) for path in self.folders())

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        if checkpoint is not None:
            kept = self.out_dir / f"{CHECKPOINT_PREFIX}{metrics['step']:08d}"
            if kept.exists():                               # a step saved again after a resume
                shutil.rmtree(kept)
            os.replace(checkpoint, kept)
            for older in self.folders()[self.keep:]:
                shutil.rmtree(older)
            metrics = {**metrics, CHECKPOINT_PATH: str(kept)}
        self.on_report(metrics)

    def mean(self, scalars: dict[str, float]) -> dict[str, float]:
        return scalars

    def stream(self, step: int) -> None:
        return None


def pretrain(run: RunRecipe, probe: ProbeConfig, execution: ExecutionConfig, data: Dataset, out_dir: Path,
             on_report: Optional[Callable[[dict[str, Any]], None]] = None,
             stop: Optional[StopSignals] = None) -> dict[str, Any]:
    """Pretrain in this process into `out_dir` (resuming from its newest checkpoint) and evaluate; the
    final metrics. Each report goes to `on_report` (default: a printed line). Raises NonFiniteLoss for
    a NaN loss, and Interrupted where a signal of `stop` stopped it, each naming the checkpoint kept."""
    device = "cuda" if execution.use_gpu else run.train.device
    session = LocalSession(out_dir, execution.keep_checkpoints, device, on_report or progress_line(run),
                           stop.requested if stop else lambda: False)
    ended = run_pretraining(run, probe, execution, data, out_dir, session)
    raise_if_ended_early(ended, str(next(iter(session.folders()), "none was saved")), stop)
    return ended


def progress_line(run: RunRecipe) -> Callable[[dict[str, Any]], None]:
    """Print a report as one line: `[method] step s/S name=value ...`."""
    def show(metrics: dict[str, Any]) -> None:
        values = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step" and isinstance(v, float))
        print(f"[{run.objective.method}] step {metrics['step']}/{run.train.steps} {values}", flush=True)
    return show


def raise_if_ended_early(ended: dict[str, Any], kept: str, stop: Optional[StopSignals]) -> None:
    """What a run's last return means, in any mode: NonFiniteLoss for a NaN loss, Interrupted for a
    stop that `stop`'s signal asked for; each names the checkpoint `kept`."""
    if "error" in ended:
        raise NonFiniteLoss(f"{ended['error']}: {kept}")
    if "stopped" in ended:
        raise stop.interrupted(ended["step"], kept)
