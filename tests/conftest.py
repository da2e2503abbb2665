"""Shared fixtures: tiny models of every modality kind, in float64 where gradients are checked."""
from dataclasses import replace

import pytest
import torch

from metamae.model import MetaMAE, ModelConfig, ObjectiveConfig
from metamae.modality import ImageSpec, ImageTextSpec, TabularSpec, TimeSeriesSpec, TokenSpec

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


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray of 2 CPUs for a test module, whose functions its workers unpickle by value (they
    cannot import a test module)."""
    import ray
    from ray import cloudpickle
    ray.init(num_cpus=2, log_to_driver=False)
    cloudpickle.register_pickle_by_value(request.module)
    yield
    ray.shutdown()


@pytest.fixture(params=sorted(SPECS))
def kind(request):
    return request.param
