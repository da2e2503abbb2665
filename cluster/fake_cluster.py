"""A real cluster YAML, turned into a config for Ray's fake multi-node provider.

The fake provider runs every node of a cluster as local Ray processes, with a real autoscaler
adding and removing them. `fake_config` keeps what decides the autoscaling from the real YAML: the
worker node types' names, their min/max workers, the cluster's max_workers and upscaling speed.
It shrinks what runs: CPUs scaled down (a node that has CPUs keeps at least one), GPUs turned into
the custom resource FAKE_GPU (there is no GPU to give), a small object store per node, and an idle
timeout short enough for a test. `start_env` reads the environment that the real YAML exports before
`ray start`, so the fake cluster runs with the same settings (token authentication, Tune's cap).
"""
import json
import math
import re
import shlex
from pathlib import Path

import yaml

FAKE_GPU = "fake_GPU"
# The fake provider registers its head under this node type, whatever the real head is called.
FAKE_HEAD_TYPE = "ray.head.default"
OBJECT_STORE_BYTES = 100 * 2**20


def load(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def fake_resources(resources: dict, scale: float) -> dict:
    """The resources a fake node of this type offers: CPUs * scale (at least 1 if any), GPUs as FAKE_GPU."""
    fake = {name: count for name, count in resources.items() if name not in ("CPU", "GPU")}
    cpus = resources.get("CPU", 0)
    fake["CPU"] = max(1, math.floor(cpus * scale)) if cpus else 0
    if resources.get("GPU"):
        fake[FAKE_GPU] = resources["GPU"]
    fake["object_store_memory"] = OBJECT_STORE_BYTES
    return fake


def fake_config(path: Path, *, gcs_address: str, idle_timeout_minutes: float, scale: float = 0.5) -> dict:
    """The fake-provider cluster config for the real cluster YAML at `path`, its head at `gcs_address`.

    The default scale gives a g5.xlarge's 4 CPUs as 2: room for a trial's trainer and GPU worker.
    """
    real = load(path)
    node_types = {}
    for name, node_type in real["available_node_types"].items():
        fake = {"resources": fake_resources(node_type["resources"], scale), "node_config": {}}
        fake.update({key: node_type[key] for key in ("min_workers", "max_workers") if key in node_type})
        node_types[FAKE_HEAD_TYPE if name == real["head_node_type"] else name] = fake
    return {
        "cluster_name": real["cluster_name"],
        "max_workers": real["max_workers"],
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": node_types,
        # The autoscaler reads this file as it is, without defaults (the fake provider's are missing
        # from the 2.60 wheel), and a key it looks up and misses stops it with an error that only its
        # log (monitor.err) shows: every top-level key is here, as in a full config.
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def head_start_args(config: dict) -> list[str]:
    """`ray start --head` options that give the fake head its node type's resources."""
    resources = dict(config["available_node_types"][FAKE_HEAD_TYPE]["resources"])
    args = [f"--num-cpus={resources.pop('CPU', 0)}", f"--object-store-memory={resources.pop('object_store_memory')}"]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    return args


def start_env(commands: list[str]) -> dict[str, str]:
    """The variables set by `export NAME=VALUE ...;` in a YAML's head or worker start commands."""
    env = {}
    for command in commands:
        for exported in re.findall(r"\bexport ([^;]+);", command):
            env.update(item.split("=", 1) for item in shlex.split(exported))
    return env
