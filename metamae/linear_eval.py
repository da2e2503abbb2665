"""Linear evaluation: one probe on frozen features, for pretrain, evaluate, the sweep and its baselines.

    features    the frozen encoder's (the mean of its output tokens without cls; per token for
                per-token tasks), or the raw inputs, flattened, tokens one-hot (the raw-input baseline)
    splits      fit on the probe's training split less a validation part (or the dataset's own
                validation split), choose on validation, score on test, which chooses nothing
    probe       converged (default): L2-regularised logistic regression (ridge for real targets) on
                features standardised with the fit part's statistics, its L2 strength chosen on
                validation; paper (probe=paper): a linear head trained with Adam (lr 1e-4, weight
                decay 1e-4, 100 epochs), as in the paper

Scores use the dataset's metric, computed by scikit-learn or scipy from the probe's predictions,
which are kept so that two probes can be compared example by example (`paired_bootstrap`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier

from metamae.config import DatasetConfig, ProbeConfig
from metamae.data.arrays import Split, batches
from metamae.modality import Spec, spec_parts, to_device
from metamae.model import MetaMAE

CLASS_METRICS = ("accuracy", "weighted_f1", "binary_accuracy")     # one class index per example
MAX_RAW_FEATURES = 50_000     # raw inputs with more features per row are not probed (MSCOCO's: 1.1 M)
REGRESSION_METRICS = ("spearman", "pearson")


@dataclass
class Features:
    """Rows of features with their labels; `example` is each row's example (rows are tokens for
    per-token tasks), so that a validation part is carved by example."""
    x: np.ndarray          # rows × D, float32
    y: np.ndarray          # rows (class, float) or rows × labels
    example: np.ndarray    # rows

    def rows(self, keep: np.ndarray) -> "Features":
        return Features(self.x[keep], self.y[keep], self.example[keep])


PREDICTIONS = "test_predictions.npz"    # a probe's test predictions, beside its results


@dataclass
class Predictions:
    """A probe's test predictions (what `score` reads), the labels, and each row's example: rows
    are tokens for per-token tasks, and a paired bootstrap resamples whole examples."""
    predictions: np.ndarray
    labels: np.ndarray
    examples: np.ndarray

    def save(self, file) -> None:
        """To a path (its folder made) or an open binary file (a bucket's stream)."""
        if isinstance(file, (str, Path)):
            Path(file).parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, predictions=self.predictions, labels=self.labels, examples=self.examples)

    @classmethod
    def load(cls, path: Path) -> "Predictions":
        with np.load(path) as saved:
            return cls(saved["predictions"], saved["labels"], saved["examples"])


@dataclass
class ProbeResult:
    """One probe's scores, each on a named split, and its test predictions."""
    metric: str
    method: str            # the probe: converged or paper
    validation: float      # what a sweep chooses on
    test: float            # reported, never chosen on
    train: float           # the fit part's own score
    splits: dict[str, str]                 # fit / validation / test: which examples each score is on
    l2: Optional[float] = None             # the L2 strength chosen on validation (converged probe)
    converged: Optional[bool] = None       # the chosen fit stopped before its iteration cap (converged probe)
    test_predictions: Optional[Predictions] = field(default=None, repr=False)

    def summary(self) -> dict:
        """The scores and splits, as JSON-able values."""
        return {"metric": self.metric, "method": self.method, "validation": self.validation, "test": self.test,
                "train": self.train, "splits": self.splits, "l2": self.l2, "converged": self.converged}


# --------------------------------------------------------------------------------------------
# Features: the frozen encoder's, or the raw inputs'
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def features(transform: Callable, data, split: str, batch_size: int, per_token: bool = False,
             ignore_label: Optional[int] = None, max_batches: Optional[int] = None) -> Features:
    """transform(batch) -> B × D (or B × L × D per token) over one split, in the split's order, without
    the tokens labelled `ignore_label`; of the split's first `max_batches` batches if given."""
    xs, ys, examples, seen = [], [], [], 0
    for x, y in islice(data.stream(split, batch_size), max_batches):
        f = transform(x)
        example = torch.arange(seen, seen + len(y))
        seen += len(y)
        if per_token:
            example = example[:, None].expand(y.shape)
            f, y, example = f.reshape(-1, f.shape[-1]), y.reshape(-1), example.reshape(-1)
        if ignore_label is not None:
            keep = y != ignore_label
            f, y, example = f[keep], y[keep], example[keep]
        xs.append(f.float().cpu())
        ys.append(y)
        examples.append(example)
    if not xs:
        raise ValueError(f"the {split!r} split of {data.name!r} has no examples to probe")
    return Features(torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(examples).numpy())


def encoder_features(model: MetaMAE, data, split: str, batch_size: int, per_token: bool = False,
                     ignore_label: Optional[int] = None, max_batches: Optional[int] = None) -> Features:
    """The frozen encoder's features of one split (no masking, dropout off)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return features(lambda x: model.features(to_device(x, device), per_token=per_token), data, split,
                        batch_size, per_token, ignore_label, max_batches)
    finally:
        model.train(was_training)


def raw_inputs(spec: Spec, x, per_token: bool = False) -> torch.Tensor:
    """The inputs themselves as features: values flattened, tokens one-hot (B × D, or B × L × V per token)."""
    parts = x if isinstance(x, tuple) else (x,)
    columns = []
    for part, part_spec in zip(parts, spec_parts(spec)):
        if part_spec.kind == "tokens":
            one_hot = F.one_hot(part, part_spec.vocab).float()                  # B × L × V
            columns.append(one_hot if per_token else one_hot.flatten(1))
        else:
            columns.append(part.float().flatten(1))
    return torch.cat(columns, dim=-1)


# --------------------------------------------------------------------------------------------
# Splits: fit, validation, test
# --------------------------------------------------------------------------------------------

def stratifies(dataset: DatasetConfig) -> bool:
    """Whether the carved validation part keeps the classes' proportions: one class per example."""
    return dataset.metric in CLASS_METRICS and not dataset.per_token


def carve_validation(train: Features, stratify: bool, fraction: float, seed: int) -> tuple[Features, Features]:
    """(fit, validation): a seeded `fraction` of the training examples (all the tokens of an example go
    the same way), stratified by class if `stratify` and every class has two examples."""
    examples, first = np.unique(train.example, return_index=True)
    labels = train.y[first]
    held_out = len(examples) * fraction
    if held_out < 1 or len(examples) - held_out < 1:
        raise ValueError(f"{len(examples)} training examples are too few to hold out probe.validation_fraction="
                         f"{fraction} of them for validation")
    try:
        _, validation = train_test_split(examples, test_size=fraction, random_state=seed,
                                         stratify=labels if stratify else None)
    except ValueError:               # a class of one example, or fewer held out than classes: unstratified
        _, validation = train_test_split(examples, test_size=fraction, random_state=seed)
    in_validation = np.isin(train.example, validation)
    return train.rows(~in_validation), train.rows(in_validation)


def split_names(dataset: DatasetConfig, cfg: ProbeConfig) -> dict[str, str]:
    """Which examples the probe is fitted on, chooses on and is tested on, in words."""
    if dataset.probe_validation_split:
        names = {"fit": dataset.probe_train_split, "validation": dataset.probe_validation_split}
    else:
        percent = f"{cfg.validation_fraction:.0%}"
        names = {"fit": f"{dataset.probe_train_split} less its validation {percent}",
                 "validation": f"{percent} of {dataset.probe_train_split} (seed {cfg.seed}"
                               + (", stratified by class where possible)" if stratifies(dataset) else ")")}
    return {**names, "test": dataset.probe_test_split}


def probe_splits(feature_fn: Callable[[str], Features], dataset: DatasetConfig,
                 cfg: ProbeConfig) -> dict[str, Features]:
    """The fit, validation and test features (split_names says which examples each holds)."""
    train = feature_fn(dataset.probe_train_split)
    test = feature_fn(dataset.probe_test_split)
    if dataset.probe_validation_split:
        validation = feature_fn(dataset.probe_validation_split)
    else:
        train, validation = carve_validation(train, stratifies(dataset), cfg.validation_fraction, cfg.seed)
    return {"fit": train, "validation": validation, "test": test}


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def decide(metric: str, outputs: np.ndarray) -> np.ndarray:
    """A linear head's outputs -> predictions: classes, 0/1 for binary, scores for AUROC, values."""
    if metric in ("accuracy", "weighted_f1"):
        return outputs.argmax(axis=1)
    if metric == "binary_accuracy":
        return (outputs.reshape(-1) > 0).astype(np.int64)
    return outputs if metric == "auroc" else outputs.reshape(-1)


def score(metric: str, predictions: np.ndarray, y: np.ndarray) -> float:
    """The dataset's metric of predictions (from `decide`, or a fitted probe's) against labels; AUROC
    averages over the labels that have both classes among these rows (NaN if none has)."""
    if metric == "accuracy" or metric == "binary_accuracy":
        return float(accuracy_score(y, predictions))
    if metric == "weighted_f1":
        return float(f1_score(y, predictions, average="weighted"))
    if metric == "auroc":
        both = (y.min(axis=0) == 0) & (y.max(axis=0) == 1)
        return float(roc_auc_score(y[:, both], predictions[:, both], average="macro")) if both.any() else math.nan
    correlation = spearmanr if metric == "spearman" else pearsonr
    return float(correlation(predictions.reshape(-1), y.reshape(-1))[0])


def paired_bootstrap(metric: str, a: np.ndarray, b: np.ndarray, y: np.ndarray, examples: Optional[np.ndarray] = None,
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """score(a) - score(b) on the same test rows, and its `level` percentile interval over `resamples`
    resamples of the test examples (paired: both predictions of a row stay together; the rows of one
    example, its tokens, go together). Resamples whose score is undefined are left out."""
    if not (len(a) == len(b) == len(y)):
        raise ValueError(f"paired predictions need the same rows: {len(a)}, {len(b)} and {len(y)} labels")
    rng = np.random.default_rng(seed)
    if examples is None or len(np.unique(examples)) == len(y):
        draw = lambda: rng.integers(0, len(y), len(y))                              # noqa: E731
    else:
        _, inverse = np.unique(examples, return_inverse=True)
        members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        draw = lambda: np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])  # noqa: E731
    if metric in ("accuracy", "binary_accuracy"):        # a mean over rows: resample the rows' differences
        difference = (a == y).astype(np.float64) - (b == y)
        gains = [difference[draw()].mean() for _ in range(resamples)]
    else:
        gains = []
        for _ in range(resamples):
            rows = draw()
            gains.append(score(metric, a[rows], y[rows]) - score(metric, b[rows], y[rows]))
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(gains, [tail, 100 - tail]) if not np.isnan(gains).all() else (math.nan, math.nan)
    return score(metric, a, y) - score(metric, b, y), float(low), float(high)


# --------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------

def standardise(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array standardised with the fit part's per-feature mean and std (MAE's probe: a BatchNorm
    without affine), in float64; constant features are only centred."""
    mean, std = fit.mean(0), fit.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    return [((part - mean) / std).astype(np.float64) for part in (fit, *others)]


def converged_model(metric: str, l2: float, max_iter: int, seed: int):
    """L2 logistic regression (one per label for multi-label) or ridge regression, penalty `l2` on the summed loss."""
    if metric in REGRESSION_METRICS:
        return Ridge(alpha=l2)
    logistic = LogisticRegression(C=1.0 / l2, max_iter=max_iter, random_state=seed)
    return OneVsRestClassifier(logistic) if metric == "auroc" else logistic


def predict(model, metric: str, x: np.ndarray, labels: int) -> np.ndarray:
    """A fitted model's predictions; for AUROC each of the `labels` labels' probability (one label
    is fitted as a binary task, whose probabilities come as two columns)."""
    if metric == "auroc":
        return model.predict_proba(x)[:, -labels:]
    return model.predict(x)


def fit_converged(x: dict[str, np.ndarray], parts: dict[str, Features], metric: str, cfg: ProbeConfig):
    """Fit on the fit part at every L2 strength of cfg.l2 (weakest last); keep the best on validation
    (on a tie, the stronger; an undefined score never wins). Returns (predictor, l2, converged)."""
    y = parts["fit"].y
    labels = y.shape[1] if metric == "auroc" else 1
    y = y.ravel() if y.ndim == 2 and labels == 1 else y            # one label: a binary task
    best = None
    for l2 in sorted(cfg.l2, reverse=True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = converged_model(metric, l2, cfg.max_iter, cfg.seed).fit(x["fit"], y)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        value = score(metric, predict(model, metric, x["validation"], labels), parts["validation"].y)
        value = -math.inf if math.isnan(value) else value
        if best is None or value > best[0]:
            best = (value, model, l2, converged)
    _, model, l2, converged = best
    return (lambda features: predict(model, metric, features, labels)), l2, converged


def probe_loss(metric: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if metric in ("accuracy", "weighted_f1"):
        return F.cross_entropy(out, y)
    if metric in ("binary_accuracy", "auroc"):
        return F.binary_cross_entropy_with_logits(out.reshape(y.shape), y.float())
    return F.mse_loss(out.reshape(-1), y.float())                          # regression


def head_outputs(metric: str, num_classes: int) -> int:
    """Classes for multi-class metrics; one logit for binary and regression; one per label for AUROC."""
    return num_classes if metric in ("accuracy", "weighted_f1", "auroc") else 1


def fit_paper(x_fit: np.ndarray, y_fit: np.ndarray, metric: str, num_classes: int, cfg: ProbeConfig,
              batch_size: int):
    """The paper's probe: a linear head on the standardised features, Adam for cfg.epochs epochs.
    Returns a function from features to predictions."""
    torch.manual_seed(cfg.seed)
    head = nn.Linear(x_fit.shape[1], head_outputs(metric, num_classes)).double()
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    fit = Split(x_fit, y_fit)
    for _ in range(cfg.epochs):
        for x, y in batches(fit, min(batch_size, len(fit)), rng):
            optimizer.zero_grad()
            probe_loss(metric, head(x), y).backward()
            optimizer.step()
    head.requires_grad_(False)
    return lambda features: decide(metric, head(torch.from_numpy(features)).numpy())


def probe(feature_fn: Callable[[str], Features], dataset: DatasetConfig, cfg: ProbeConfig) -> ProbeResult:
    """Fit the probe cfg.method names on the features feature_fn(split) gives; score it on every split."""
    metric = dataset.metric
    parts = probe_splits(feature_fn, dataset, cfg)
    x = dict(zip(parts, standardise(*(part.x for part in parts.values()))))
    l2 = converged = None
    if cfg.method == "converged":
        predictor, l2, converged = fit_converged(x, parts, metric, cfg)
    else:
        predictor = fit_paper(x["fit"], parts["fit"].y, metric, dataset.num_classes, cfg,
                              cfg.batch_size or dataset.batch_size)
    predictions = {name: predictor(features) for name, features in x.items()}
    scores = {name: score(metric, predictions[name], parts[name].y) for name in parts}
    return ProbeResult(metric, cfg.method, validation=scores["validation"], test=scores["test"], train=scores["fit"],
                       splits=split_names(dataset, cfg), l2=l2, converged=converged,
                       test_predictions=Predictions(predictions["test"], parts["test"].y, parts["test"].example))


def linear_probe(model: MetaMAE, data, dataset: DatasetConfig, cfg: ProbeConfig) -> ProbeResult:
    """Linear evaluation of the frozen encoder."""
    batch_size = cfg.batch_size or dataset.batch_size
    return probe(lambda split: encoder_features(model, data, split, batch_size, dataset.per_token,
                                                dataset.ignore_label), dataset, cfg)


def raw_feature_count(spec: Spec, per_token: bool = False) -> int:
    """The raw inputs' features per row: values, or a one-hot vector per token."""
    count = 0
    for part in spec_parts(spec):
        if part.kind == "tokens":
            count += part.vocab * (1 if per_token else part.length)
        else:
            count += int(np.prod(part.shape))
    return count


def raw_input_probe(data, dataset: DatasetConfig, cfg: ProbeConfig) -> ProbeResult:
    """The same probe on the raw inputs (flattened; tokens one-hot): what pretraining should beat.
    Raises ValueError for inputs of more than MAX_RAW_FEATURES features a row, too many to hold."""
    features_per_row = raw_feature_count(data.spec, dataset.per_token)
    if features_per_row > MAX_RAW_FEATURES:
        raise ValueError(f"the raw inputs of {data.name!r} have {features_per_row:,} features a row (tokens "
                         f"one-hot), over the {MAX_RAW_FEATURES:,} a linear probe on them can hold here")
    batch_size = cfg.batch_size or dataset.batch_size
    return probe(lambda split: features(lambda x: raw_inputs(data.spec, x, dataset.per_token), data, split,
                                        batch_size, dataset.per_token, dataset.ignore_label), dataset, cfg)


# --------------------------------------------------------------------------------------------
# The online probe, for early stopping
# --------------------------------------------------------------------------------------------

def ridge_targets(metric: str, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels as regression targets: one-hot classes, ±1 for binary, the labels for multi-label."""
    if metric in ("accuracy", "weighted_f1"):
        return F.one_hot(y, num_classes).double()
    if metric == "binary_accuracy":
        return (2.0 * y.double() - 1.0).reshape(-1, 1)
    return y.double().reshape(len(y), -1)


@dataclass
class OnlineProbe:
    score: float            # the held-out examples' metric
    feature_spread: float   # mean per-dimension std over examples / the features' RMS; near 0: collapse


def feature_spread(x: torch.Tensor) -> float:
    """How much the features differ between examples, relative to their size: the median over
    dimensions of the std across examples, over the root mean square of all features. Near 0 when
    every example maps to (nearly) the same vector: a collapsed encoder. (Mean-pooled tokens share
    their positions' part, so a healthy encoder reads about 0.01 on the digits.)"""
    rms = x.pow(2).mean().sqrt()
    return float(x.std(0).median() / rms) if rms > 0 else 0.0


def online_probe(model: MetaMAE, data, dataset: DatasetConfig, examples: int, l2: float = 1e-2) -> OnlineProbe:
    """A fast probe that tracks linear evaluation during pretraining, for early stopping.

    Closed-form ridge regression of the labels on the standardised features of `examples` examples
    of the probe's training split, scored with the dataset's metric on the `examples` after them:
    held out from the fit, and never the test split that the final evaluation reports.
    """
    batch_size = dataset.batch_size
    found = encoder_features(model, data, dataset.probe_train_split, batch_size, dataset.per_token,
                             dataset.ignore_label, max_batches=-(-2 * examples // batch_size))
    x, y = torch.from_numpy(found.x).double(), torch.from_numpy(found.y)
    n = len(y) // 2                                   # rows: examples, or tokens for per-token tasks
    if n < 2:
        raise ValueError(f"the online probe needs at least 4 examples of the {dataset.probe_train_split!r} split")
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6
    design = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)   # N × (D+1)
    fit, held_out = design[:n], design[n:2 * n]
    targets = ridge_targets(dataset.metric, y[:n], dataset.num_classes)
    weights = torch.linalg.solve(fit.T @ fit + l2 * n * torch.eye(fit.shape[1], dtype=x.dtype), fit.T @ targets)
    value = score(dataset.metric, decide(dataset.metric, (held_out @ weights).numpy()), y[n:2 * n].numpy())
    return OnlineProbe(value, feature_spread(x[:2 * n]))
