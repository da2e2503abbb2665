"""Data parallelism: the terms that mix examples are global (exactly, in float64, over torch.distributed
processes); Ray Train's N workers follow one worker's run; a killed worker is replaced and training
continues from the last checkpoint; a NaN stops every worker; a request the cluster cannot hold
fails at once."""
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray.util.state import list_actors

from metamae.checkpoint import FILENAME, load_checkpoint, save_checkpoint
from metamae.config import DatasetConfig, ExecutionConfig, ProbeConfig, TrainConfig
from metamae.data.converters.digits import convert
from metamae.data.digits import digits
from metamae.distributed.collectives import ProcessGroupBatch
from metamae.distributed.trainer import ResourceRequestError, fit
from metamae.distributed.tune_reports import ReportQueue
from metamae.loop import BEST, best_probe_so_far, pretrain
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig
from metamae.train import NonFiniteLoss, RunRecipe
from tests.conftest import SPECS, random_batch, tiny_model

SMALL = ModelConfig(enc_width=32, enc_depth=2, enc_heads=4, dec_width=16, dec_depth=1, dec_heads=2, dropout=0.0)
DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, metric="accuracy", batch_size=32, source="digits")
QUICK_PROBE = ProbeConfig(epochs=1)
DIGITS_DATA = digits()


CASES = [(kind, method, first_order) for kind in sorted(SPECS) for method, first_order in
         [("metamae", False), ("metamae", True), ("mae", False)]]


def loss_and_gradients(case, rows: slice, group=None):
    """The loss and parameter gradients of a fixed float64 batch of 8 (the given rows of it) with
    fixed draws."""
    kind, method, first_order = case
    model = tiny_model(kind, method=method, first_order=first_order)
    if group is not None:
        model.split_batch_over(group)
    g = torch.Generator().manual_seed(1)
    x = random_batch(SPECS[kind], 8, g, torch.float64)
    noise = torch.rand(2, 8, model.tokenizer.num_tokens, generator=g, dtype=torch.float64)
    x = tuple(part[rows] for part in x) if isinstance(x, tuple) else x[rows]
    losses = model(x, masking_noise=noise[0, rows], support_noise=noise[1, rows])
    losses.total.backward()
    return losses.total.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def data_parallel_process(rank: int, world: int, port: int, results) -> None:
    """One of `world` gloo processes: its rows of every case, averaged as DDP averages gradients."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    local = 8 // world
    for case in CASES:
        loss, grads = loss_and_gradients(case, slice(rank * local, (rank + 1) * local), ProcessGroupBatch())
        for value in [loss, *grads.values()]:
            dist.all_reduce(value)
            value /= world
        if rank == 0:
            results.put((case, loss.item(), {name: g.numpy() for name, g in grads.items()}))
    dist.destroy_process_group()


def test_two_processes_average_to_the_one_process_loss_and_gradients_in_float64():
    """Global normalisers, all-gathered negatives and BatchNorm statistics over the global batch:
    the same loss and gradients as one process holding all of it, to float64 rounding."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = 29500 + os.getpid() % 1000
    processes = [context.Process(target=data_parallel_process, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    received = [results.get(timeout=300) for _ in CASES]
    for process in processes:
        process.join(timeout=60)
    for case, loss, grads in received:
        one_loss, one_grads = loss_and_gradients(case, slice(0, 8))
        assert loss == pytest.approx(one_loss.item(), abs=1e-12), case
        assert grads.keys() == one_grads.keys(), case
        for name, g in grads.items():
            assert torch.allclose(torch.from_numpy(g), one_grads[name], atol=1e-12), (case, name)


def run_config(steps: int, checkpoint_every: int, lr: float = 1e-3) -> RunRecipe:
    return RunRecipe(DIGITS, SMALL, ObjectiveConfig(), TrainConfig(steps=steps, lr=lr, log_every=steps,
                                                                   checkpoint_every=checkpoint_every))


def execution(workers: int, **overrides) -> ExecutionConfig:
    return ExecutionConfig(num_workers=workers, probe_every=0, probe_examples=64, **overrides)


def test_two_workers_follow_one_worker_with_the_same_global_batch(local_ray, tmp_path):
    """Same batches, same draws, the global terms (exact, test above): only the order of float32 sums
    differs, about 1e-7 relative per operation, so the losses agree to 1e-4. AdamW's first steps move
    each weight by about lr · sign(gradient), so a weight whose gradient is at rounding level (the
    BatchNorm-ed projector has such directions) can move by up to lr per step either way: the weights
    agree to 8 steps × lr = 8e-3 at worst; measured 4.5e-4 at most, 3e-5 outside the projector.
    The plain loop in this process runs the same loop (metamae/loop.py) as one Ray Train worker: the
    same losses to 1e-6 (the processes' thread counts, so their sums' order, differ), the weights as
    above."""
    plain = pretrain(run_config(8, 8), QUICK_PROBE, execution(1), DIGITS_DATA, tmp_path / "plain",
                     on_report=lambda metrics: None)
    one = fit(run_config(8, 8), QUICK_PROBE, execution(1), tmp_path / "one").metrics
    two = fit(run_config(8, 8), QUICK_PROBE, execution(2), tmp_path / "two").metrics
    for term in ("total", "reconstruction", "contrastive", "support_before", "support_after"):
        assert one[term] == pytest.approx(plain[term], rel=1e-6), term
        assert two[term] == pytest.approx(one[term], rel=1e-4), term
    weights = {run: load_checkpoint(tmp_path / run)["model"] for run in ("plain", "one", "two")}
    assert weights["one"].keys() == weights["two"].keys() == weights["plain"].keys()
    for name, value in weights["one"].items():
        for other in ("plain", "two"):
            assert torch.allclose(weights[other][name].float(), value.float(), atol=8e-3), (other, name)


def test_a_finished_run_started_again_reports_its_final_metrics_again(local_ray, tmp_path):
    """A sweep killed after a trial's Train run had finished, but before Tune recorded its last
    reports, reruns that trial when it resumes: the run, restored at its last step, must report its
    final metrics (the validation score) again, not end with no report at all."""
    first = fit(run_config(4, 4), QUICK_PROBE, execution(1), tmp_path)
    reports = ReportQueue()
    fit(run_config(4, 4), QUICK_PROBE, execution(1), tmp_path, callbacks=[reports])
    again = [report for report, _ in reports.queue.get_nowait_batch(reports.queue.qsize())]
    assert [r["step"] for r in again] == [4] and again[0]["validation"] == first.metrics["validation"], again


def test_a_restarted_run_keeps_the_best_probe_its_best_folder_holds(tmp_path):
    """A probe after the last checkpoint may have improved best/ before a failure: the restarted run
    must not replace that model with one its probes rate lower. A best/ of another run does not count."""
    run = run_config(4, 4)
    model = MetaMAE(DIGITS.spec(), SMALL, run.objective)
    save_checkpoint(tmp_path / BEST / FILENAME, model, None, 3, run.to_dict(), best_probe=0.9)
    assert best_probe_so_far(tmp_path, run, restored=0.5) == 0.9
    assert best_probe_so_far(tmp_path, run, restored=None) == 0.9
    assert best_probe_so_far(tmp_path / "elsewhere", run, restored=0.5) == 0.5
    other = replace(run, objective=replace(run.objective, mask_ratio=0.25))
    assert best_probe_so_far(tmp_path, other, restored=0.5) == 0.5


def started_at(pid: int) -> int:
    """A process's start time, in clock ticks since boot (field 22 of /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def registered_checkpoints(run_dir: Path) -> int:
    """The checkpoints Ray Train has registered, from its snapshot in the run folder. A restarted worker
    group resumes only from those: a checkpoint folder is on disk a moment before it is registered."""
    try:
        return len(json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_a_killed_worker_is_replaced_and_training_continues_from_the_last_checkpoint(local_ray, tmp_path):
    out_dir, box = tmp_path / "run", {}
    thread = threading.Thread(target=lambda: box.update(result=fit(
        run_config(160, 10), QUICK_PROBE, execution(2, max_failures=3), out_dir)))
    thread.start()
    deadline = time.time() + 300
    while not registered_checkpoints(out_dir):
        assert time.time() < deadline and thread.is_alive(), "no checkpoint was registered"
        time.sleep(0.5)
    # The state API can still list an earlier run's workers as alive: kill one of the two newest.
    alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    newest = sorted((actor.pid for actor in alive if Path(f"/proc/{actor.pid}").exists()), key=started_at)[-2:]
    assert len(newest) == 2
    os.kill(newest[-1], signal.SIGKILL)
    thread.join(timeout=400)
    metrics = box["result"].metrics
    assert metrics["step"] == 160
    assert 10 <= metrics["resumed_from_step"] < 160 and metrics["resumed_from_step"] % 10 == 0
    assert load_checkpoint(out_dir)["step"] == 160


def test_a_nan_loss_stops_every_worker_naming_step_and_term_and_keeps_the_last_checkpoint(local_ray, tmp_path):
    fit(run_config(10, 10), QUICK_PROBE, execution(2), tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"step 12: the \w+ loss is nan.*checkpoint_00000010"):
        fit(run_config(20, 10, lr=float("inf")), QUICK_PROBE, execution(2), tmp_path)   # resumes at step 10
    assert load_checkpoint(tmp_path)["step"] == 10


def test_a_resume_whose_latest_checkpoint_is_corrupt_falls_back_to_the_newest_intact_one(local_ray, tmp_path):
    fit(run_config(6, 2), QUICK_PROBE, execution(1, keep_checkpoints=3), tmp_path)
    for step, cut in [(6, 100), (4, 0)]:       # the latest truncated, the one before it emptied
        path = tmp_path / f"checkpoint_{step:08d}" / FILENAME
        path.write_bytes(path.read_bytes()[:cut])
    again = fit(run_config(6, 2), QUICK_PROBE, execution(1, keep_checkpoints=3, max_failures=0), tmp_path)
    assert again.metrics["resumed_from_step"] == 2 and again.metrics["step"] == 6
    assert load_checkpoint(tmp_path)["step"] == 6               # written again, whole


def test_a_run_none_of_whose_checkpoints_can_be_read_fails_naming_each(local_ray, tmp_path):
    fit(run_config(4, 2), QUICK_PROBE, execution(1), tmp_path)
    for step in (2, 4):
        (tmp_path / f"checkpoint_{step:08d}" / FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match=r"UnreadableCheckpoints: no checkpoint of this run can be read "
                                        r"\(checkpoint_00000004, checkpoint_00000002 in .*another out_dir"):
        fit(run_config(4, 2), QUICK_PROBE, execution(1, max_failures=0), tmp_path)


def test_a_request_the_cluster_cannot_hold_fails_at_once_saying_what_was_asked_and_what_exists(local_ray, tmp_path):
    started = time.time()
    with pytest.raises(ResourceRequestError, match=r"asks for 4 workers of \{'CPU': 1\.0\}.*hold 2"):
        fit(run_config(1, 1), QUICK_PROBE, execution(4, cpus_per_worker=1.0), tmp_path)
    with pytest.raises(ResourceRequestError, match=r"'GPU': 1"):
        fit(run_config(1, 1), QUICK_PROBE, execution(1, use_gpu=True), tmp_path)
    assert time.time() - started < 10


def test_two_workers_stream_their_parts_of_the_shards_through_ray_data(local_ray, tmp_path, monkeypatch):
    convert(out=tmp_path / "shards", shard_bytes=20_000)           # the digits as Parquet shards
    monkeypatch.chdir(tmp_path)                                    # a relative path, as configs/dataset/ give
    dataset = replace(DIGITS, source="shards", path="shards", input=None, num_classes=None, metric=None)
    run = replace(run_config(30, 30), dataset=dataset)
    metrics = fit(run, QUICK_PROBE, execution(2), tmp_path / "run").metrics
    assert metrics["step"] == 30 and torch.isfinite(torch.tensor(metrics["total"]))
    assert 0 <= metrics["data_wait"] < 1 and metrics["samples_per_s"] > 0
    assert 0 <= metrics["validation"] <= 1
