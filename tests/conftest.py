"""Shared fixtures: tiny models of every modality kind, in float64 where gradients are checked; the
session's local Ray; and the test tiers (pyproject.toml's markers): a test that uses a Ray fixture is
marked with its tier here, and a test that starts a Ray some other way is marked where it is defined."""
from dataclasses import replace

import pytest
import torch

from metamae.modality import ImageSpec, ImageTextSpec, TabularSpec, TimeSeriesSpec, TokenSpec
from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig
from metamae.process import start_command

TINY = ModelConfig(enc_width=16, enc_depth=2, enc_heads=2, dec_width=8, dec_depth=1, dec_heads=2,
                   dropout=0.0, projector_dim=8)

SPECS = {
    "timeseries": TimeSeriesSpec(channels=3, length=24, patch=3),
    "tabular": TabularSpec(features=7),
    "tokens": TokenSpec(vocab=5, length=10),
    "image": ImageSpec(channels=2, height=8, width=8, patch=2),
    "image_text": ImageTextSpec(image=ImageSpec(channels=1, height=4, width=4, patch=2),
                                text=TokenSpec(vocab=6, length=5)),
}


def random_batch(spec, batch: int, generator: torch.Generator, dtype=torch.float32):
    """A batch of the right shape for `spec`; token ids for token parts."""
    if spec.kind == "timeseries":
        return torch.randn(batch, spec.channels, spec.length, generator=generator, dtype=dtype)
    if spec.kind == "tabular":
        return torch.randn(batch, 1, spec.features, generator=generator, dtype=dtype)
    if spec.kind == "tokens":
        return torch.randint(spec.vocab, (batch, spec.length), generator=generator)
    if spec.kind == "image":
        return torch.randn(batch, spec.channels, spec.height, spec.width, generator=generator, dtype=dtype)
    return (random_batch(spec.image, batch, generator, dtype), random_batch(spec.text, batch, generator, dtype))


def tiny_model(kind: str, dtype=torch.float64, seed: int = 0, dropout: float = 0.0, **objective) -> MetaMAE:
    torch.manual_seed(seed)
    return MetaMAE(SPECS[kind], replace(TINY, dropout=dropout), ObjectiveConfig(**objective)).to(dtype)


@pytest.fixture(scope="session")
def shared_ray():
    """Ends the local Ray that `local_ray` starts once and every module that asks for it shares."""
    yield
    import ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(request, shared_ray):
    """The session's local Ray of 2 CPUs, started as a command starts it (metamae.process) on first use;
    the module's functions are unpickled by value on its workers, which cannot import a test module.
    (A test that needs a Ray of other settings shuts this one down first; the next module starts it again.)"""
    import ray
    from ray import cloudpickle
    if not ray.is_initialized():
        start_command()
        ray.init(num_cpus=2, log_to_driver=False)
    cloudpickle.register_pickle_by_value(request.module)
    yield


@pytest.fixture(params=sorted(SPECS))
def kind(request):
    return request.param


TIER_OF_FIXTURE = {"local_ray": "ray", "head": "cluster", "fake_cluster": "cluster"}


def pytest_collection_modifyitems(items):
    for item in items:
        for fixture, tier in TIER_OF_FIXTURE.items():
            if fixture in item.fixturenames:
                item.add_marker(tier)
