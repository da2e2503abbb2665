"""Every private Ray and torch API in metamae/private_apis.py, exercised (or, where that takes a Ray Train
run, checked for what the project calls on it): after an upgrade, a failure here names the API that
moved and the version it was written against. The autoscaling coordinator's reservations run on the
session's local Ray (the Ray tier); the rest needs no Ray."""
import inspect
import os

import pytest
import ray
import torch
import torch.distributed as dist
from ray.train import ScalingConfig

from metamae import private_apis
from metamae.config import TrainConfig
from metamae.process import start_training

WRITTEN_AGAINST = f"(metamae/private_apis.py was written against Ray {private_apis.RAY_VERSION} and torch " \
                  f"{private_apis.TORCH_VERSION}; this is Ray {ray.__version__}, torch {torch.__version__})"


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_functional_collectives_sum_and_gather_with_gradients(one_process_group):
    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    summed = private_apis.all_reduce_sum(x)
    gathered = private_apis.all_gather_differentiable(x)
    assert torch.equal(summed, x.detach()) and torch.equal(gathered, x.detach()), WRITTEN_AGAINST
    (summed.sum() + 2 * gathered.sum()).backward()
    assert torch.equal(x.grad, torch.full((3, 2), 3.0)), f"torch.distributed._functional_collectives {WRITTEN_AGAINST}"


def test_compiled_code_can_draw_eager_modes_random_numbers():
    from torch._inductor import config
    before = config.fallback_random
    try:
        start_training(TrainConfig(compile=True))
        assert config.fallback_random is True, f"torch._inductor.config.fallback_random {WRITTEN_AGAINST}"
    finally:
        config.fallback_random = before


def test_train_v2s_callback_and_controller_have_what_the_sweep_calls():
    base = private_apis.train_callback_base()
    assert list(inspect.signature(base.after_report).parameters) == ["self", "run_context", "metrics", "checkpoint"], \
        f"ray.train.v2.api.callback.UserCallback.after_report {WRITTEN_AGAINST}"
    from ray.train.v2._internal.execution.context import TrainRunContext
    from ray.train.v2._internal.execution.controller import TrainController
    assert "run_id" in TrainRunContext.__dataclass_fields__, f"TrainRunContext.run_id {WRITTEN_AGAINST}"
    assert callable(getattr(TrainController, "abort", None)), f"TrainController.abort {WRITTEN_AGAINST}"


def test_a_scaling_configs_resources_per_worker():
    assert private_apis.resources_per_worker(ScalingConfig(num_workers=2)) == {"CPU": 1}, WRITTEN_AGAINST
    assert private_apis.resources_per_worker(ScalingConfig(num_workers=2, use_gpu=True)) == {"GPU": 1}
    assert private_apis.resources_per_worker(
        ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})) == {"CPU": 0.5}


def test_ray_ups_config_check_refuses_a_bad_cluster_yaml():
    with pytest.raises(Exception):
        private_apis.validate_cluster_config({"cluster_name": "x", "max_workers": "many"})


def test_the_autoscaling_coordinators_reservations(local_ray):
    name = f"{private_apis.TRAIN_RESERVATION_PREFIX}private-apis-{os.getpid()}"
    private_apis.reserve(name, [{"CPU": 0.1}], expire_after_s=60)
    assert name in private_apis.reservations(), f"the AutoscalingCoordinator's reservations {WRITTEN_AGAINST}"
    ray.get(private_apis.cancel_reservation(name))
    assert name not in private_apis.reservations(), WRITTEN_AGAINST
