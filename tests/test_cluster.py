"""The cluster YAMLs: they pass the checks `ray up` makes before it calls the cloud, keep the dashboard
private and token authentication on, and their node types autoscale. The last runs on Ray's fake
multi-node provider, with a config generated from cluster/aws-gpu.yaml (cluster/fake_cluster.py)
and the YAML's start-up environment: two trials searched by Optuna, each needing a (fake) GPU that
the head lacks, make the autoscaler add a one-GPU worker each, and the workers go away once idle.

The fake cluster is a `ray start --head` of its own (its own ports and temp dir, so that other Rays
on the machine neither see nor disturb it), stopped by killing the processes of its session, never
by `ray stop`, which would stop every Ray on the machine. The Tune driver runs in a subprocess (this
file, run as a script): it gets the cluster's environment and this process keeps no Ray state.
"""
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `cluster` is a folder beside `tests`, not an installed package

from cluster.fake_cluster import FAKE_GPU, fake_config, head_start_args, load, start_env  # noqa: E402

YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
AUTOSCALED = ROOT / "cluster" / "aws-gpu.yaml"
PORT, CLIENT_PORT, DASHBOARD_PORT = 6390, 6391, 8275  # not Ray's defaults, which other tests' Rays use
# 12 s. With less, a worker that has just started can be found idle before its waiting trial lands.
IDLE_TIMEOUT_MINUTES = 0.2
TRIALS = 2
# One trial's request, shaped like a Ray Train trial's: a bundle for the trainer and one for a GPU
# worker. Only a one-GPU worker fits it. Swap in the sweep's request (with GPU spelled FAKE_GPU).
TRIAL_BUNDLES = [{"CPU": 1}, {"CPU": 1, FAKE_GPU: 1}]
BARRIER_TIMEOUT_S = 90
DRIVER_TIMEOUT_S = 150


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_validates(path):
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` calls

    validate_config(prepare_config(load(path)))
    validate_config(fake_config(path, gcs_address="127.0.0.1:6379", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_dashboard_private_and_token_auth_on(path):
    config = load(path)
    head_env = start_env(config["head_start_ray_commands"])
    assert head_env["RAY_AUTH_MODE"] == "token"
    assert start_env(config["worker_start_ray_commands"])["RAY_AUTH_MODE"] == "token"
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    assert "0.0.0.0" not in path.read_text()
    assert "security_group" not in config["provider"]  # no ingress rules beyond Ray's own
    # Tune's cap on waiting trials: the number of one-GPU trials the cluster holds at full size.
    gpus = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in config["available_node_types"].values())
    assert int(head_env["TUNE_MAX_PENDING_TRIALS_PG"]) == gpus


def test_providers_scale_alike():
    """Every YAML has the node types, limits and environment that the autoscaling test runs."""
    def scaling(path):
        config = load(path)
        return (config["max_workers"], config["idle_timeout_minutes"], config["upscaling_speed"],
                {name: (t["resources"].get("GPU", 0), t.get("min_workers", 0), t.get("max_workers"))
                 for name, t in config["available_node_types"].items()},
                start_env(config["head_start_ray_commands"]), start_env(config["worker_start_ray_commands"]))

    assert all(scaling(path) == scaling(AUTOSCALED) for path in YAMLS)


def _session_pids(session: int) -> list[int]:
    """The live processes of a session: those of the `ray start` that led it keep it."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":  # not a zombie
                    pids.append(int(entry.name))
    return pids


def _kill_session(session: int) -> None:
    """SIGKILL every process of the session, as `ray stop --force` does, but for this cluster only."""
    deadline = time.monotonic() + 30
    while (pids := _session_pids(session)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    assert not _session_pids(session), "processes of the fake cluster are left"


@pytest.fixture
def fake_cluster():
    """A fake cluster of AUTOSCALED's node types: yields its address, env, work folder and config."""
    from ray.util import get_node_ip_address

    work = Path(tempfile.mkdtemp(prefix="rayfake-"))  # short: Ray's socket paths must fit 107 bytes
    address = f"{get_node_ip_address()}:{PORT}"
    config = fake_config(AUTOSCALED, gcs_address=address, idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    (work / "cluster.yaml").write_text(json.dumps(config))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        **start_env(load(AUTOSCALED)["head_start_ray_commands"]),  # token auth, Tune's cap
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
    }
    head = subprocess.Popen(
        [Path(sys.executable).parent / "ray", "start", "--head", f"--port={PORT}",
         f"--ray-client-server-port={CLIENT_PORT}", f"--dashboard-port={DASHBOARD_PORT}",
         "--dashboard-agent-listen-port=0", f"--temp-dir={work / 'ray'}", "--disable-usage-stats",
         f"--autoscaling-config={work / 'cluster.yaml'}", *head_start_args(config)],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = head.communicate(timeout=60)
        assert head.returncode == 0, out
        yield address, env, work, config
    finally:
        _kill_session(head.pid)
        shutil.rmtree(work, ignore_errors=True)


def test_fake_cluster_grows_for_waiting_trials_and_shrinks_when_idle(fake_cluster):
    address, env, work, config = fake_cluster
    driver = subprocess.run([sys.executable, __file__, address, str(work)], env=env, cwd=work,
                            capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-3000:]
    report = json.loads(driver.stdout.strip().splitlines()[-1])

    # Both trials waited for resources at once (Tune's own cap, with a searcher, is 1), so the
    # autoscaler saw both requests.
    assert report["most_pending"] == TRIALS
    # Each trial waited for the other, so they ran at the same time, each on a worker of its own that
    # the autoscaler added: a one-GPU worker, the smallest node type the request fits.
    trials = report["trials"]
    assert len(trials) == TRIALS and all(trial["met"] == TRIALS for trial in trials)
    assert len({trial["node"] for trial in trials} - {report["head"]}) == TRIALS
    gpu_1x = config["available_node_types"]["gpu_1x"]["resources"]
    for trial in trials:
        assert [trial["node_resources"][name] for name in ("CPU", FAKE_GPU)] == [gpu_1x["CPU"], gpu_1x[FAKE_GPU]]
    # Once the trials were done, the workers were removed: not before the idle timeout, but soon.
    assert report["workers_removed_at"] is not None, "the idle workers were not removed"
    assert report["workers_removed_at"] - max(trial["done_at"] for trial in trials) >= IDLE_TIMEOUT_MINUTES * 60


# ---------------------------------------------------------------- the driver, run as a subprocess
def _trial(config, barrier: str):
    """Wait until all TRIALS trials run, then report the node this one runs on and its resources."""
    import ray
    from ray import tune

    (Path(barrier) / tune.get_context().get_trial_id()).touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(Path(barrier).iterdir())) < TRIALS and time.monotonic() < deadline:
        time.sleep(0.5)
    node = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node)
    tune.report({"node": node, "node_resources": resources, "met": len(list(Path(barrier).iterdir())),
                 "done_at": time.time()})


def _most_pending_callback():
    from ray import tune

    class MostPending(tune.Callback):
        """Counts the most trials that waited for resources at once."""
        most = 0

        def on_step_begin(self, iteration, trials, **info):
            self.most = max(self.most, sum(trial.status == "PENDING" for trial in trials))

    return MostPending()


def _drive(address: str, work: Path) -> dict:
    """Run TRIALS trials searched by Optuna, as the sweep does, then wait for the workers to go."""
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    ray.init(address=address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()  # the driver's node, the only one at the start
    (work / "barrier").mkdir()
    pending = _most_pending_callback()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, barrier=str(work / "barrier")),
                            tune.PlacementGroupFactory(TRIAL_BUNDLES)),
        param_space={"x": tune.uniform(0, 1)},  # something for Optuna to suggest
        tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric="met", mode="max"), num_samples=TRIALS),
        run_config=tune.RunConfig(storage_path=str(work / "results"), callbacks=[pending], verbose=0),
    )
    results = tuner.fit()
    removed_at = None
    deadline = time.monotonic() + 60
    while removed_at is None and time.monotonic() < deadline:
        if not [node for node in ray.nodes() if node["Alive"] and node["NodeID"] != head]:
            removed_at = time.time()
        time.sleep(0.5)
    keys = ("node", "node_resources", "met", "done_at")
    return {"head": head, "most_pending": pending.most, "workers_removed_at": removed_at,
            "trials": [{key: result.metrics[key] for key in keys} for result in results]}


if __name__ == "__main__":
    print(json.dumps(_drive(sys.argv[1], Path(sys.argv[2]))))
