"""Typed configuration: the Hydra schema behind configs/.

Every YAML file under configs/ is checked against these dataclasses, so a misspelt key or a value
of the wrong type fails at start-up with a message that names it. The model and objective
dataclasses live beside the math they configure (metamae.model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from metamae.modality import Spec, spec_from_dict
from metamae.model import ModelConfig, ObjectiveConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Each dataset metric and whether a sweep maximises or minimises it (every one is better higher).
METRICS = {"accuracy": "max", "binary_accuracy": "max", "weighted_f1": "max", "auroc": "max", "spearman": "max",
           "pearson": "max"}
SOURCES = ("digits", "synthetic", "shards")
PROBES = ("converged", "paper")


@dataclass
class DatasetConfig:
    """One dataset: its modality, labels, metric and where the examples come from."""
    name: str = MISSING                # runs/NAME, sweeps/.../NAME; custom.yaml: ${manifest_name:${.path}}
    # For source=shards, input, num_classes and metric come from the folder's manifest when left out.
    input: Optional[Dict[str, Any]] = None   # a modality spec, e.g. {kind: image, channels: 1, ...}
    num_classes: Optional[int] = None  # 0 for regression; number of labels for multi-label
    metric: Optional[str] = None
    batch_size: int = 64
    per_token: bool = False            # one label per token (secondary structure)
    ignore_label: Optional[int] = None # a per-token label the probe leaves out (padding)
    pretrain_split: str = "train"
    probe_train_split: str = "train"   # DABS evaluates some datasets on a transfer portion
    probe_validation_split: Optional[str] = None   # the probe's choices; None: carved from probe_train_split
    probe_test_split: str = "test"
    source: str = "shards"             # digits | synthetic | shards
    path: Optional[str] = None         # the shard folder, for source=shards; made absolute (Ray moves cwd)

    def __post_init__(self):
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"dataset.metric is {self.metric!r}; expected one of {list(METRICS)}")
        if self.source not in SOURCES:
            raise ValueError(f"dataset.source is {self.source!r}; expected one of {list(SOURCES)}")
        if self.batch_size < 1:
            raise ValueError(f"dataset.batch_size is {self.batch_size}; expected >= 1")
        if self.probe_validation_split in (self.probe_train_split, self.probe_test_split):
            raise ValueError(f"dataset.probe_validation_split is {self.probe_validation_split!r}, which is also the "
                             f"probe's training or test split: the probe and the sweep choose on it, so it must be "
                             f"a split of its own (or null: a part carved from {self.probe_train_split!r})")
        if self.path:          # Ray Train workers and Tune trials run in folders of their own
            self.path = str(Path(self.path).expanduser().absolute())

    def spec(self) -> Spec:
        if self.input is None:
            raise ValueError(f"dataset {self.name!r} has no input spec: set dataset.input, or point "
                             f"dataset.path at a prepared folder")
        return spec_from_dict(self.input)


@dataclass
class TrainConfig:
    """Pretraining: AdamW as in the paper."""
    steps: int = 5000                  # configs/train/paper.yaml: the paper's 100k at lr 1e-4
    lr: float = 1e-3                   # the tiny model on digits; the paper: 1e-4 (train=paper)
    weight_decay: float = 1e-4
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    threads: Optional[int] = None      # torch intra-op threads; None leaves torch's default
    device: str = "cpu"
    compile: bool = False              # torch.compile the loss; the first step compiles (~2 min on 2 CPUs)

    def __post_init__(self):
        for key in ("steps", "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} is {getattr(self, key)}; expected >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"train.lr={self.lr}, train.weight_decay={self.weight_decay}: expected lr > 0 and "
                             f"weight_decay >= 0")


@dataclass
class ExecutionConfig:
    """How a run executes: in one process or as Ray Train workers; devices, checkpoints, failures and
    the online probe (none of which changes what is trained: that is RunRecipe's)."""
    ray: bool = True                   # false: the loop in this one process, without Ray
    num_workers: int = 1               # data-parallel workers; each gets batch_size / num_workers
    use_gpu: bool = False
    cpus_per_worker: float = 0.5       # four one-worker sweep trials at once on 2 CPUs
    bf16: bool = False                 # bfloat16 autocast; GPUs only (not run on the CPU test machine)
    probe_every: int = 500             # the online probe every M steps (0: only at the end)
    probe_examples: int = 500          # examples the online probe fits on (and as many it scores)
    keep_checkpoints: int = 2          # the K latest; the best by the online probe is kept beside them
    max_failures: int = 2              # worker failures recovered from the latest checkpoint
    check_resources: bool = True       # refuse a request the cluster cannot hold; false where it autoscales
    storage: Optional[str] = None      # where checkpoints persist (local folder or pyarrow URI); None: out_dir
    progress_bars: bool = False        # Ray Data's progress bars for streamed shards (hundreds of lines a run)

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"execution.num_workers is {self.num_workers}; expected >= 1")
        if self.bf16 and not self.use_gpu:
            raise ValueError("execution.bf16 is for GPU runs: set execution.use_gpu=true, or leave it false on CPUs")


@dataclass
class ProbeConfig:
    """Linear evaluation (metamae.linear_eval), the same in pretrain, evaluate and the sweep.

    converged (configs/probe/converged.yaml, the default): logistic regression (ridge for real
    targets) on standardised features, fitted to convergence at each strength of `l2` and chosen on
    the validation split. paper (configs/probe/paper.yaml): a linear head trained with Adam for
    `epochs` epochs at `lr` and `weight_decay`, as in the paper.
    """
    method: str = "converged"          # converged | paper
    l2: List[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0])
    max_iter: int = 1000               # the converged probe's solver iterations
    validation_fraction: float = 0.2   # of the probe's training split, where the dataset has no validation split
    epochs: int = 100                  # the paper's probe: Adam, lr 1e-4, weight decay 1e-4, 100 epochs
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: Optional[int] = None   # None: the dataset's batch size
    seed: int = 0                      # the validation split and the paper probe's initialisation

    def __post_init__(self):
        if self.method not in PROBES:
            raise ValueError(f"probe.method is {self.method!r}; expected one of {list(PROBES)} (probe=paper)")
        if not self.l2 or min(self.l2) <= 0 or self.max_iter < 1 or not 0 < self.validation_fraction < 1:
            raise ValueError(f"probe.l2={list(self.l2)}, probe.max_iter={self.max_iter}, probe.validation_fraction="
                             f"{self.validation_fraction}: expected L2 strengths > 0, max_iter >= 1 and "
                             f"0 < validation_fraction < 1")
        if self.epochs < 1 or self.lr <= 0 or self.weight_decay < 0 or (self.batch_size is not None
                                                                         and self.batch_size < 1):
            raise ValueError(f"probe.epochs={self.epochs}, probe.lr={self.lr}, probe.weight_decay="
                             f"{self.weight_decay}, probe.batch_size={self.batch_size}: expected epochs >= 1, "
                             f"lr > 0, weight_decay >= 0 and batch_size >= 1 (or null)")


@dataclass
class ExperimentConfig:
    """One pretraining and its evaluation: what a run, or a sweep's trial, is made of."""
    dataset: DatasetConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


@dataclass
class PretrainConfig(ExperimentConfig):
    out_dir: str = MISSING             # run folder: checkpoints, TensorBoard events, results
    baselines: bool = False            # also pretrain MAE and probe a random-init encoder and the raw inputs


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    dataset: Optional[DatasetConfig] = None    # None: the dataset the checkpoint was pretrained on
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    out_dir: str = MISSING


def manifest_name(path: Optional[str]) -> str:
    """The name in the manifest of the prepared folder `path`: the resolver ${manifest_name:PATH},
    with which configs/dataset/custom.yaml names runs and sweeps after the dataset."""
    from metamae.data.load import prepare_command  # metamae.data imports this module
    from metamae.data.shards import MANIFEST, Manifest
    if path is None:
        raise ValueError(f"dataset.path is not set: point it at a folder prepared with "
                         f"`{prepare_command('custom', Path('DIR'))}`")
    folder = Path(path).expanduser()
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"dataset.path={path} holds no {MANIFEST}, which names the dataset: prepare the "
                                f"folder with `{prepare_command('custom', folder)}`, or point dataset.path at a "
                                f"prepared folder")
    return Manifest.load(folder).name


def register() -> None:
    OmegaConf.register_new_resolver("manifest_name", manifest_name, replace=True)
    store = ConfigStore.instance()
    store.store(name="pretrain_schema", node=PretrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
    store.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    store.store(group="model", name="model_schema", node=ModelConfig)
    store.store(group="train", name="train_schema", node=TrainConfig)
    store.store(group="probe", name="probe_schema", node=ProbeConfig)


def to_object(cfg: DictConfig):
    """DictConfig -> the typed dataclasses, running their validation."""
    return OmegaConf.to_object(cfg)
