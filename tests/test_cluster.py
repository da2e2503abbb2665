"""The cluster YAMLs: they pass the checks `ray up` makes before it calls the cloud, keep the dashboard
private and token authentication on, and their node types autoscale. The last runs the real sweep
(tune/sweep.py with sweep.autoscaling=true, so execution.check_resources=false) on Ray's fake
multi-node provider, with a config generated from cluster/aws-gpu.yaml (cluster/fake_cluster.py)
and the YAML's start-up environment. The head has no CPU, as in the YAML, so every trial's process
(one worker: it pretrains itself) must wait for a node that the autoscaler adds; they run there, and
the worker node goes away once it has been idle for the (shortened) idle timeout.

Not exercised here: the GPU path. The machine has no GPU; the fake cluster turns the YAML's GPUs
into the custom resource fake_GPU, which the sweep does not ask for, so the sweep runs on CPUs
(execution.use_gpu=false) and gets the smallest node type that holds its CPUs.

The fake cluster is a `ray start --head` of its own (its own ports and temp dir, so that other Rays
on the machine neither see nor disturb it), stopped by killing the processes of its session, never
by `ray stop`, which would stop every Ray on the machine. The sweep runs in a subprocess, and so does
every look at the cluster (this file, run as a script): they get the cluster's environment (its
token), and this process keeps no Ray state.
"""
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `cluster` and `tests` are folders, not installed packages (run as a script too)

from cluster.fake_cluster import fake_config, head_start_args, load, start_env  # noqa: E402
from metamae.private_apis import reservations, validate_cluster_config  # noqa: E402
from tests.ray_head import ray_head  # noqa: E402

YAMLS = sorted((ROOT / "cluster").glob("*.yaml"))
AUTOSCALED = ROOT / "cluster" / "aws-gpu.yaml"
PORT, DASHBOARD_PORT = 6390, 8275  # not Ray's defaults, which other tests' Rays use
# 12 s. With less, a worker that has just started can be found idle before its waiting trial lands.
IDLE_TIMEOUT_MINUTES = 0.2
TRIALS, STEPS = 2, 20
SWEEP = ["sweep.autoscaling=true", f"sweep.num_samples={TRIALS}", f"train.steps={STEPS}", "train.log_every=10",
         # No ASHA rung before the last step: both trials run to the end and report the objective.
         f"sweep.grace_period={STEPS}", "probe.epochs=1", "sweep.baseline=false", "sweep.name=fake"]
SWEEP_TIMEOUT_S = 300      # about 80 s on an idle machine; more when its 2 cores are shared
REMOVAL_TIMEOUT_S = 120    # the idle timeout, the autoscaler's rounds and the node's shutdown (about 15 s here)
LOOK_TIMEOUT_S = 30        # one look at the GCS's tables


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_config_validates(path):
    validate_cluster_config(load(path))
    validate_cluster_config(fake_config(path, gcs_address="127.0.0.1:6379", idle_timeout_minutes=IDLE_TIMEOUT_MINUTES),
                            fill_defaults=False)


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
    try:
        with ray_head(work, env, PORT, DASHBOARD_PORT, f"--autoscaling-config={work / 'cluster.yaml'}",
                      *head_start_args(config)):
            yield address, env, work, config
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_fake_cluster_grows_for_the_sweep_and_shrinks_when_idle(fake_cluster):
    address, env, work, config = fake_cluster
    env = {**env, "RAY_ADDRESS": address}
    started = time.time()
    sweep = subprocess.run([sys.executable, "tune/sweep.py", *SWEEP, f"sweep.dir={work / 'sweeps'}"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    ended = time.time()
    if sweep.returncode != 0 or f"{TRIALS} finished, 0 stopped early, 0 failed" not in sweep.stdout:
        # Both trials run to the end and report their validation score (the final linear evaluation).
        pytest.fail(f"the sweep's output:\n{sweep.stdout[-5000:]}\n{sweep.stderr[-5000:]}", pytrace=False)
    table = pd.read_csv(work / "sweeps" / "fake" / "digits.csv")
    assert list(table["outcome"]) == ["finished"] * TRIALS and table["validation"].notna().all()
    assert list(table["step"]) == [STEPS] * TRIALS

    # Wait until the added workers are gone, then read the GCS's node and actor tables: they keep
    # dead nodes and actors, with the node each actor ran on and when each started and ended.
    look = subprocess.run([sys.executable, __file__, address, str(REMOVAL_TIMEOUT_S)], env=env, cwd=work,
                          capture_output=True, text=True, timeout=REMOVAL_TIMEOUT_S + 3 * LOOK_TIMEOUT_S)
    assert look.returncode == 0, look.stdout[-3000:] + look.stderr[-3000:]
    history = json.loads(look.stdout.strip().splitlines()[-1])
    nodes = {node["node_id"]: node for node in history["nodes"]}
    head = [node for node in nodes.values() if node["is_head"]]
    workers = [node for node in nodes.values() if not node["is_head"]]
    assert len(head) == 1 and head[0]["alive"] and head[0]["resources"].get("CPU", 0) == 0

    # The autoscaler added worker(s) while the sweep ran, of the YAML's smallest node type that
    # holds the trials' CPUs (a one-GPU worker, its CPUs scaled down).
    assert workers, "the autoscaler added no worker"
    gpu_1x = config["available_node_types"]["gpu_1x"]["resources"]
    for node in workers:
        assert node["type"] == "gpu_1x" and node["resources"]["CPU"] == gpu_1x["CPU"], node
        assert started < node["start"] < ended, node

    # Everything of the sweep that asked for CPUs ran on those workers: the trials' processes, each
    # pretraining itself (execution.cpus_per_worker; one process may run several trials: reuse_actors).
    on_cpus = [actor for actor in history["actors"] if actor["cpus"] > 0]
    assert 1 <= len(on_cpus) <= TRIALS and {(actor["class"], actor["cpus"]) for actor in on_cpus} == {
        ("ImplicitFunc", 0.5)}, on_cpus
    assert all(nodes[actor["node"]] in workers for actor in on_cpus), on_cpus

    # Nothing left a reservation with the autoscaler (one-worker trials start no Train run; a Train
    # run's trial cancels its run's, tests/test_tune_reports.py).
    assert history["reservations"] == [], history["reservations"]

    # Once idle, the workers were removed: not before the idle timeout, but soon after the sweep.
    left = [node for node in workers if node["alive"]]
    if left:
        # A failure's first lines, whole (an assertion's message is cut to a few lines without -vv).
        alive_there = [a for a in history["actors"] if a["state"] == "ALIVE" and nodes.get(a["node"]) in left]
        pytest.fail("\n".join([
            f"the idle workers were not removed within {REMOVAL_TIMEOUT_S} s of the sweep's end",
            "the workers' state over the wait (seconds into it, idle time, free resources, activity):",
            *map(json.dumps, history["timeline"]),
            f"actors alive on them: {alive_there}",
            f"what else may hold their resources: {json.dumps(history['holders'])}",
            "the autoscaler's log:", autoscaler_log(work)]), pytrace=False)
    for node in workers:
        last_use = max(actor["end"] for actor in on_cpus if actor["node"] == node["node_id"])
        assert node["end"] - last_use >= IDLE_TIMEOUT_MINUTES * 60, node
        assert node["end"] < ended + REMOVAL_TIMEOUT_S + LOOK_TIMEOUT_S, node


def autoscaler_log(work: Path) -> str:
    """The autoscaler's decisions on nodes, errors, and its last status (demands, request_resources)."""
    log = (work / "ray" / "session_latest" / "logs" / "monitor.log").read_text().splitlines()
    decisions = [line for line in log if any(word in line for word in ("Terminating", "Removing", "Adding",
                                                                         "ERROR", "Error", "WARN"))]
    last = max((i for i, line in enumerate(log) if "Autoscaler status" in line), default=len(log))
    return "\n".join([*decisions[-20:], *log[last:last + 30]])


# ---------------------------------------------------------------- a look at the cluster, run as a subprocess
def _train_reservations() -> list[str]:
    """The Ray Train runs whose reservations the autoscaler still holds.

    A Ray Train V2 run asks the cluster's AutoscalingCoordinator actor for its workers' resources,
    which passes them on as `request_resources`, and cancels the request when it ends or is aborted.
    A run killed instead leaves its request until it expires, 180 s later, and the autoscaler removes
    no node that such a request needs.
    """
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        return reservations(LOOK_TIMEOUT_S)
    finally:
        ray.shutdown()


def _holders(node_ids: list[str]) -> dict:
    """What may hold resources on nodes the autoscaler keeps: their placement groups' bundles, live
    worker processes (with their command lines and kernel states) and running tasks; or why the
    state API could not say (a diagnosis, never the failure itself)."""
    import ray
    from ray.util.state import list_placement_groups, list_tasks, list_workers

    def process(pid):
        try:
            return {"cmd": Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200],
                    "state": Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]}
        except OSError:
            return {}

    try:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        groups = [{"id": group.placement_group_id, "state": group.state, "job": group.creator_job_id,
                   "bundles": group.bundles}
                  for group in list_placement_groups(detail=True, timeout=LOOK_TIMEOUT_S) if group.state != "REMOVED"]
        workers = [{"pid": w.pid, "type": w.worker_type, "node": node, **process(w.pid)} for node in node_ids
                   for w in list_workers(filters=[("is_alive", "=", True), ("node_id", "=", node)],
                                         timeout=LOOK_TIMEOUT_S, raise_on_missing_output=False)]
        tasks = [{"name": t.name, "type": t.type, "node": node} for node in node_ids
                 for t in list_tasks(filters=[("state", "=", "RUNNING"), ("node_id", "=", node)],
                                     timeout=LOOK_TIMEOUT_S, raise_on_missing_output=False)]
        return {"placement_groups": groups, "workers": workers, "running_tasks": tasks}
    except Exception as error:
        return {"state_api_error": repr(error)}
    finally:
        ray.shutdown()


def _history(address: str, wait_s: float) -> dict:
    """The cluster's nodes and actors, dead ones included, once no worker is left (or wait_s passed);
    the Train reservations left at the start, and what the autoscaler read of the workers meanwhile."""
    import ray._raylet
    from ray.autoscaler.v2.sdk import get_cluster_resource_state
    from ray.core.generated.gcs_pb2 import ActorTableData, GcsNodeInfo

    reservations = _train_reservations()
    gcs = ray._raylet.GcsClient(address=address)
    alive = GcsNodeInfo.GcsNodeState.ALIVE
    start = time.monotonic()
    timeline = []
    while True:
        infos = gcs.get_all_node_info(timeout=LOOK_TIMEOUT_S)
        left = [info.node_id.hex() for info in infos.values() if info.state == alive and not info.is_head_node]
        if not left or time.monotonic() - start > wait_s:
            break
        # What the autoscaler reads of each worker: idle or not, for how long, its free resources, and
        # the raylet's reasons for not being idle (which can name a resource that is all free).
        if not timeline or time.monotonic() - start >= timeline[-1][0] + 10:
            timeline.append([round(time.monotonic() - start), {
                state.node_id.hex()[-6:]: [round(state.idle_duration_ms / 1000), dict(state.available_resources),
                                           list(state.node_activity)]
                for state in get_cluster_resource_state(gcs).node_states if state.node_id.hex() in left}])
        time.sleep(0.5)

    async def actors():
        return await gcs.async_get_all_actor_info(timeout=LOOK_TIMEOUT_S)

    def cpus(resources):  # an actor in a placement group asks for CPU_group_<bundle>_<group>
        return max([amount for name, amount in resources.items() if name.split("_group_")[0] == "CPU"], default=0)

    nodes = [{"node_id": info.node_id.hex(), "is_head": info.is_head_node, "alive": info.state == alive,
              "type": info.node_type_name, "resources": dict(info.resources_total),
              "start": info.start_time_ms / 1000, "end": info.end_time_ms / 1000} for info in infos.values()]
    return {"reservations": reservations, "timeline": timeline, "nodes": nodes,
            "holders": _holders(left) if left else {}, "actors": [
                {"class": actor.class_name, "node": actor.node_id.hex(), "cpus": cpus(actor.required_resources),
                 "state": ActorTableData.ActorState.Name(actor.state), "end": actor.end_time / 1000}
                for actor in asyncio.run(actors()).values()]}


if __name__ == "__main__":
    print(json.dumps(_history(sys.argv[1], float(sys.argv[2]))))
