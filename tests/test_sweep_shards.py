"""A sweep on prepared shards never waits on CPUs that nothing frees. On a real `ray start --head` of
2 CPUs: a 4-trial sweep over Parquet shards runs to the end with several trials at once (it hung at 0
rows while each trial's Ray Data pipeline asked for CPUs outside the trials' reservations: two
trials held 1.2 CPU, and Ray Data's ListFiles tasks asked for a whole CPU each); a trial whose
workers stream through Ray Data reads every row inside the CPU its placement group holds, the rest
of the head taken; a sweep whose trial no node can hold fails before any trial starts, naming what
one trial asks for and what the cluster has. Without Ray: the resource planning (tune/sweep.py:
trial_resources, concurrent_trials) and the check of a run that streams on free CPUs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import cloudpickle
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from metamae.config import DatasetConfig, ExecutionConfig
from metamae.data.shards import ShardWriter
from metamae.distributed import trainer
from metamae.distributed.stream import TRIAL_DATA_CPUS, StreamConfig, read_split, reserved_data_bundle, torch_batches
from metamae.distributed.trainer import ResourceRequestError, check_request_fits, held_by_this_process
from metamae.modality import TimeSeriesSpec
from tests.ray_head import two_cpu_head
from tune import sweep

ROOT = Path(__file__).resolve().parents[1]

PORT, DASHBOARD_PORT = 6560, 8560               # not Ray's defaults, nor test_sweep.py's or test_cluster.py's
TWO_CPUS = [{"CPU": 2.0, "GPU": 0.0}]
QUICK = ["train.steps=20", "train.log_every=10", "sweep.grace_period=10", "sweep.reduction_factor=2",
         "probe.epochs=1", "execution.probe_examples=100", "sweep.baseline=false"]
# the defaults otherwise: one worker of 0.5 CPU per trial


def study(source: str = "shards", num_samples: int = 4, **settings) -> sweep.SweepJobConfig:
    workers = {k: v for k, v in settings.items() if k in ExecutionConfig.__dataclass_fields__}
    rest = {k: v for k, v in settings.items() if k not in workers}
    return sweep.SweepJobConfig(
        dataset=DatasetConfig(name="jv", source=source, path="data/jv" if source == "shards" else None),
        execution=ExecutionConfig(**workers), sweep=sweep.SweepConfig(num_samples=num_samples, **rest))


# --------------------------------------------------------------------------------------------
# The planning, without Ray
# --------------------------------------------------------------------------------------------

def test_a_one_worker_trial_holds_its_worker_alone_and_four_fit_on_two_cpus():
    for source in ("shards", "digits"):             # the loop in the trial's process, which reads its data itself
        resources = sweep.trial_resources(study(source, num_samples=8))
        assert resources.trial == ({"CPU": 0.5},) and resources.workers == ()
        assert sweep.concurrent_trials(study(source, num_samples=8), TWO_CPUS) == 4


def test_a_trial_whose_workers_stream_reserves_its_pipelines_cpus_beside_its_driver():
    resources = sweep.trial_resources(study(num_workers=2, cpus_per_worker=0.4))
    assert resources.trial == ({"CPU": 0.1}, {"CPU": TRIAL_DATA_CPUS})   # one placement group, one node
    assert resources.placement().bundles == [{"CPU": 0.1}, {"CPU": TRIAL_DATA_CPUS}]
    assert resources.placement().strategy == "STRICT_PACK"
    assert sweep.concurrent_trials(study(num_workers=2, cpus_per_worker=0.4), TWO_CPUS) == 1
    assert sweep.concurrent_trials(study(num_workers=2, cpus_per_worker=0.4), [{"CPU": 8.0}]) == 4
    # in-memory data has no pipeline: two workers of 0.5 and a driver, three trials on 5 CPUs
    assert sweep.trial_resources(study("digits", num_workers=2)).trial == ({"CPU": 0.1},)
    assert sweep.concurrent_trials(study("digits", num_workers=2), [{"CPU": 5.0}]) == 4


def test_trials_are_fitted_node_by_node_each_trial_whole():
    one_cpu_nodes = [{"CPU": 1.0, "GPU": 0.0}] * 3
    # 3 CPUs in all, but a trial's driver and pipeline (1.1 CPU) must share a node: none can
    with pytest.raises(ResourceRequestError):
        sweep.concurrent_trials(study(num_workers=2, cpus_per_worker=0.4), one_cpu_nodes)
    # trials of 0.6 CPU: one per 1-CPU node, not floor(3 / 0.6) = 5
    assert sweep.concurrent_trials(study(num_samples=8, cpus_per_worker=0.6), one_cpu_nodes) == 3
    assert sweep.concurrent_trials(study(num_samples=8), one_cpu_nodes) == 6           # 0.5-CPU trials: 2 a node
    gpus = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert sweep.concurrent_trials(study(num_samples=8, use_gpu=True), gpus) == 3
    assert sweep.concurrent_trials(study(num_samples=8, use_gpu=True, num_workers=2), gpus) == 1


@pytest.mark.parametrize("settings, missing", [
    ({"num_workers": 2}, r"its driver \{'CPU': 0\.1\}, its Ray Data pipeline \{'CPU': 1\.0\} .*2 Train workers of "
                         r"\{'CPU': 0\.5\} each: 2\.1 CPU in all, and the cluster's nodes have 2 CPU, 0 GPU"),
    ({"cpus_per_worker": 3.0}, r"\{'CPU': 3\.0\}, pretraining in its own process.*: 3 CPU in all"),
    ({"use_gpu": True}, r"\{'CPU': 0\.5, 'GPU': 1\.0\}, pretraining in its own process.*have 2 CPU, 0 GPU"),
])
def test_a_trial_no_node_can_hold_fails_naming_what_it_asks_for_and_what_there_is(settings, missing):
    with pytest.raises(ResourceRequestError, match=missing) as error:
        sweep.concurrent_trials(study(**settings), TWO_CPUS)
    assert "no trial could ever start" in str(error.value) and "execution.num_workers" in str(error.value)


def test_max_concurrent_trials_is_kept_below_what_fits_and_lowered_above_it(capsys):
    assert sweep.concurrent_trials(study(max_concurrent_trials=2), TWO_CPUS) == 2
    assert sweep.concurrent_trials(study(max_concurrent_trials=10), TWO_CPUS) == 4
    assert "sweep.max_concurrent_trials=10 lowered to 4" in capsys.readouterr().out
    # more trials at once than num_samples fit: the number is what fits, not num_samples
    assert sweep.concurrent_trials(study(num_samples=2), TWO_CPUS) == 2


def test_an_autoscaling_sweep_is_not_checked_against_todays_nodes():
    assert sweep.concurrent_trials(study(num_workers=2, autoscaling=True), TWO_CPUS) == 4           # num_samples
    assert sweep.concurrent_trials(study(num_workers=2, autoscaling=True, max_concurrent_trials=16), []) == 16


def test_a_run_streaming_on_free_cpus_must_leave_a_node_a_whole_cpu_for_ray_data(monkeypatch):
    """Outside a sweep trial (python -m metamae.pretrain execution.num_workers=2) the pipeline takes free
    CPUs, and its ListFiles task a whole one: workers that leave less would wait on it forever."""
    from ray.train import ScalingConfig
    nodes = lambda *cpus: [{"Alive": True, "NodeID": str(i), "Resources": {"CPU": c}} for i, c in enumerate(cpus)]
    monkeypatch.setattr(trainer, "held_by_this_process", lambda: {})
    workers = lambda cpus: ScalingConfig(num_workers=2, resources_per_worker={"CPU": cpus})
    monkeypatch.setattr(trainer.ray, "nodes", lambda: nodes(2.0))
    check_request_fits(workers(0.5), data_cpus=1.0)                               # 1 CPU left
    check_request_fits(workers(0.6))                                              # no pipeline: they fit
    with pytest.raises(ResourceRequestError, match=r"leave no node 1 free CPU.*CPUs left per node: \[0\.8\]"):
        check_request_fits(workers(0.6), data_cpus=1.0)
    monkeypatch.setattr(trainer.ray, "nodes", lambda: nodes(1.5, 1.0))            # both workers on the first
    check_request_fits(workers(0.6), data_cpus=1.0)
    monkeypatch.setattr(trainer.ray, "nodes", lambda: nodes(1.0, 1.0))            # one on each: 0.4 left on both
    with pytest.raises(ResourceRequestError, match=r"CPUs left per node: \[0\.4, 0\.4\]"):
        check_request_fits(workers(0.6), data_cpus=1.0)


# --------------------------------------------------------------------------------------------
# Real sweeps on a 2-CPU head
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def head():
    with two_cpu_head("rayshards-", PORT, DASHBOARD_PORT) as (env, _):
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{PORT}"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """400 series of 12 channels × 32 steps, 3 classes apart in their first channels, as Parquet shards."""
    folder = tmp_path_factory.mktemp("prepared") / "jv"
    rng = np.random.default_rng(0)
    spec = TimeSeriesSpec(channels=12, length=32, patch=2)     # 16 tokens: mask ratios up to 0.9 leave one
    writer = ShardWriter(folder, "jv", spec, 3, "accuracy", shard_bytes=200_000, progress=False)
    for split, rows in (("train", 320), ("test", 80)):
        y = rng.integers(0, 3, rows)
        x = rng.standard_normal((rows, 12, 32)).astype(np.float32)
        x[:, :3] += 0.5 * y[:, None, None]
        writer.add(split, x, y)
    writer.finish()
    return folder


def sweep_run(env: dict, sweep_dir: Path, *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "tune/sweep.py", "dataset=custom", f"sweep.dir={sweep_dir.parent}",
               f"sweep.name={sweep_dir.name}", *QUICK, *overrides]
    try:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        out = hung.stdout.decode(errors="replace") if isinstance(hung.stdout, bytes) else hung.stdout or ""
        pytest.fail(f"the sweep did not end in {timeout} s:\n{out[-3000:]}")


def trial_spans(experiment: Path) -> dict[str, tuple[float, float, int]]:
    """Each trial's (start, end, last step) from its Tune result.json."""
    spans = {}
    for results in experiment.glob("*/result.json"):
        reports = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if reports:
            first, last = reports[0], reports[-1]
            spans[results.parent.name] = (first["timestamp"] - first["time_total_s"], last["timestamp"],
                                          last.get("step", 0))
    return spans


class TrialDriver:
    """An actor where Tune puts a trial's driver: the first bundle of the trial's placement group, its
    children captured by the group (Ray Data's tasks are not: they say where they run)."""

    def read(self, folder: str) -> dict:
        within = reserved_data_bundle()
        dataset = read_split(Path(folder), "train", StreamConfig(batch_size=32), seed=0, within=within)
        rows = sum(len(y) for _, y in torch_batches(dataset, StreamConfig(batch_size=32), seed=0, drop_last=False))
        return {"rows": rows, "within": within is not None, "held": list(held_by_this_process().values())}


def read_in_a_trials_bundle(address: str, folder: str) -> dict:
    """Every other CPU of the head taken, a trial driver's read of the shards (run in a process of its
    own: Ray keeps one auth mode per process, and other tests' local Rays use another)."""
    ray.init(address=address, log_to_driver=False)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])     # workers cannot import a test module
    try:
        placement = sweep.trial_resources(study(num_workers=2)).placement()
        group = placement_group(placement.bundles, strategy=placement.strategy)
        ray.get(group.ready(), timeout=60)
        blocker = ray.remote(num_cpus=2.0 - 0.1 - TRIAL_DATA_CPUS)(TrialDriver).remote()   # the rest of the CPUs
        ray.get(blocker.__ray_ready__.remote(), timeout=60)
        driver = ray.remote(num_cpus=0.1)(TrialDriver).options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
        result = ray.get(driver.read.remote(folder), timeout=180)
        ray.kill(blocker)
        remove_placement_group(group)
        return result
    finally:
        ray.shutdown()


def test_a_streaming_trials_pipeline_runs_in_the_cpu_its_placement_group_holds(head, shards):
    """The pipeline (ListFiles's 1-CPU task, the reads and decodes) has only the trial's data bundle,
    and reads every row there."""
    script = ("import json, sys; sys.path[:0] = sys.argv[1:3]; import test_sweep_shards as shards; "
              "print(json.dumps(shards.read_in_a_trials_bundle(*sys.argv[3:5])))")
    done = subprocess.run([sys.executable, "-c", script, str(ROOT / "tests"), str(ROOT), head["RAY_ADDRESS"],
                           str(shards)], cwd=ROOT, env=head, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rows"] == 320 and result["within"]
    assert result["held"] == [{"CPU": 0.1 + TRIAL_DATA_CPUS}]               # one node: the whole group


def test_a_four_trial_sweep_on_shards_runs_to_the_end_with_trials_at_once(head, shards, tmp_path):
    run = sweep_run(head, tmp_path / "jv-sweep", f"dataset.path={shards}", "sweep.num_samples=4", timeout=360)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    at_once = re.search(r"(\d+) trials? at once", run.stdout)
    assert at_once and int(at_once.group(1)) > 1, run.stdout[-3000:]
    assert "pretraining in its own process (reading its data itself)" in run.stdout   # no Train run, no Ray Data
    [experiment] = [p for p in (tmp_path / "jv-sweep").iterdir() if (p / "trial_base.json").is_file()]
    spans = trial_spans(experiment)
    # each ran to the final evaluation or ASHA stopped it at its rung, step 10 of 20
    assert len(spans) == 4 and all(step in (10, 20) for *_, step in spans.values()), spans
    assert any(step == 20 for *_, step in spans.values())
    ordered = sorted(spans.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(ordered, ordered[1:])), spans   # two overlapped


def test_a_sweep_whose_trial_no_node_holds_fails_before_any_trial_starts(head, shards, tmp_path):
    run = sweep_run(head, tmp_path / "too-big", f"dataset.path={shards}", "execution.num_workers=2",
                    "execution.cpus_per_worker=1.0", timeout=120)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "its Ray Data pipeline {'CPU': 1.0}" in output and "2 Train workers of {'CPU': 1.0} each" in output
    assert "the cluster's nodes have 2 CPU, 0 GPU" in output and "no trial could ever start" in output
    assert "Trial status" not in output
