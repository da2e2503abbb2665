"""Ray Train around the library's step: one command for one CPU, one GPU, or many GPUs on many nodes.

    driver   fit(run, ...)          check the request against the cluster, then TorchTrainer.fit()
    workers  worker_loop(config)    each its slice of the global batch, DDP, the step, reports,
                                    checkpoints, the online probe; rank 0 writes TensorBoard events
                                    and runs the final linear evaluation

The global batch is `dataset.batch_size` whatever the number of workers: each worker takes
batch_size / num_workers examples, and the terms that mix examples are computed over the global
batch (model.BatchGroup), so N workers follow one worker's run. The masking and support draws of
step s come from a generator seeded with (seed, s) and are cut into the workers' slices, and the
in-memory datasets' batches are a function of the step: a run resumed from a checkpoint, or run on
another number of workers, sees the same batches and the same draws.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from tensorboardX import SummaryWriter

from metamae.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from metamae.config import ProbeConfig, TrainerConfig
from metamae.data import load_dataset
from metamae.data.arrays import ArrayDataset, batches_from_step, epochs, to_tensors
from metamae.distributed.collectives import ProcessGroupBatch
from metamae.distributed.stream import (LIST_FILES_CPUS, StreamConfig, read_split, reserved_data_bundle,
                                        streams_through_ray_data, torch_batches)
from metamae.health import Health
from metamae.linear_eval import PREDICTIONS, linear_probe, online_probe
from metamae.model import Losses, MetaMAE
from metamae.modality import to_device
from metamae.train import (Interrupted, NonFiniteLoss, RunConfig, check_finite, check_same_run, compile_loss,
                           configure_process, make_optimizer, pretrain_inputs, restore_optimizer)

PRETRAIN = "pretrain"                  # the Ray Data dataset name the workers read
BEST = "best"                          # the run folder's copy of the best checkpoint by the online probe
RESULTS = "results.json"


class ResourceRequestError(RuntimeError):
    """The trainer asks for more than the cluster has; raised before anything waits for it."""


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def fit(run: RunConfig, probe: ProbeConfig, trainer: TrainerConfig, out_dir: Path,
        callbacks: Sequence[Any] = (), stop_on_sigterm: bool = False) -> ray.train.Result:
    """Pretrain with Ray Train into `out_dir`, evaluate, and return the Train result.

    The same out_dir resumes from its latest checkpoint. `callbacks` are Ray Train run callbacks
    (a Tune trial passes one that hands the reports to Tune, tune_reports.py). With
    `stop_on_sigterm` (a command's main thread), SIGTERM stops the workers after their current step
    with a checkpoint of it, and fit raises Interrupted naming it.
    """
    out_dir = Path(out_dir).resolve()
    if run.dataset.batch_size % trainer.num_workers:
        raise ValueError(f"dataset.batch_size {run.dataset.batch_size} does not split evenly over "
                         f"trainer.num_workers={trainer.num_workers}")
    scaling = ScalingConfig(num_workers=trainer.num_workers, use_gpu=trainer.use_gpu,
                            resources_per_worker={"CPU": trainer.cpus_per_worker,
                                                  **({"GPU": 1} if trainer.use_gpu else {})})
    # One worker reads its shards itself (worker_batches); several stream them through Ray Data: in a
    # sweep trial inside the CPU the trial reserved for it (stream.py), elsewhere on a CPU left free.
    streams = streams_through_ray_data(run.dataset.source, trainer.num_workers)
    within = reserved_data_bundle() if streams else None
    if trainer.check_resources:
        check_request_fits(scaling, data_cpus=LIST_FILES_CPUS if streams and within is None else 0.0)
    datasets = None
    if streams:
        datasets = {PRETRAIN: read_split(Path(run.dataset.path), run.dataset.pretrain_split,
                                         StreamConfig(batch_size=run.dataset.batch_size,
                                                      progress_bars=trainer.progress_bars),
                                         seed=run.train.seed, within=within)}
    storage = trainer.storage or str(out_dir.parent)
    stop = StopRequest.remote() if stop_on_sigterm else None
    with sigterm_requests(stop):
        result = TorchTrainer(
            worker_loop,
            train_loop_config={"run": run, "probe": probe, "trainer": trainer, "out_dir": str(out_dir), "stop": stop},
            scaling_config=scaling,
            datasets=datasets,
            run_config=ray.train.RunConfig(
                name=out_dir.name, storage_path=storage, callbacks=list(callbacks),
                failure_config=FailureConfig(max_failures=trainer.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=trainer.keep_checkpoints,
                                                   checkpoint_score_attribute="step", checkpoint_score_order="max")),
        ).fit()
    ended = result.return_value or {}
    kept = result.checkpoint.path if result.checkpoint else "none was saved"
    if "error" in ended:
        raise NonFiniteLoss(f"{ended['error']}: {kept}")
    if "stopped" in ended:
        raise Interrupted(f"stopped by SIGTERM after step {ended['step']}: its checkpoint is {kept}", signal.SIGTERM)
    return result


@ray.remote(num_cpus=0)
class StopRequest:
    """Set by the driver when it receives SIGTERM; the workers ask it between steps (StopPoll)."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def is_requested(self) -> bool:
        return self.requested


@contextlib.contextmanager
def sigterm_requests(stop: Optional[ray.actor.ActorHandle]) -> Iterator[None]:
    """While the block runs, SIGTERM sets `stop` (once; a second SIGTERM ends the process at once);
    nothing changes without a `stop`."""
    if stop is None:
        yield
        return

    def request(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("SIGTERM: stopping after the current step, with a checkpoint of it (SIGTERM again ends at once)",
              file=sys.stderr, flush=True)
        stop.request.remote()

    previous = signal.signal(signal.SIGTERM, request)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_request_fits(scaling: ScalingConfig, data_cpus: float = 0.0) -> None:
    """Fail now, not hang forever (ray-project/ray#47439), when the cluster's nodes cannot hold the
    workers and, with `data_cpus`, leave a node that many CPUs for a Ray Data pipeline that runs on
    free CPUs (its ListFiles task asks for a whole CPU). The caller's own reservation counts as
    taken: a Tune trial's placement group (its driver's and its pipeline's bundles), or the
    process's own resources outside one."""
    per_worker = {k: v for k, v in scaling._resources_per_worker_not_none.items() if v > 0}
    own = held_by_this_process()
    capacity, nodes, left = 0, [], []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        held = own.get(node["NodeID"], {})
        free = {k: v - held.get(k, 0.0) for k, v in node["Resources"].items()}
        nodes.append({k: free.get(k, 0) for k in per_worker})
        fits = min(int(free.get(k, 0.0) / v + 1e-9) for k, v in per_worker.items())
        capacity += fits
        # the CPUs the node keeps once it holds as many of the workers as fit, first node first (Train packs them)
        placed = min(fits, max(0, scaling.num_workers - (capacity - fits)))
        left.append(free.get("CPU", 0.0) - placed * per_worker.get("CPU", 0.0))
    if capacity >= scaling.num_workers and data_cpus and max(left, default=0.0) < data_cpus - 1e-9:
        raise ResourceRequestError(
            f"the trainer's {scaling.num_workers} workers of {per_worker} leave no node {data_cpus:g} free CPU for "
            f"the Ray Data pipeline that streams their shards (Ray Data's ListFiles task asks for a whole CPU; "
            f"CPUs left per node: {[round(cpus, 4) for cpus in left]}, less what this process holds: {own}). "
            f"Lower trainer.cpus_per_worker or trainer.num_workers, or add nodes")
    if capacity < scaling.num_workers:
        raise ResourceRequestError(
            f"the trainer asks for {scaling.num_workers} workers of {per_worker}, and the cluster's nodes "
            f"hold {capacity} ({nodes}, less what this process holds: {own}). Lower trainer.num_workers or "
            f"trainer.cpus_per_worker, set trainer.use_gpu=false, add nodes, or on an autoscaling cluster "
            f"set trainer.check_resources=false")


def held_by_this_process() -> dict[str, dict[str, float]]:
    """Per node id, what this process holds: the bundles of the placement group it runs in (a Tune
    trial's), else its own resources (an actor's or a task's); nothing for a driver."""
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:
        return {}
    group = ray.util.get_current_placement_group()
    if group is None:
        return {context.get_node_id(): dict(context.get_assigned_resources())}
    held: dict[str, dict[str, float]] = {}
    for index, node in ray.util.placement_group_table(group)["bundles_to_node_id"].items():
        for kind, amount in group.bundle_specs[int(index)].items():
            held.setdefault(node, {})[kind] = held.get(node, {}).get(kind, 0.0) + amount
    return held


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------

def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One Ray Train worker: pretrain its slice of every global batch, report, checkpoint, evaluate.

    Returns the last metrics it reported, {'error': ...} for a NaN loss, or {'stopped': ...} when the
    driver asked it to stop (rank 0's reaches the driver).
    """
    run, probe, trainer = config["run"], config["probe"], config["trainer"]
    out_dir, cfg = Path(config["out_dir"]), run.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    configure_process(cfg)
    device = ray.train.torch.get_device()
    data, dataset = load_dataset(run.dataset, seed=cfg.seed)

    torch.manual_seed(cfg.seed)
    model = MetaMAE(data.spec, run.model, run.objective)
    if world > 1:
        model.split_batch_over(ProcessGroupBatch())
    state = restore(ray.train.get_checkpoint(), model, run)
    if state["step"] >= cfg.steps and state["metrics"] is not None:
        # A finished run started again: a resumed sweep reruns a trial whose last reports it had not
        # recorded. Its final metrics (the objective) go out again instead of nothing.
        ray.train.report(state["metrics"])
        return state["metrics"]
    if cfg.compile:
        compile_loss(model)
    ddp = ray.train.torch.prepare_model(model)               # DDP over the workers; on this device
    optimizer = make_optimizer(model, cfg)
    if state["optimizer"] is not None:
        restore_optimizer(optimizer, state["optimizer"])
    step, best = state["step"], state["best_probe"]
    if rank == 0:                                             # the rank that probes
        best = best_probe_so_far(out_dir, run, best)
    resumed_from = step

    writer = SummaryWriter(str(out_dir / "tensorboard")) if rank == 0 else None
    batches = worker_batches(data, run, rank, world, step)
    local_batch = run.dataset.batch_size // world
    timer, metrics, health = Throughput(), {"step": step}, Health()
    stop = StopPoll(config["stop"], world, device)
    try:
        while step < cfg.steps:
            x = timer.wait_for(batches)
            step += 1
            torch.manual_seed(seed_for(cfg.seed, rank, step))               # dropout: a function of the step
            masking, support = step_noise(run, model.tokenizer.num_tokens, step, rank, world, device)
            with autocast(trainer, device):
                losses = ddp(to_device(x, device), masking_noise=masking, support_noise=support)
            scalars = mean_over_workers(losses, world, device)
            try:
                check_finite(scalars, step, x)
            except NonFiniteLoss as error:                        # every worker stops at this step
                return {"step": step, "error": str(error)}
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()
            timer.done(local_batch * world)
            health.step(scalars)

            last = step == cfg.steps
            if not last and stop.requested():                     # SIGTERM: every worker stops here
                metrics = {"step": step, "resumed_from_step": resumed_from, **scalars, **timer.read()}
                report(metrics, model, optimizer, step, run, best, rank, with_checkpoint=True)
                return {"step": step, "stopped": "SIGTERM"}
            probe_now = last or (trainer.probe_every and step % trainer.probe_every == 0)
            checkpoint_now = last or step % cfg.checkpoint_every == 0
            if not (last or probe_now or checkpoint_now or step % cfg.log_every == 0):
                continue
            metrics = {"step": step}                 # step and probe first: Tune's table shows the first four
            if probe_now and rank == 0:
                online = online_probe(model, data, dataset, trainer.probe_examples)
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
                metrics.update(final_evaluation(model, data, dataset, probe, out_dir, step, metrics))
            if writer is not None:
                for name, value in metrics.items():
                    writer.add_scalar(f"pretrain/{name}", value, step)
                writer.flush()
            report(metrics, model, optimizer, step, run, best, rank, checkpoint_now)
    finally:
        if writer is not None:
            writer.close()
    return metrics


def final_evaluation(model: MetaMAE, data, dataset, probe: ProbeConfig, out_dir: Path, step: int,
                     metrics: dict[str, float]) -> dict[str, float]:
    """The linear evaluation at the last step: `objective` is its validation score (what a sweep
    chooses on), `test` and `fit` its scores on the test split and on the examples it was fitted to.
    Writes results.json (every score with its split) and the test predictions."""
    result = linear_probe(model, data, dataset, probe)
    result.test_predictions.save(out_dir / PREDICTIONS)
    scores = {"objective": result.validation, "test": result.test, "fit": result.train}
    (out_dir / RESULTS).write_text(json.dumps({"step": step, **metrics, **scores, "probe_result": result.summary()},
                                              indent=2))
    return scores


def report(metrics: dict[str, float], model: MetaMAE, optimizer, step: int, run: RunConfig,
           best: Optional[float], rank: int, with_checkpoint: bool) -> None:
    """ray.train.report from every worker (it is a barrier); rank 0 attaches the checkpoint, which
    keeps the metrics reported with it."""
    if not (with_checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(Path(folder) / FILENAME, model, optimizer, step, run.to_dict(), best_probe=best,
                        metrics=metrics)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def restore(checkpoint: Optional[Checkpoint], model: MetaMAE, run: RunConfig) -> dict[str, Any]:
    """Load Ray Train's latest checkpoint (after a failure, or a re-run of the same run folder), or,
    where it cannot be read, the newest one beside it that can, saying which."""
    if checkpoint is None:
        return {"step": 0, "best_probe": None, "optimizer": None, "metrics": None}
    unreadable = []
    for candidate in newest_first(checkpoint):
        try:
            with candidate.as_directory() as folder:
                saved = load_checkpoint(Path(folder) / FILENAME)
        except (ValueError, FileNotFoundError) as error:
            print(f"cannot resume from {candidate.path}: {error}", flush=True)
            unreadable.append(os.path.basename(candidate.path))
            continue
        check_same_run(saved["config"], run, f"the checkpoint at {candidate.path}")
        model.load_state_dict(saved["model"])
        if unreadable:
            print("resuming from the newest intact checkpoint instead", flush=True)
        print(f"resuming from {candidate.path} at step {saved['step']}", flush=True)
        return {"step": saved["step"], "best_probe": saved.get("best_probe"), "optimizer": saved["optimizer"],
                "metrics": saved.get("metrics")}
    raise UnreadableCheckpoints(
        f"no checkpoint of this run can be read ({', '.join(unreadable)} in {os.path.dirname(checkpoint.path)}; "
        f"the worker's log says why for each): move the run folder aside to start again, or choose another out_dir")


class UnreadableCheckpoints(RuntimeError):
    """Every checkpoint of a run to be resumed is truncated or corrupt."""


def newest_first(latest: Checkpoint) -> Iterator[Checkpoint]:
    """Ray Train's latest checkpoint, then the older ones in its folder (checkpoint_<step>, see report),
    newest first: local or in a bucket, through the checkpoint's own filesystem."""
    yield latest
    parent, name = os.path.split(latest.path.rstrip("/"))
    listed = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((info.path for info in listed if info.type == pyarrow.fs.FileType.Directory
                    and os.path.basename(info.path).startswith("checkpoint_")
                    and os.path.basename(info.path) < name), reverse=True)
    for path in older:
        yield Checkpoint(path, filesystem=latest.filesystem)


def best_probe_so_far(out_dir: Path, run: RunConfig, restored: Optional[float]) -> Optional[float]:
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


def worker_batches(data, run: RunConfig, rank: int, world: int, step: int) -> Iterator[object]:
    """This worker's inputs for steps step+1, step+2, ...: its rows of each global batch.

    In-memory datasets: their rows of `batches_from_step` (the plain loop's batches), exact on resume.
    Shards, one worker: the plain loop's batches too, read in this process with the plain reader
    (`pretrain_inputs`: no Ray Data task, so no CPU asked for beyond this worker's), reshuffled
    from the step on resume. Shards, several workers: this worker's Ray Data stream
    (`get_dataset_shard`, see fit), reshuffled from the step on resume.
    """
    cfg, local = run.train, run.dataset.batch_size // world
    if isinstance(data, ArrayDataset):
        rows = slice(rank * local, (rank + 1) * local)
        for batch in batches_from_step(data.split(run.dataset.pretrain_split), run.dataset.batch_size, cfg.seed,
                                       step, rows):
            yield to_tensors(batch.x)
    if not streams_through_ray_data(run.dataset.source, world):
        yield from pretrain_inputs(data, run, step)
        return
    shard = ray.train.get_dataset_shard(PRETRAIN)
    stream = StreamConfig(batch_size=local)
    yield from epochs(lambda seed: (x for x, _ in torch_batches(shard, stream, seed=seed, drop_last=True)),
                      cfg.seed + step, f"worker {rank}'s part of the {run.dataset.pretrain_split!r} split has "
                      f"fewer examples than one batch of {local}: lower dataset.batch_size")


def step_noise(run: RunConfig, num_tokens: int, step: int, rank: int, world: int, device):
    """Step s's masking and support draws for the global batch (seeded with (seed, s)); this worker's rows."""
    generator = torch.Generator().manual_seed(seed_for(run.train.seed, step))
    B, local = run.dataset.batch_size, run.dataset.batch_size // world
    masking = torch.rand(B, num_tokens, generator=generator)[rank * local:(rank + 1) * local]
    support = torch.rand(B, num_tokens, generator=generator)[rank * local:(rank + 1) * local]
    return masking.to(device), support.to(device)


def seed_for(*parts: int) -> int:
    """A seed that is a function of the parts (seed, rank, step), the same in every process."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def mean_over_workers(losses: Losses, world: int, device) -> dict[str, float]:
    """Every loss term averaged over the workers: the global batch's value, the same on every worker
    (so a NaN on one worker stops them all at the same step)."""
    scalars = losses.scalars()
    if world == 1:
        return scalars
    values = torch.tensor(list(scalars.values()), dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values)
    return dict(zip(scalars, (values / world).tolist()))


class StopPoll:
    """Whether the run's driver asked it to stop (StopRequest; never without one), agreed by every
    worker at the same step: the request is asked for at most every `every_s` seconds, and the
    workers' answers are combined at each step (any one that has seen it stops them all)."""

    def __init__(self, request: Optional[ray.actor.ActorHandle], world: int, device, every_s: float = 0.5):
        self.request, self.world, self.device, self.every_s = request, world, device, every_s
        self.seen, self.asked = False, 0.0

    def requested(self) -> bool:
        if self.request is None:
            return False
        if not self.seen and time.monotonic() - self.asked >= self.every_s:
            self.seen, self.asked = ray.get(self.request.is_requested.remote()), time.monotonic()
        if self.world == 1:
            return self.seen
        flag = torch.tensor([float(self.seen)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


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


def autocast(trainer: TrainerConfig, device: torch.device):
    """bfloat16 autocast on GPUs that support it (trainer.bf16); nothing otherwise."""
    if trainer.bf16 and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_environment() -> None:
    """Ray Train's per-report latency drops from about 2 s to 0.5 s with a faster health check."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def connect_ray() -> None:
    """Join the cluster RAY_ADDRESS names (`ray job submit` sets it), or start a local Ray and say how to
    inspect it: a local Ray asks its clients for the token it wrote to ~/.ray/auth_token (Ray 2.60), which
    `ray status` sends only with RAY_AUTH_MODE=token (without it: InvalidAuthToken)."""
    default_environment()
    context = ray.init()
    if os.environ.get("RAY_ADDRESS"):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    print(f"local Ray at {context.address_info['gcs_address']}: dashboard http://{context.dashboard_url}; from "
          f"another shell: RAY_AUTH_MODE={mode} ray status --address {context.address_info['gcs_address']}",
          flush=True)
