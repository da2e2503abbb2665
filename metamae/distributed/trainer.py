"""Ray Train around the run's loop: one command for one CPU, one GPU, or many GPUs on many nodes.

    driver   fit(run, ...)          check the request against the cluster, then TorchTrainer.fit()
    workers  worker_loop(config)    metamae/loop.py's run_pretraining, in a TrainSession: each
                                    worker its slice of the global batch, DDP, reports and
                                    checkpoints through Ray Train; rank 0 probes, writes TensorBoard
                                    events and runs the final linear evaluation

The global batch is `dataset.batch_size` whatever the number of workers: each worker takes
batch_size / num_workers examples, and the terms that mix examples are computed over the global
batch (model.BatchGroup), so N workers follow one worker's run, and one worker the plain loop's.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from metamae.config import ExecutionConfig, ProbeConfig
from metamae.data import load_dataset
from metamae.data.arrays import epochs
from metamae.distributed.collectives import ProcessGroupBatch
from metamae.distributed.stream import (LIST_FILES_CPUS, StreamConfig, read_split, reserved_data_bundle,
                                        streams_through_ray_data, torch_batches)
from metamae.loop import CHECKPOINT_PREFIX, raise_if_ended_early, run_pretraining
from metamae.model import MetaMAE
from metamae.private_apis import resources_per_worker
from metamae.train import RunRecipe, StopSignals

PRETRAIN = "pretrain"                  # the Ray Data dataset name the workers read


class ResourceRequestError(RuntimeError):
    """The trainer asks for more than the cluster has; raised before anything waits for it."""


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def fit(run: RunRecipe, probe: ProbeConfig, execution: ExecutionConfig, out_dir: Path,
        callbacks: Sequence[Any] = (), stop_on_sigterm: bool = False) -> ray.train.Result:
    """Pretrain with Ray Train into `out_dir`, evaluate, and return the Train result.

    The same out_dir resumes from its latest checkpoint. `callbacks` are Ray Train run callbacks
    (a Tune trial passes one that hands the reports to Tune, tune_reports.py). With
    `stop_on_sigterm` (a command's main thread), SIGTERM stops the workers after their current step
    with a checkpoint of it, and fit raises Interrupted naming it.
    """
    out_dir = Path(out_dir).resolve()
    if run.dataset.batch_size % execution.num_workers:
        raise ValueError(f"dataset.batch_size {run.dataset.batch_size} does not split evenly over "
                         f"execution.num_workers={execution.num_workers}")
    scaling = ScalingConfig(num_workers=execution.num_workers, use_gpu=execution.use_gpu,
                            resources_per_worker={"CPU": execution.cpus_per_worker,
                                                  **({"GPU": 1} if execution.use_gpu else {})})
    # One worker reads its shards itself (worker_batches); several stream them through Ray Data: in a
    # sweep trial inside the CPU the trial reserved for it (stream.py), elsewhere on a CPU left free.
    streams = streams_through_ray_data(run.dataset.source, execution.num_workers)
    within = reserved_data_bundle() if streams else None
    if execution.check_resources:
        check_request_fits(scaling, data_cpus=LIST_FILES_CPUS if streams and within is None else 0.0)
    datasets = None
    if streams:
        datasets = {PRETRAIN: read_split(Path(run.dataset.path), run.dataset.pretrain_split,
                                         StreamConfig(batch_size=run.dataset.batch_size,
                                                      progress_bars=execution.progress_bars),
                                         seed=run.train.seed, within=within)}
    storage = execution.storage or str(out_dir.parent)
    stop = StopRequest.remote() if stop_on_sigterm else None
    signals = StopSignals((signal.SIGTERM,), then=lambda: stop.request.remote()) if stop else contextlib.nullcontext()
    with signals:
        result = TorchTrainer(
            worker_loop,
            train_loop_config={"run": run, "probe": probe, "execution": execution, "out_dir": str(out_dir),
                               "stop": stop},
            scaling_config=scaling,
            datasets=datasets,
            run_config=ray.train.RunConfig(
                name=out_dir.name, storage_path=storage, callbacks=list(callbacks),
                failure_config=FailureConfig(max_failures=execution.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=execution.keep_checkpoints,
                                                   checkpoint_score_attribute="step", checkpoint_score_order="max")),
        ).fit()
    raise_if_ended_early(result.return_value or {}, result.checkpoint.path if result.checkpoint else "none was saved",
                         signals if stop else None)
    return result


@ray.remote(num_cpus=0)
class StopRequest:
    """Set by the driver when it receives SIGTERM; the workers ask it between steps (TrainSession)."""

    def __init__(self):
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def is_requested(self) -> bool:
        return self.requested


def check_request_fits(scaling: ScalingConfig, data_cpus: float = 0.0) -> None:
    """Fail now, not hang forever (ray-project/ray#47439), when the cluster's nodes cannot hold the
    workers and, with `data_cpus`, leave a node that many CPUs for a Ray Data pipeline that runs on
    free CPUs (its ListFiles task asks for a whole CPU). The caller's own reservation counts as
    taken: a Tune trial's placement group (its driver's and its pipeline's bundles), or the
    process's own resources outside one."""
    per_worker = resources_per_worker(scaling)
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
            f"Lower execution.cpus_per_worker or execution.num_workers, or add nodes")
    if capacity < scaling.num_workers:
        raise ResourceRequestError(
            f"the trainer asks for {scaling.num_workers} workers of {per_worker}, and the cluster's nodes "
            f"hold {capacity} ({nodes}, less what this process holds: {own}). Lower execution.num_workers or "
            f"execution.cpus_per_worker, set execution.use_gpu=false, add nodes, or on an autoscaling cluster "
            f"set execution.check_resources=false")


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
    """One Ray Train worker: the run's loop (metamae/loop.py) on its slice of every global batch.

    Returns the last metrics it reported, {'error': ...} for a NaN loss, or {'stopped': ...} when the
    driver asked it to stop (rank 0's reaches the driver).
    """
    run = config["run"]
    data, _ = load_dataset(run.dataset, seed=run.train.seed)
    session = TrainSession(run, config["stop"])
    return run_pretraining(run, config["probe"], config["execution"], data, Path(config["out_dir"]), session)


class TrainSession:
    """A Ray Train worker's place in the run (loop.Session): DDP over the workers, its rows of every
    global batch (several workers on shards: its Ray Data stream), reports and checkpoints through
    Ray Train, and the driver's stop request (StopRequest), asked at most every `every_s` seconds and
    agreed at each step (any worker that has seen it stops them all)."""

    def __init__(self, run: RunRecipe, stop: Optional[ray.actor.ActorHandle], every_s: float = 0.5):
        context = ray.train.get_context()
        self.run, self.stop, self.every_s = run, stop, every_s
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.seen, self.asked = False, 0.0

    def prepare(self, model: MetaMAE) -> torch.nn.Module:
        if self.world > 1:
            model.split_batch_over(ProcessGroupBatch())
        return ray.train.torch.prepare_model(model)             # DDP over the workers; on this device

    def saved(self) -> Iterator[tuple[str, Any]]:
        latest = ray.train.get_checkpoint()
        if latest is not None:
            yield from ((checkpoint.path, checkpoint.as_directory()) for checkpoint in newest_first(latest))

    def report(self, metrics: dict[str, Any], checkpoint: Optional[Path]) -> None:
        """ray.train.report from every worker (it is a barrier); rank 0 attaches the checkpoint."""
        if checkpoint is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint)),
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{metrics['step']:08d}")

    def mean(self, scalars: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return scalars
        values = torch.tensor(list(scalars.values()), dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return dict(zip(scalars, (values / self.world).tolist()))

    def stop_requested(self) -> bool:
        if self.stop is None:
            return False
        if not self.seen and time.monotonic() - self.asked >= self.every_s:
            self.seen, self.asked = ray.get(self.stop.is_requested.remote()), time.monotonic()
        if self.world == 1:
            return self.seen
        flag = torch.tensor([float(self.seen)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def stream(self, step: int) -> Optional[Iterator]:
        if not streams_through_ray_data(self.run.dataset.source, self.world):
            return None
        local = self.run.dataset.batch_size // self.world
        shard = ray.train.get_dataset_shard(PRETRAIN)
        return epochs(lambda seed: (x for x, _ in torch_batches(shard, StreamConfig(batch_size=local), seed=seed,
                                                                drop_last=True)),
                      self.run.train.seed + step, f"worker {self.rank}'s part of the "
                      f"{self.run.dataset.pretrain_split!r} split has fewer examples than one batch of {local}: "
                      f"lower dataset.batch_size")


def newest_first(latest: Checkpoint) -> Iterator[Checkpoint]:
    """Ray Train's latest checkpoint, then the older ones in its folder (checkpoint_<step>), newest
    first: local or in a bucket, through the checkpoint's own filesystem."""
    yield latest
    parent, name = os.path.split(latest.path.rstrip("/"))
    listed = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((info.path for info in listed if info.type == pyarrow.fs.FileType.Directory
                    and os.path.basename(info.path).startswith(CHECKPOINT_PREFIX)
                    and os.path.basename(info.path) < name), reverse=True)
    for path in older:
        yield Checkpoint(path, filesystem=latest.filesystem)


def connect_ray() -> None:
    """Join the cluster RAY_ADDRESS names (`ray job submit` sets it), or start a local Ray and say how to
    inspect it: a local Ray asks its clients for the token it wrote to ~/.ray/auth_token (Ray 2.60), which
    `ray status` sends only with RAY_AUTH_MODE=token (without it: InvalidAuthToken)."""
    context = ray.init()
    if os.environ.get("RAY_ADDRESS"):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "token")
    print(f"local Ray at {context.address_info['gcs_address']}: dashboard http://{context.dashboard_url}; from "
          f"another shell: RAY_AUTH_MODE={mode} ray status --address {context.address_info['gcs_address']}",
          flush=True)
