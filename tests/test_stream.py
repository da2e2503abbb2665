"""Ray Data streaming of shards: every row decoded, seeded order, bad shards refused, and no
deadlock inside Tune trials that reserve CPUs for training (ray-project/ray#29662)."""
import sys

import numpy as np
import pytest
import ray
import torch
from ray import cloudpickle, tune

from metamae.data.converters import custom
from metamae.data.shards import ShardDataset, ShardError, ShardWriter
from metamae.data.synthetic import synthetic
from metamae.distributed.stream import RayShardDataset, StreamConfig, read_split
from tests.conftest import SPECS


def prepare(folder, kind="image", train=300, test=50):
    data = synthetic(SPECS[kind], num_classes=3, train=train, test=test)
    writer = ShardWriter(folder, data.name, data.spec, 3, "accuracy", shard_bytes=40_000, progress=False)
    writer.add("train", data.train.x, data.train.y)
    writer.add("test", data.test.x, data.test.y)
    writer.finish()
    return data


def image_rows(x, kind):
    return x if kind == "image" else x[0]


@pytest.mark.parametrize("kind", ["image", "image_text"])
def test_ray_data_streams_every_row_decoded_in_a_seeded_order(local_ray, tmp_path, kind):
    data = prepare(tmp_path, kind)
    stream = RayShardDataset(tmp_path, StreamConfig(shuffle_buffer=64, cpu_limit=1))
    image = lambda x: (x if kind == "image" else x[0]).numpy()
    label_of = {row.tobytes(): label for row, label in zip(image_rows(data.train.x, kind), data.train.y)}
    seen = [(row.tobytes(), label) for x, y in stream.stream("train", 32) for row, label in zip(image(x), y.tolist())]
    assert sorted(label_of[row] for row, _ in seen) == sorted(data.train.y.tolist())   # every row, decoded
    assert all(label_of[row] == label for row, label in seen)                            # with its label
    if kind == "image_text":
        x, _ = next(iter(stream.stream("train", 32)))
        assert x[1].dtype == torch.int64 and x[1].shape == (32, SPECS[kind].text.length)
    labels = lambda seed: np.concatenate([y.numpy() for _, y in stream.stream("train", 32, seed=seed)])
    assert sorted(labels(0).tolist()) == sorted(data.train.y.tolist())
    assert np.array_equal(labels(0), labels(0)) and not np.array_equal(labels(0), labels(1))
    assert all(len(y) == 32 for _, y in stream.stream("train", 32, seed=0, drop_last=True))


def test_a_streams_settings_are_its_own_and_its_progress_bars_are_off_unless_asked_for(local_ray, tmp_path):
    prepare(tmp_path)
    process = ray.data.DataContext.get_current()
    before = (process.enable_progress_bars, process.execution_options.preserve_order,
              process.execution_options.resource_limits.cpu)
    quiet = read_split(tmp_path, "train", StreamConfig(cpu_limit=1), seed=0)
    shown = read_split(tmp_path, "train", StreamConfig(progress_bars=True))
    assert not quiet.context.enable_progress_bars and shown.context.enable_progress_bars
    assert quiet.context.execution_options.preserve_order and not shown.context.execution_options.preserve_order
    assert quiet.context.execution_options.resource_limits.cpu == 1
    assert (process.enable_progress_bars, process.execution_options.preserve_order,
            process.execution_options.resource_limits.cpu) == before
    assert quiet.count() == 300


def test_a_corrupt_shard_is_refused_before_streaming_starts(local_ray, tmp_path):
    prepare(tmp_path)
    victim = sorted(tmp_path.glob("train-*.parquet"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ShardError, match=victim.name):
        RayShardDataset(tmp_path)


def test_ray_data_reads_inputs_standardised_as_the_local_reader_does(local_ray, tmp_path):
    """Features on wildly different scales read back with the train split's mean 0 and std 1, and
    the test split with the train split's statistics, through both readers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3)) * [1, 1e4, 0.01] + [0, 500, -3]
    custom.convert_arrays(x, np.arange(300) % 2, "tabular", tmp_path, name="wild")
    ray_data, local = RayShardDataset(tmp_path, StreamConfig(cpu_limit=1)), ShardDataset(tmp_path)
    read = lambda dataset, split: np.concatenate([x.numpy()[:, 0] for x, _ in dataset.stream(split, 64)])
    train = read(ray_data, "train")
    np.testing.assert_allclose(train.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(train.std(axis=0), 1, rtol=1e-4)
    for split in ("train", "test"):               # the same rows, maybe in another order
        np.testing.assert_array_equal(np.sort(read(ray_data, split), axis=0), np.sort(read(local, split), axis=0))
    assert np.abs(read(ray_data, "test").mean(axis=0)).min() > 1e-3


def stream_in_a_trial(config):
    """A Tune trial that reads shards through Ray Data (sent to the workers by value, see below)."""
    stream = RayShardDataset(config["folder"], StreamConfig(task_cpus=0.25, cpu_limit=1))
    rows = sum(len(y) for _, y in stream.stream("train", 32, seed=config["seed"]))
    tune.report({"rows": rows})


def test_ray_data_keeps_running_inside_tune_trials_that_reserve_cpus(local_ray, tmp_path):
    prepare(tmp_path)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import a test module
    trainable = tune.with_resources(stream_in_a_trial, {"cpu": 0.5})    # as trainers do: CPU left for data
    tuner = tune.Tuner(trainable, param_space={"folder": str(tmp_path), "seed": tune.grid_search([0, 1])},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    assert not results.errors
    assert [r.metrics["rows"] for r in results] == [300, 300]
