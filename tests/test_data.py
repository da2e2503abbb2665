"""The embedded digits, the synthetic generators, and loading a dataset from its config."""
import hydra
import numpy as np
import pytest
from omegaconf.errors import InterpolationResolutionError

from metamae.config import CONFIG_DIR, DatasetConfig, register, to_object
from metamae.data import load_dataset
from metamae.data.arrays import ArrayDataset, Split, batches, endless_batches
from metamae.data.converters import custom
from metamae.data.digits import digits
from metamae.data.synthetic import synthetic
from metamae.modality import ImageSpec, TabularSpec, TimeSeriesSpec, spec_from_dict, spec_to_dict
from metamae.model import ObjectiveConfig
from tests.conftest import SPECS


def test_digits_is_a_fixed_stratified_split_of_the_bundled_images():
    a, b = digits(), digits()
    assert a.train.x.shape == (1347, 1, 8, 8) and a.test.x.shape == (450, 1, 8, 8)
    assert np.array_equal(a.test.y, b.test.y) and np.array_equal(a.train.x, b.train.x)
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0
    train_share = np.bincount(a.train.y) / len(a.train.y)
    test_share = np.bincount(a.test.y) / len(a.test.y)
    assert np.abs(train_share - test_share).max() < 0.01


def test_synthetic_datasets_have_the_spec_shapes_and_learnable_classes(kind):
    from sklearn.linear_model import LogisticRegression
    data = synthetic(SPECS[kind], num_classes=3, train=300, test=150, seed=1)
    x = data.train.x
    parts = x if isinstance(x, tuple) else (x,)
    assert all(len(p) == 300 for p in parts) and len(data.test) == 150
    flat = lambda s: np.concatenate([p.reshape(len(p), -1) for p in (s.x if isinstance(s.x, tuple) else (s.x,))], 1)
    if kind == "tokens":                                   # bag of tokens
        flat = lambda s: np.stack([np.bincount(row, minlength=5) for row in s.x])
    if kind == "timeseries":                               # random phase: the spectrum tells the class
        flat = lambda s: np.abs(np.fft.rfft(s.x, axis=-1)).reshape(len(s.x), -1)
    clf = LogisticRegression(max_iter=2000).fit(flat(data.train), data.train.y)
    assert clf.score(flat(data.test), data.test.y) > 0.8


def test_batches_cover_a_split_once_and_shuffle_deterministically():
    split = Split(np.arange(10, dtype=np.float32)[:, None], np.arange(10))
    seen = np.concatenate([y.numpy() for _, y in batches(split, 3, drop_last=False)])
    assert seen.tolist() == list(range(10))
    one = [y.tolist() for _, y in batches(split, 3, np.random.default_rng(0))]
    two = [y.tolist() for _, y in batches(split, 3, np.random.default_rng(0))]
    assert one == two and len(one) == 3 and one != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_a_split_smaller_than_a_batch_is_a_clear_error():
    split = Split(np.zeros((5, 1, 3), np.float32), np.zeros(5, np.int64))
    small = ArrayDataset("small", TabularSpec(features=3), train=split, test=split)
    with pytest.raises(ValueError, match="'train' split of 'small' has fewer examples than one batch"):
        next(endless_batches(small, "train", 8, seed=0))


def test_specs_round_trip_and_name_bad_keys():
    for spec in SPECS.values():
        assert spec_from_dict(spec_to_dict(spec)) == spec
    with pytest.raises(ValueError, match="unknown: \\['chanels'\\]"):
        spec_from_dict({"kind": "timeseries", "chanels": 3, "length": 10, "patch": 2})
    with pytest.raises(ValueError, match="expected one of"):
        spec_from_dict({"kind": "video"})
    with pytest.raises(ValueError, match="patch 3 does not divide length 10"):
        TimeSeriesSpec(channels=1, length=10, patch=3)
    with pytest.raises(ValueError, match="patch 5 does not divide height 8"):
        ImageSpec(channels=1, height=8, width=8, patch=5)
    with pytest.raises(ValueError, match="input.patch is 2.7; expected a positive whole number"):
        spec_from_dict({"kind": "image", "channels": 1, "height": 8, "width": 8, "patch": 2.7})
    with pytest.raises(ValueError, match="input.features is 0"):
        spec_from_dict({"kind": "tabular", "features": 0})
    with pytest.raises(ValueError, match="input.features is 'many'"):
        spec_from_dict({"kind": "tabular", "features": "many"})
    with pytest.raises(ValueError, match="input is None; expected a mapping"):
        spec_from_dict(None)


def test_a_dataset_that_is_not_there_names_the_command_that_prepares_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"prepare genomics --raw RAW_DIR --out {tmp_path / 'genomics'}`"):
        load_dataset(DatasetConfig(name="genomics_ood", path=str(tmp_path / "genomics" / "ood")))
    with pytest.raises(FileNotFoundError, match=r"prepare custom \(--npz FILE"):
        load_dataset(DatasetConfig(name="custom", path=str(tmp_path)))


def test_digits_with_another_input_kind_is_a_clear_error():
    table = DatasetConfig(name="digits", source="digits", input={"kind": "tabular", "features": 64},
                          num_classes=10, metric="accuracy")
    with pytest.raises(ValueError, match="source=digits is 1 × 8 × 8 images of 10 classes, not tabular"):
        load_dataset(table)


def test_a_custom_dataset_names_its_runs_after_its_manifest(tmp_path):
    """configs/dataset/custom.yaml reads the name `prepare custom --name` wrote, before anything loads:
    the run folder (runs/${dataset.name}/...) is named with it."""
    x = np.random.default_rng(0).standard_normal((40, 4))
    custom.convert_arrays(x, np.arange(40) % 2, "tabular", tmp_path / "mine", name="my_data")
    register()
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = hydra.compose("pretrain", overrides=["dataset=custom", f"dataset.path={tmp_path / 'mine'}"])
        missing = hydra.compose("pretrain", overrides=["dataset=custom", f"dataset.path={tmp_path / 'none'}"])
    assert cfg.dataset.name == "my_data" and cfg.out_dir.startswith("runs/my_data/")
    assert to_object(cfg).dataset.name == "my_data"
    with pytest.raises(InterpolationResolutionError, match=r"none holds no manifest\.json.*prepare custom .*--name"):
        missing.dataset.name


def test_the_objective_starts_from_the_published_defaults_then_the_datasets_own_then_the_command_line():
    """ObjectiveConfig holds the published script's defaults; PAMAP2's dataset file names its own
    (configs/objective/pamap2.yaml: the published README's command); objective.KEY=VALUE wins over both."""
    register()
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        digits_cfg = to_object(hydra.compose("pretrain", overrides=["dataset=digits"]))
        pamap2 = hydra.compose("pretrain", overrides=["dataset=pamap2"])
        overridden = hydra.compose("pretrain", overrides=["dataset=pamap2", "objective.mask_ratio=0.7"])
    assert digits_cfg.objective == ObjectiveConfig()
    objective = pamap2.objective
    assert (objective.mask_ratio, objective.contrastive_weight, objective.inner_lr) == (0.85, 1.0, 0.5)
    assert objective.temperature == ObjectiveConfig().temperature
    assert (overridden.objective.mask_ratio, overridden.objective.contrastive_weight) == (0.7, 1.0)
