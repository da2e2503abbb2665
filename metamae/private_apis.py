"""Every private Ray and torch API the project uses, and nothing else; the rest of the code calls these.

Written against Ray 2.60.0 and torch 2.13.0 (RAY_VERSION, TORCH_VERSION). An upgrade may move or
change any of them without notice: tests/test_private_apis.py exercises each one and, when one
breaks, fails naming it and the version it was written against. Ray is imported inside the
functions that use it, so that metamae's math and data code (which calls the torch ones) runs
without Ray; so are the functional collectives, which only a data-parallel run calls (their
import would cost every other process 65 ms). (One test also reads Ray's GCS tables directly to
explain a failure: tests/test_cluster.py's `_history`, a diagnostic.)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

RAY_VERSION = "2.60.0"
TORCH_VERSION = "2.13.0"
TRAIN_RESERVATION_PREFIX = "train-"    # Train reserves a run's workers as train-<run id> (Ray 2.60)


# ---- torch -----------------------------------------------------------------------------------------

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over the default process group, differentiable (the backward of a sum is a sum)."""
    import torch.distributed._functional_collectives as functional
    return functional.all_reduce(t, "sum", dist.group.WORLD)


def all_gather_differentiable(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` stacked along dim 0; the gradient of each slice goes back to its process."""
    import torch.distributed._functional_collectives as functional
    return functional.all_gather_single_autograd(t, 0, dist.group.WORLD)


def compiled_code_draws_eager_random() -> None:
    """Inductor's fallback_random (process-wide): compiled code draws from eager mode's random stream."""
    torch._inductor.config.fallback_random = True


# ---- Ray -------------------------------------------------------------------------------------------

def autoscaling_coordinator() -> Any:
    """The cluster's AutoscalingCoordinator, a detached actor (created here if there is none) with
    which Ray Train reserves a run's workers and Ray Data its pipelines' resources."""
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    return get_or_create_autoscaling_coordinator()


def reserve(name: str, bundles: list[dict[str, float]], expire_after_s: float) -> None:
    """Reserve resources with the autoscaling coordinator under `name`, as a Train run does its workers'."""
    import ray
    ray.get(autoscaling_coordinator().request_resources.remote(name, bundles, expire_after_s=expire_after_s))


def reservations(timeout_s: float = 30) -> list[str]:
    """The names of the reservations the autoscaling coordinator holds (the autoscaler keeps nodes for
    them); none where no coordinator was created yet (this creates none)."""
    import ray
    try:
        coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:
        return []
    return ray.get(coordinator.__ray_call__.remote(lambda actor: list(actor._ongoing_reqs)), timeout=timeout_s)


def cancel_reservation(name: str) -> Any:
    """Cancel a reservation with the autoscaling coordinator (cancelling one that ended does nothing);
    the returned ObjectRef is ready once it is done."""
    return autoscaling_coordinator().cancel_request.remote(name)


def train_callback_base() -> type:
    """Train V2's callback class: subclasses' after_report(run_context, metrics, checkpoint) runs in
    the run's controller after each report, with every worker's metrics."""
    from ray.train.v2.api.callback import UserCallback
    return UserCallback


def train_reservation(run_context: Any) -> str:
    """The name of a Train run's reservation with the autoscaling coordinator, from the run_context
    its callbacks receive."""
    return f"{TRAIN_RESERVATION_PREFIX}{run_context.run_id}"


def abort_train_run(controller: Any, timeout_s: float) -> None:
    """Abort a Train run through its controller (an actor), as Ctrl-C does: its workers end and their
    placement group is removed. Returns when it is done, or when the controller has exited or is stuck."""
    import ray
    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass


def resources_per_worker(scaling: Any) -> dict[str, float]:
    """What one worker of a ray.train.ScalingConfig asks for, its defaults filled in (a CPU, or a GPU)."""
    return {name: amount for name, amount in scaling._resources_per_worker_not_none.items() if amount > 0}


def validate_cluster_config(config: dict, fill_defaults: bool = True) -> None:
    """What `ray up` does to a cluster YAML before it starts anything: fill in the provider's defaults
    (a config that has them all, as the fake cluster's, skips that), then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(config) if fill_defaults else config)
