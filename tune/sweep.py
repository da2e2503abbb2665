"""python tune/sweep.py [dataset=digits | datasets=[pamap2,higgs]] [sweep.num_samples=12] [key=value ...]

Per-dataset hyperparameter sweeps: Ray Tune runs the trials, Optuna (TPE) proposes them, ASHA stops
the bad ones early on the online probe, and the final linear evaluation is the objective.

    for each dataset:  Optuna study (SWEEP_DIR/optuna.db)  ──proposes──▶  trial = a Ray Train run
                       ASHA on the online probe             ◀──reports──   (its own workers, GPUs)
    at the end:        SWEEP_DIR/report.md, <dataset>.csv, plots/ (tune/report.py)

The search space is configs/sweep.yaml's `space`, replaced per dataset by configs/space/<dataset>.yaml;
any config key joins it from the YAML or the command line (+space.train.lr={dist:loguniform,low:1e-4,high:1e-2}).
The first trial runs the configured (paper's) values. Running the same command again, or with
resume=true, restores a sweep whose driver was stopped: finished trials are kept, unfinished ones
rerun, and the Optuna study keeps its history.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import optuna
import pyarrow.fs
import ray
import sqlalchemy
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from metamae.config import CONFIG_DIR, METRICS, ExperimentConfig, PretrainConfig, register, to_object
from metamae.data import load_dataset
from metamae.distributed.stream import StreamConfig
from metamae.distributed.trainer import default_environment, fit
from metamae.distributed.tune_reports import CancelTrainReservations, report_to_tune
from metamae.linear_eval import linear_probe
from metamae.pretrain import random_init_encoder
from metamae.train import RunConfig
from report import write_report

DISTRIBUTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform,
                 "int": lambda low, high: tune.randint(low, high + 1)}        # low and high both drawn


@dataclass
class SweepConfig:
    name: Optional[str] = None          # the sweep's folder under `dir`; None: the datasets' names
    dir: str = "sweeps"                 # a local folder, or a pyarrow filesystem URI (s3://bucket/sweeps)
    num_samples: int = 8                # trials per dataset
    seed: int = 0                       # Optuna's TPE sampler
    max_concurrent_trials: Optional[int] = None   # None: as many as the cluster's CPUs and GPUs hold
    grace_period: int = 150             # steps every trial runs before ASHA may stop it
    reduction_factor: int = 2           # ASHA keeps the best 1/reduction_factor at each rung
    trial_retries: int = 1              # a failed trial is rerun this many times before it is reported
    trial_cpus: float = 0.1             # the trial driver's own CPUs (its Train workers ask for theirs)
    storage: Optional[str] = None       # an Optuna RDB URL; None: sqlite in the sweep folder
    autoscaling: bool = False           # a cluster that grows for waiting trials (cluster/*.yaml): trials are
                                        # not checked against today's nodes, and up to max_concurrent_trials
                                        # (default num_samples) wait at once
    baseline: bool = True               # also probe a random-init encoder, the number to beat


@dataclass
class SweepJobConfig(ExperimentConfig):
    space: Dict[str, Any] = field(default_factory=dict)    # config key -> {dist, low, high} or {choices}
    sweep: SweepConfig = field(default_factory=SweepConfig)
    datasets: List[str] = field(default_factory=list)      # several datasets, one study each; []: `dataset`
    resume: Optional[bool] = None       # None: resume a sweep that exists; true: it must; false: it must not


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------

def flatten(config: dict[str, Any], prefix: str = "", whole=lambda value: False) -> dict[str, Any]:
    """{train: {steps: 5}} -> {'train.steps': 5}; a dict that `whole` accepts is kept as one value."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and not whole(value):
            flat.update(flatten(value, f"{prefix}{key}.", whole))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{objective: {inner_lr: {dist: ...}}} -> {'objective.inner_lr': {dist: ...}}."""
    return flatten(space, whole=lambda spec: bool({"dist", "choices"} & set(spec)))


def search_space(space: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The YAML space as Tune distributions over dotted config keys; a wrong key, spec or bound
    (a value the config refuses, such as a mask ratio of 1.5) names itself."""
    distributions = {}
    for key, spec in flatten_space(space).items():
        if OmegaConf.select(OmegaConf.create(base), key, default=MISSING) is MISSING:
            raise ValueError(f"space.{key}: {key!r} is not a config key (see configs/sweep.yaml)")
        if not isinstance(spec, dict):
            raise ValueError(f"space.{key} is {spec!r}; expected {{dist: ..., low: ..., high: ...}} "
                             f"or {{choices: [...]}}")
        if "choices" in spec:
            distributions[key] = tune.choice(list(spec["choices"]))
        elif spec.get("dist") in DISTRIBUTIONS and {"low", "high"} <= set(spec):
            distributions[key] = DISTRIBUTIONS[spec["dist"]](spec["low"], spec["high"])
        else:
            raise ValueError(f"space.{key} is {spec}; expected {{dist: loguniform|uniform|int, low: L, high: H}} "
                             f"or {{choices: [...]}}")
        for value in spec.get("choices") or (spec["low"], spec["high"]):
            try:
                trial_config(base, {key: value}, out_dir="unused")
            except ValueError as error:
                raise ValueError(f"space.{key} can draw {value!r}, which the config refuses: {error}") from error
    if not distributions:
        raise ValueError("the search space is empty: set `space` in configs/sweep.yaml or configs/space/")
    return distributions


def trial_config(base: dict[str, Any], params: dict[str, Any], out_dir: str) -> PretrainConfig:
    """The base config with a trial's dotted-key values, typed and validated."""
    cfg = OmegaConf.merge(OmegaConf.structured(PretrainConfig), base, {"out_dir": out_dir})
    for key, value in params.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return to_object(cfg)


# --------------------------------------------------------------------------------------------
# One trial: a Ray Train run
# --------------------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], base: dict[str, Any], runs_dir: str) -> None:
    """A Tune trial: pretrain with the trial's values on its own Train workers; every Train report
    goes on to Tune (metamae/distributed/tune_reports.py). The run's folder is RUNS_DIR/<trial id>:
    checkpoints, TensorBoard events and results, found again by a rerun of the trial after a failure
    or a resumed sweep."""
    context = tune.get_context()
    if in_bucket(runs_dir):   # checkpoints to the bucket; TensorBoard events stay beside the trial
        out_dir, storage = Path(context.get_trial_dir()) / context.get_trial_id(), runs_dir
    else:
        out_dir, storage = Path(runs_dir) / context.get_trial_id(), None
    cfg = trial_config(base, params, str(out_dir))
    run = RunConfig(cfg.dataset, cfg.model, cfg.objective, cfg.train)
    trainer = replace(cfg.trainer, storage=storage) if storage else cfg.trainer
    report_to_tune(lambda reports: fit(run, cfg.probe, trainer, out_dir, callbacks=[reports]),
                   is_last=lambda report: "objective" in report)


class FinalReportOptunaSearch(OptunaSearch):
    """OptunaSearch told of the final report only: the objective (the final linear evaluation) is
    missing from the reports before it, on which OptunaSearch would fail."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def trial_resources(cfg: SweepJobConfig) -> dict[str, float]:
    """What one trial holds: its driver, its Train workers and, reading shards, a Ray Data task's CPUs,
    which Ray Data asks for outside the trial's reservations (without them a full cluster stalls)."""
    workers = cfg.trainer.num_workers
    data_cpus = StreamConfig().task_cpus if cfg.dataset.source == "shards" else 0.0
    return {"CPU": cfg.sweep.trial_cpus + workers * cfg.trainer.cpus_per_worker + data_cpus,
            "GPU": workers if cfg.trainer.use_gpu else 0}


def concurrent_trials(cfg: SweepJobConfig) -> int:
    """As many trials as the cluster holds now, or on an autoscaling cluster as many as asked."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    if cfg.sweep.autoscaling:
        return cfg.sweep.num_samples
    have, need = ray.cluster_resources(), trial_resources(cfg)
    fits = [math.floor(have.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items() if amount]
    return max(1, min(fits))


# --------------------------------------------------------------------------------------------
# One study per dataset
# --------------------------------------------------------------------------------------------

def sweep_dataset(cfg: SweepJobConfig, base: dict[str, Any], space: dict[str, Any], sweep_dir: str,
                  storage: str) -> tune.ResultGrid:
    """One dataset's study: a new Tuner, or the restored one of a sweep that was stopped."""
    name = cfg.dataset.name
    experiment = os.path.join(sweep_dir, name)
    trial = tune.with_parameters(run_trial, base=base, runs_dir=os.path.join(experiment, "runs"))
    trainable = tune.with_resources(trial, {"cpu": cfg.sweep.trial_cpus})
    if tune.Tuner.can_restore(experiment):
        if cfg.resume is False:
            raise FileExistsError(f"{experiment} holds a sweep: resume it (the same command, or resume=true), "
                                  f"or choose another sweep.name")
        check_same_base(experiment, base)
        print(f"resuming the {name} sweep in {experiment}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    if cfg.resume:
        raise FileNotFoundError(f"resume=true, and there is no sweep to resume at {experiment}")
    first = {key: OmegaConf.select(OmegaConf.create(base), key) for key in space}
    mode = METRICS[cfg.dataset.metric]
    searcher = FinalReportOptunaSearch(
        metric="objective", mode=mode, points_to_evaluate=[first], study_name=name,
        sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed), storage=optuna.storages.RDBStorage(storage))
    scheduler = ASHAScheduler(metric="probe", mode=mode, time_attr="step", max_t=cfg.train.steps,
                              grace_period=cfg.sweep.grace_period, reduction_factor=cfg.sweep.reduction_factor)
    save_base(experiment, base)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=concurrent_trials(cfg)),
        run_config=tune.RunConfig(storage_path=sweep_dir, name=name, callbacks=[CancelTrainReservations()],
                                  failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_retries)))
    return tuner.fit()


BASE = "trial_base.json"         # in a study's Tune folder: the config its trials start from


def base_file(experiment: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem (local, or a bucket's) and path of a study's trial_base.json."""
    filesystem, folder = pyarrow.fs.FileSystem.from_uri(experiment if in_bucket(experiment) else
                                                        str(Path(experiment).resolve()))
    return filesystem, f"{folder}/{BASE}"


def save_base(experiment: str, base: dict[str, Any]) -> None:
    filesystem, path = base_file(experiment)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps(base, indent=2, sort_keys=True).encode())


def check_same_base(experiment: str, base: dict[str, Any]) -> None:
    """A resumed study reruns its unfinished trials from the config it started with: Tune keeps the
    search space, samples and scheduler, and a changed setting (train.steps, say) would hold for
    some trials only. Refuse one, naming what changed."""
    filesystem, path = base_file(experiment)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return                                          # a sweep started before this file existed
    with filesystem.open_input_stream(path) as f:
        saved = flatten(json.loads(f.read()))
    now = flatten(json.loads(json.dumps(base)))         # the JSON round trip makes tuples lists, as saved
    changed = sorted(key for key in saved.keys() | now.keys() if saved.get(key) != now.get(key))
    if changed:
        raise ValueError(f"the sweep in {experiment} started with "
                         + ", ".join(f"{key}={saved.get(key)!r}" for key in changed)
                         + "; resuming it with " + ", ".join(f"{key}={now.get(key)!r}" for key in changed)
                         + " would mix both: resume it with the settings it started with, or start "
                           "another sweep (sweep.name)")


def in_bucket(folder: str) -> bool:
    """A pyarrow URI (s3://..., gs://...) rather than a local folder."""
    return "://" in folder


def sweep_folder(sweep: SweepConfig, datasets: list[str]) -> str:
    name = sweep.name or "+".join(datasets)
    return os.path.join(sweep.dir, name) if in_bucket(sweep.dir) else str(Path(sweep.dir, name).resolve())


def check_new_studies(datasets: list[str], sweep_dir: str, storage: str) -> None:
    """A new sweep's studies must not exist yet: on a storage that sweeps share (sweep.storage), a new
    sweep would go on with another one's Optuna history, and its report would mix both."""
    taken = set(optuna.get_all_study_names(storage))
    for dataset in datasets:
        if dataset in taken and not tune.Tuner.can_restore(os.path.join(sweep_dir, dataset)):
            raise FileExistsError(f"{storage} already holds an Optuna study named {dataset!r}, from a sweep other "
                                  f"than {sweep_dir}: give this sweep a sweep.storage of its own, resume that "
                                  f"sweep (its sweep.dir and sweep.name), or delete the study (`optuna "
                                  f"delete-study --study-name {dataset} --storage {storage}`)")


def optuna_storage(sweep: SweepConfig, sweep_dir: str) -> str:
    """sweep.storage, or SWEEP_DIR/optuna.db; a SQLite database that does not exist yet is created whole."""
    if not sweep.storage and in_bucket(sweep_dir):
        raise ValueError(f"sweep.dir is {sweep.dir}: set sweep.storage to an Optuna RDB URL "
                         f"(postgresql://..., or sqlite:///a/local/file.db)")
    storage = sweep.storage or f"sqlite:///{Path(sweep_dir, 'optuna.db')}"
    url = sqlalchemy.engine.make_url(storage)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not Path(url.database).is_file():
            create_sqlite_storage(Path(url.database))
    return storage


def create_sqlite_storage(database: Path) -> None:
    """Create Optuna's tables in a file beside `database`, then rename it into place.

    Whoever opens a fresh SQLite file first creates Optuna's tables in it, and when two processes do
    so at once, one fails ("table studies already exists"). Renamed into place whole, the database
    is never seen without its tables by a reader that opens it as the sweep starts (optuna-dashboard,
    tune/report.py, a script).
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    building = database.with_name(f".{database.name}.{os.getpid()}")
    optuna.storages.RDBStorage(f"sqlite:///{building}").engine.dispose()
    os.replace(building, database)


def compose_for(dataset: str) -> DictConfig:
    """This job's config with `dataset` (and its configs/space/<dataset>.yaml) chosen."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=")[0].lstrip("+~") in
                 ("dataset", "datasets")]
    return hydra.compose(config_name="sweep", overrides=[*overrides, f"dataset={dataset}"])


def pin_train_coordinator_here() -> None:
    """Create Ray Train's detached AutoscalingCoordinator actor on this (the head's) node now.

    Train V2 creates it with the first run, on that run's node: a worker node, which the autoscaler
    then never removes because a detached actor lives there. Created here first, Train reuses it.
    (A private Ray API, as of Ray 2.60.)
    """
    from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote())


def random_init_probe(base: dict[str, Any]) -> float:
    """The final linear evaluation of a random-init encoder: what pretraining has to beat."""
    cfg = trial_config(base, {}, out_dir="unused")
    data, dataset = load_dataset(cfg.dataset, seed=cfg.train.seed)
    return linear_probe(random_init_encoder(data, cfg), data, dataset, cfg.probe).test


def baseline_note(cfg: SweepJobConfig, base: dict[str, Any]) -> str:
    """' (random-init encoder: 0.7578)' for the summary line; a failed baseline is reported there,
    and the sweep goes on to its next dataset and its report."""
    if not cfg.sweep.baseline:
        return ""
    try:
        return f" (random-init encoder: {random_init_probe(base):.4f})"
    except Exception as error:                     # the trials are done and kept; only the baseline is lost
        return f" (random-init encoder: failed, {type(error).__name__}: {error})"


def summary(name: str, results: tune.ResultGrid, mode: str, against: str) -> str:
    finished = [r for r in results if r.metrics and "objective" in r.metrics]
    failed = [r for r in results if r.error]
    if not finished:
        return f"{name}: no trial finished ({len(failed)} failed){against}"
    best = (max if mode == "max" else min)(finished, key=lambda r: r.metrics["objective"])
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    return (f"{name}: best objective {best.metrics['objective']:.4f}{against} with {params}; {len(finished)} "
            f"finished, {len(results) - len(finished) - len(failed)} stopped early, {len(failed)} failed")


def studies(job: DictConfig) -> list[tuple[SweepJobConfig, dict[str, Any], dict[str, Any]]]:
    """Per dataset: the typed config, the base config every trial starts from, the search space;
    every key, value and dataset checked before anything starts."""
    prepared = []
    for name in list(job.datasets) or [job.dataset.name]:
        composed = compose_for(name) if job.datasets else job
        cfg = to_object(composed)
        _, dataset = load_dataset(cfg.dataset, seed=cfg.train.seed)     # its shards are there; its metric
        cfg = replace(cfg, dataset=dataset)
        base = OmegaConf.to_container(composed, resolve=True)
        for key in ("space", "sweep", "datasets", "resume"):
            base.pop(key)
        # absolute (trials run elsewhere), and what the manifest says: each checkpoint's config rebuilds its model
        base["dataset"].update(path=dataset.path, input=dataset.input, num_classes=dataset.num_classes,
                               metric=dataset.metric)
        if cfg.sweep.autoscaling:
            base["trainer"]["check_resources"] = False
        prepared.append((cfg, base, search_space(cfg.space, base)))
    return prepared


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sweep")
def main(job: DictConfig) -> None:
    prepared = studies(job)
    sweep_cfg = prepared[0][0].sweep
    sweep_dir = sweep_folder(sweep_cfg, [cfg.dataset.name for cfg, _, _ in prepared])
    storage = optuna_storage(sweep_cfg, sweep_dir)
    check_new_studies([cfg.dataset.name for cfg, _, _ in prepared], sweep_dir, storage)
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")   # the objective is in the last report only
    if not ray.is_initialized():
        default_environment()
        ray.init()                      # a local Ray, or the cluster RAY_ADDRESS names (ray job submit)
    if sweep_cfg.autoscaling:
        pin_train_coordinator_here()
    lines = []
    for cfg, base, space in prepared:
        results = sweep_dataset(cfg, base, space, sweep_dir, storage)
        lines.append(summary(cfg.dataset.name, results, METRICS[cfg.dataset.metric], baseline_note(cfg, base)))
    print("\n".join(["", *lines, f"sweep folder: {sweep_dir}",
                     f"optuna-dashboard {storage}    tensorboard --logdir {sweep_dir}"]), flush=True)
    if not in_bucket(sweep_dir):
        print(f"report: {write_report(sweep_dir, storage)}", flush=True)


def register_sweep() -> None:
    register()
    ConfigStore.instance().store(name="sweep_schema", node=SweepJobConfig)
    # Hydra's own log folder (configs/sweep.yaml): in a local sweep folder, else in this folder
    OmegaConf.register_new_resolver("local_or_here", lambda folder: "." if in_bucket(folder) else folder,
                                    replace=True)


register_sweep()

if __name__ == "__main__":
    main()
