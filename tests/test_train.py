"""Pretraining: the loss goes down, checkpoints are atomic and resumable, a NaN stops the run."""
import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from metamae.checkpoint import FILENAME, load_checkpoint, model_from_checkpoint
from metamae.config import DatasetConfig, EvaluateConfig, ExecutionConfig, ProbeConfig, TrainConfig
from metamae.data import load_dataset
from metamae.data.arrays import Split, batches
from metamae.data.digits import digits
from metamae.evaluate import run as evaluate
from metamae.linear_eval import linear_probe
from metamae.loop import pretrain
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig
from metamae.process import start_training
from metamae.train import NonFiniteLoss, RunRecipe, compile_loss, make_optimizer, restore_optimizer, train_step
from tests.ray_head import RAY

ROOT = Path(__file__).resolve().parent.parent
SMALL = ModelConfig(enc_width=32, enc_depth=2, enc_heads=4, dec_width=16, dec_depth=1, dec_heads=2)
DIGITS = DatasetConfig(name="digits", input={"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2},
                       num_classes=10, batch_size=64, source="digits")


QUICK_PROBE = ProbeConfig(method="paper", epochs=1)            # the final evaluation, fast
IN_PROCESS = ExecutionConfig(ray=False, probe_every=0, probe_examples=64)


def train(run: RunRecipe, data, out_dir) -> MetaMAE:
    """Pretrain in this process, quietly; the model of the run's newest checkpoint."""
    pretrain(run, QUICK_PROBE, IN_PROCESS, data, out_dir, on_report=lambda metrics: None)
    return model_from_checkpoint(load_checkpoint(out_dir))


def run_config(steps: int, **objective) -> RunRecipe:
    return RunRecipe(DIGITS, SMALL, ObjectiveConfig(**objective), TrainConfig(steps=steps, log_every=50,
                                                                            checkpoint_every=50))


def mean_loss(model, split: Split, seed: int = 0) -> float:
    """The loss over fixed batches with fixed draws, without dropout."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    values = [model(x, generator=g).total.item() for x, _ in batches(split, 64)]
    model.train()
    return float(np.mean(values))


@pytest.mark.parametrize("method", ["metamae", "mae"])
def test_200_steps_on_the_embedded_digits_lower_the_training_loss(tmp_path, method):
    data = digits()
    run = run_config(200, method=method)
    torch.manual_seed(run.train.seed)                            # the initial weights pretrain starts from
    untrained = MetaMAE(data.spec, run.model, run.objective)
    trained = train(run, data, tmp_path / "trained")
    assert mean_loss(trained, data.train) < 0.8 * mean_loss(untrained, data.train)
    assert list((tmp_path / "trained" / "tensorboard").glob("events.out.tfevents.*"))


def test_a_resumed_run_saves_what_it_trained_and_trains_as_an_uninterrupted_one(tmp_path):
    data = digits()
    train(run_config(50), data, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed")["step"] == 50
    resumed = train(run_config(100), data, tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint_00000100" / FILENAME)["step"] == 100
    reloaded = model_from_checkpoint(load_checkpoint(tmp_path / "resumed"))
    uninterrupted = train(run_config(100), data, tmp_path / "uninterrupted")
    for name, weight in resumed.state_dict().items():
        assert torch.equal(weight, reloaded.state_dict()[name]), name
        assert torch.equal(weight, uninterrupted.state_dict()[name]), name       # same batches, draws, moments
    assert not list((tmp_path / "resumed").glob(".*"))           # no half-written checkpoint left


def test_a_restored_optimizer_keeps_the_checkpoints_moments_and_this_runs_settings():
    model = torch.nn.Linear(3, 2)
    saved = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    model(torch.randn(4, 3)).sum().backward()
    saved.step()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=1e-4))
    restore_optimizer(optimizer, saved.state_dict())
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"], group["fused"]) == (1e-3, 1e-4, True)
    assert torch.equal(optimizer.state[model.weight]["exp_avg"], saved.state[model.weight]["exp_avg"])


def test_resuming_with_another_model_config_is_refused(tmp_path):
    train(run_config(50), digits(), tmp_path)
    other = replace(run_config(100), model=replace(SMALL, enc_width=16))
    with pytest.raises(ValueError, match="another model config"):
        train(other, digits(), tmp_path)


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    train(run_config(50), digits(), tmp_path)
    path = tmp_path / "checkpoint_00000050" / FILENAME
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing")


def test_a_nan_loss_stops_the_run_naming_step_and_term_and_keeps_the_last_checkpoint(tmp_path):
    data = digits()
    train(run_config(50), data, tmp_path)
    before = load_checkpoint(tmp_path)
    poisoned = replace(data, train=Split(np.full_like(data.train.x, np.nan), data.train.y))
    with pytest.raises(NonFiniteLoss, match=r"step 51: the reconstruction loss is nan; its input batch holds NaN"):
        train(run_config(100), poisoned, tmp_path)
    after = load_checkpoint(tmp_path)
    assert after["step"] == 50
    assert all(torch.equal(before["model"][k], v) for k, v in after["model"].items())


def cli(module: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_pretrain_and_evaluate_commands(tmp_path):
    run = cli("metamae.pretrain", "dataset=digits", "model=tiny", "train.steps=20", "probe.epochs=2",
              "baselines=true", "execution.ray=false", f"out_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"metamae", "mae", "random_init", "raw_input"}
    assert "random_init" in run.stdout and "mae" in run.stdout
    shards = cli("metamae.data.prepare", "digits", "--out", str(tmp_path / "shards"))     # the same digits, as shards
    assert shards.returncode == 0, shards.stderr
    evaluation = cli("metamae.evaluate", f"checkpoint={tmp_path / 'metamae'}", "dataset=custom",
                     f"dataset.path={tmp_path / 'shards'}", "probe.epochs=2", f"out_dir={tmp_path / 'eval'}")
    assert evaluation.returncode == 0, evaluation.stderr
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluated["step"] == 20 and evaluated["test"] == pytest.approx(results["metamae"]["test"])


def test_evaluate_probes_the_synthetic_data_the_checkpoint_was_pretrained_on(tmp_path):
    """Synthetic data is drawn from a seed: evaluation takes the checkpoint's train.seed, not probe.seed."""
    dataset = DatasetConfig(name="synthetic", input={"kind": "tabular", "features": 6}, num_classes=3,
                            metric="accuracy", batch_size=32, source="synthetic")
    run = RunRecipe(dataset, SMALL, ObjectiveConfig(), TrainConfig(steps=5, seed=3, log_every=5))
    model = train(run, load_dataset(dataset, seed=3)[0], tmp_path / "run")
    probe = ProbeConfig(epochs=2, seed=0)
    expected = linear_probe(model, load_dataset(dataset, seed=3)[0], dataset, probe)
    evaluated = evaluate(EvaluateConfig(checkpoint=str(tmp_path / "run"), dataset=dataset, probe=probe,
                                        out_dir=str(tmp_path / "eval")))
    assert evaluated.test == pytest.approx(expected.test) and evaluated.train == pytest.approx(expected.train)


def test_evaluate_without_a_dataset_probes_the_checkpoints_own(tmp_path):
    """`python -m metamae.evaluate checkpoint=PATH` evaluates on what the checkpoint was pretrained on
    (here synthetic tabular data), not on the digits."""
    dataset = DatasetConfig(name="mine", input={"kind": "tabular", "features": 6}, num_classes=3,
                            metric="accuracy", batch_size=32, source="synthetic")
    run = RunRecipe(dataset, SMALL, ObjectiveConfig(), TrainConfig(steps=5, seed=3, log_every=5))
    model = train(run, load_dataset(dataset, seed=3)[0], tmp_path / "run")
    expected = linear_probe(model, load_dataset(dataset, seed=3)[0], dataset, ProbeConfig())
    evaluation = cli("metamae.evaluate", f"checkpoint={tmp_path / 'run'}", f"out_dir={tmp_path / 'eval'}")
    assert evaluation.returncode == 0, evaluation.stderr
    assert evaluation.stdout.startswith("mine: converged linear probe, accuracy validation")
    evaluated = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluated["test"] == pytest.approx(expected.test) and evaluated["validation"] == pytest.approx(
        expected.validation)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "stepz"),
    ("objective.mask_ratio=1.5", "objective.mask_ratio is 1.5"),
    ("dataset=nosuchdata", "nosuchdata"),
    ("dataset.metric=top5", "dataset.metric is 'top5'"),
    ("train.log_every=0", "train.log_every is 0"),
])
def test_a_wrong_config_key_or_value_fails_naming_it(override, message, tmp_path):
    run = cli("metamae.pretrain", override, "train.steps=1", f"out_dir={tmp_path}")
    assert run.returncode != 0
    assert message in run.stderr + run.stdout


def test_a_benchmark_dataset_without_shards_says_what_is_missing(tmp_path):
    run = cli("metamae.pretrain", "dataset=pamap2", "train.steps=1", f"out_dir={tmp_path}")
    assert run.returncode != 0 and "pamap2" in run.stderr and "shard" in run.stderr


FAULTS_OF_A_64_MIB_TENSOR = """
import resource, sys, torch
from metamae.process import keep_freed_memory

def faults_per_tensor():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)                         # 64 MiB, freed at once
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5

default = [faults_per_tensor() for _ in range(3)]
if not keep_freed_memory():
    sys.exit(3)
kept = [faults_per_tensor() for _ in range(6)]         # the first rounds grow the heap
print(default[-1], kept[-1])
"""


def test_keeping_freed_memory_stops_the_page_faults_of_a_reallocated_tensor():
    """glibc maps a 64 MiB block afresh at every allocation (16,384 faulted pages); kept, it is reused."""
    run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_64_MIB_TENSOR], cwd=ROOT, capture_output=True, text=True)
    if run.returncode == 3:
        pytest.skip("this C library has no mallopt (not glibc): keep_freed_memory changes nothing here")
    assert run.returncode == 0, run.stderr
    default, kept = map(float, run.stdout.split())
    assert default > 10_000 and kept < 100, (default, kept)


def test_a_compiled_loss_trains_as_the_eager_one_draw_for_draw():
    """torch.compile (inductor) of the whole loss, the inner step's double backward included, with
    dropout on: the same losses and weights as eager mode, step by step, in a process started as a
    compiled run's is (metamae.process.start_training). (First order under compile: test_gradients.py.)"""
    data, objective = digits(), ObjectiveConfig()
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = MetaMAE(data.spec, SMALL, objective)
        if compiled:
            start_training(TrainConfig(compile=True))
            compile_loss(model)
        optimizer = make_optimizer(model, TrainConfig())
        torch.manual_seed(1)
        losses = [train_step(model, optimizer, x, step)
                  for step, (x, _) in zip(range(1, 4), batches(data.train, 64))]
        runs.append((losses, model.state_dict()))
    (eager_losses, eager_weights), (compiled_losses, compiled_weights) = runs
    for eager_step, compiled_step in zip(eager_losses, compiled_losses):
        assert compiled_step == pytest.approx(eager_step, rel=1e-5, abs=1e-6)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_ctrl_c_of_the_plain_loop_keeps_a_checkpoint_says_where_and_exits_130(tmp_path):
    """A real process, interrupted as a terminal's Ctrl-C does (SIGINT), mid-run."""
    command = [sys.executable, "-m", "metamae.pretrain", "execution.ray=false", "model=tiny", "train.steps=100000",
               "train.log_every=5", "train.checkpoint_every=100000", f"out_dir={tmp_path}"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:                                   # the first log line: steps are running
        if "step 5/100000" in line:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped by SIGINT after step")]
    step = int(line.split()[5].rstrip(":"))
    assert step >= 5 and f"its checkpoint is {tmp_path / 'metamae' / f'checkpoint_{step:08d}'}" in line
    assert line.endswith(f"the same command with out_dir={tmp_path} resumes from it")
    assert load_checkpoint(tmp_path / "metamae")["step"] == step


@pytest.mark.ray
def test_sigterm_of_a_ray_train_run_stops_its_workers_with_a_checkpoint_and_exits_143(tmp_path):
    """A real driver on its own local Ray, sent SIGTERM (as `kill` or a scheduler's preemption does)
    once its worker has reported: the workers save the step they finished and the driver exits 143."""
    command = [sys.executable, "-m", "metamae.pretrain", "model=tiny", "train.steps=100000", "train.log_every=10",
               "train.checkpoint_every=100000", "execution.probe_every=0", f"out_dir={tmp_path}"]
    stdout = tmp_path / "stdout.txt"
    with stdout.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:                                   # Ray forwards the worker's first report
        lines.append(line)
        if "Reporting training result 1" in line:
            break
    # the local Ray's first line says how to inspect it from another shell, and that works
    [hint] = [line for line in stdout.read_text().splitlines() if line.startswith("local Ray at ")]
    status = subprocess.run(hint.split("from another shell: ")[1].replace("ray status", f"{RAY} status"),
                            shell=True, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "Resources" in status.stdout, status.stderr[-2000:]
    process.send_signal(signal.SIGTERM)
    stderr = "".join(lines) + process.communicate(timeout=180)[1]
    assert process.returncode == 143, stderr[-3000:]
    own = [line for line in stderr.splitlines() if "pid=" not in line]   # not forwarded from Ray's actors
    assert not [line for line in own if "Traceback" in line or "Aborted" in line], own
    [line] = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM after step")]
    step = int(line.split()[5].rstrip(":"))
    assert step >= 10 and f"its checkpoint is {tmp_path / 'metamae' / f'checkpoint_{step:08d}'}" in line
    assert line.endswith(f"the same command with out_dir={tmp_path} resumes from it")
    assert load_checkpoint(tmp_path / "metamae")["step"] == step


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 6 MiB tmpfs: room for one run of the tiny model (a checkpoint and the best/ copy, 2.5 MB each,
    and its events), not for the next checkpoint beside them."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"a full disk is simulated by a tmpfs, which this user cannot mount: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_last_checkpoint(tiny_filesystem):
    done = cli("metamae.pretrain", "execution.ray=false", "model=tiny", "train.steps=20", "train.checkpoint_every=20",
               f"out_dir={tiny_filesystem}")
    assert done.returncode == 0, done.stderr[-2000:]
    first = load_checkpoint(tiny_filesystem / "metamae")
    full = cli("metamae.pretrain", "execution.ray=false", "model=tiny", "train.steps=40", "train.checkpoint_every=20",
               f"out_dir={tiny_filesystem}")
    assert full.returncode == 1 and "Traceback" not in full.stderr
    run = tiny_filesystem / "metamae"
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: [Errno 28] no space left to write {run}/")
    kept = load_checkpoint(run)
    assert kept["step"] == first["step"] == 20 and all(torch.equal(first["model"][k], v)
                                                       for k, v in kept["model"].items())
    assert [path.name for path in run.iterdir() if path.name.startswith(".")] == []
