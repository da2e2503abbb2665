"""python tune/sweep.py [dataset=digits | datasets=[pamap2,higgs]] [sweep.num_samples=12] [key=value ...]

Per-dataset hyperparameter sweeps: Ray Tune runs the trials, Optuna (TPE) proposes them, ASHA stops
the bad ones early on the online probe, and Optuna and Tune maximise `validation`, the final linear
evaluation's score on the validation split (its test score is recorded and chooses nothing).

    for each dataset:  the baselines (baselines.json: a random-init encoder, the raw inputs)
                       Optuna study (SWEEP_DIR/optuna.db)  ──proposes──▶  trial = the pretraining loop in
                       ASHA on the online probe             ◀──reports──   its own process (one worker), or
                                                                           a Ray Train run (several)
    at the end:        SWEEP_DIR/report.md, <dataset>.csv, plots/ (tune/report.py): the chosen
                       configuration against the baselines, on the test split

The search space is configs/sweep.yaml's `space`, replaced per dataset by configs/space/<dataset>.yaml;
any config key joins it from the YAML or the command line (+space.train.lr={dist:loguniform,low:1e-4,high:1e-2}).
The first trial runs the configured objective (the published script's, or the dataset's own).
Running the same command again, or with resume=true, restores a sweep whose driver was stopped:
finished trials are kept, unfinished ones rerun, and the Optuna study keeps its history.
"""
from __future__ import annotations

import json
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

from metamae.config import CONFIG_DIR, METRICS, ExperimentConfig, PretrainConfig, to_object
from metamae.data import load_dataset
from metamae.distributed.stream import DATA_BUNDLE, TRIAL_DATA_CPUS, streams_through_ray_data
from metamae.distributed.trainer import ResourceRequestError, connect_ray, fit
from metamae.distributed.tune_reports import CancelTrainReservations, report_to_tune
from metamae.health import unhealthy
from metamae.linear_eval import online_probe
from metamae.loop import pretrain
from metamae.pretrain import baseline_probes, random_init_encoder
from metamae.private_apis import autoscaling_coordinator
from metamae.process import start_command
from metamae.train import RunRecipe
from tune.report import BASELINE_NAMES, BASELINE_PREDICTIONS, BASELINES, report_head, write_report

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
    trial_cpus: float = 0.1             # a Ray Train trial's driver's own CPUs (its workers ask for theirs)
    storage: Optional[str] = None       # an Optuna RDB URL; None: sqlite in the sweep folder
    autoscaling: bool = False           # a cluster that grows for waiting trials (cluster/*.yaml): trials are
                                        # not checked against today's nodes, and up to max_concurrent_trials
                                        # (default num_samples) wait at once
    baseline: bool = True               # probe the baselines (a random-init encoder, the raw inputs) first
    stop_unhealthy: bool = False        # stop a trial, from grace_period steps on, whose health flags are up


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
# One trial: the run's loop in the trial's process, or a Ray Train run
# --------------------------------------------------------------------------------------------

def in_trial_process(num_workers: int, folder: str) -> bool:
    """Whether a trial of `num_workers` whose runs go to `folder` runs its pretraining loop in its own
    process (metamae/loop.py), with no Ray Train run to start: one worker, checkpoints in a local
    folder. Trials of several workers, or into a bucket (where Ray Train persists their checkpoints),
    are Ray Train runs."""
    return num_workers == 1 and not in_bucket(folder)


def run_trial(params: dict[str, Any], base: dict[str, Any], runs_dir: str) -> None:
    """A Tune trial: pretrain with the trial's values, every report going to Tune. One worker: the loop
    runs here, in the trial's process. Several: on the trial's own Ray Train workers, whose reports
    reach Tune through metamae/distributed/tune_reports.py. The run's folder is RUNS_DIR/<trial id>:
    checkpoints, TensorBoard events and results, found again by a rerun of the trial after a failure
    or a resumed sweep."""
    context = tune.get_context()
    if in_bucket(runs_dir):   # checkpoints to the bucket; TensorBoard events stay beside the trial
        out_dir, storage = Path(context.get_trial_dir()) / context.get_trial_id(), runs_dir
    else:
        out_dir, storage = Path(runs_dir) / context.get_trial_id(), None
    cfg = trial_config(base, params, str(out_dir))
    run = RunRecipe(cfg.dataset, cfg.model, cfg.objective, cfg.train)
    if in_trial_process(cfg.execution.num_workers, runs_dir):
        data, _ = load_dataset(cfg.dataset, seed=cfg.train.seed)
        pretrain(run, cfg.probe, cfg.execution, data, out_dir, on_report=tune.report)
        return
    execution = replace(cfg.execution, storage=storage) if storage else cfg.execution
    report_to_tune(lambda reports: fit(run, cfg.probe, execution, out_dir, callbacks=[reports]),
                   is_last=lambda report: "validation" in report)


class FinalReportOptunaSearch(OptunaSearch):
    """OptunaSearch told of the final report only: its metric, `validation` (the final linear
    evaluation's score), is missing from the reports before it, on which OptunaSearch would fail."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class StopUnhealthy(tune.Stopper):
    """Stop a trial whose report has a health flag up (metamae/health.py), from `grace_period` steps on."""

    def __init__(self, grace_period: int):
        self.grace_period = grace_period

    def __call__(self, trial_id: str, result: dict) -> bool:
        return result.get("step", 0) >= self.grace_period and bool(unhealthy(result))

    def stop_all(self) -> bool:
        return False


@dataclass(frozen=True)
class TrialResources:
    """What one trial holds while it runs, as placement group bundles. `trial`: the trial's own
    placement group, which Tune reserves before the trial starts, on one node. A trial that runs its
    loop in its own process (in_trial_process): the worker's bundle, and `workers` is empty. A Ray
    Train run: its driver's bundle and, where its Train workers stream shards through Ray Data
    (several workers), that pipeline's (metamae/distributed/stream.py: every task of it runs there);
    `workers` is its Train run's placement group, one bundle per worker, asked for by the driver once
    it runs. Nothing of a trial asks for a CPU outside these: one worker reads its shards itself."""
    trial: tuple[dict[str, float], ...]
    workers: tuple[dict[str, float], ...]

    def total(self) -> dict[str, float]:
        return summed((*self.trial, *self.workers))

    def placement(self) -> tune.PlacementGroupFactory:
        """The trial's own bundles for tune.with_resources: [driver] or [driver, data] (DATA_BUNDLE)."""
        return tune.PlacementGroupFactory([dict(bundle) for bundle in self.trial], strategy="STRICT_PACK")

    def describe(self) -> str:
        if not self.workers:
            return (f"{self.trial[0]}, pretraining in its own process (reading its data itself): "
                    f"{amounts(self.total())} in all")
        parts = [f"its driver {self.trial[0]}"]
        if len(self.trial) > DATA_BUNDLE:
            parts.append(f"its Ray Data pipeline {self.trial[DATA_BUNDLE]} (on the driver's node)")
        reads = "" if len(self.trial) > DATA_BUNDLE else " (reading its data itself)"
        parts.append(f"{len(self.workers)} Train worker{'s' if len(self.workers) > 1 else ''} of "
                     f"{self.workers[0]}{' each' if len(self.workers) > 1 else ''}{reads}")
        return ", ".join(parts) + f": {amounts(self.total())} in all"


def trial_resources(cfg: SweepJobConfig) -> TrialResources:
    """What one trial of this study holds: see TrialResources."""
    worker = {"CPU": cfg.execution.cpus_per_worker, **({"GPU": 1.0} if cfg.execution.use_gpu else {})}
    if in_trial_process(cfg.execution.num_workers, cfg.sweep.dir):
        return TrialResources((worker,), ())
    trial = [{"CPU": cfg.sweep.trial_cpus}]
    if streams_through_ray_data(cfg.dataset.source, cfg.execution.num_workers):
        trial.append({"CPU": TRIAL_DATA_CPUS})
    return TrialResources(tuple(trial), (worker,) * cfg.execution.num_workers)


def summed(bundles) -> dict[str, float]:
    """The resources of several bundles added up, kind by kind."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for kind, amount in bundle.items():
            total[kind] = total.get(kind, 0.0) + amount
    return total


def amounts(resources: dict[str, float]) -> str:
    """{'CPU': 2.0, 'GPU': 0.0} -> '2 CPU, 0 GPU'."""
    return ", ".join(f"{amount:.4g} {kind}" for kind, amount in resources.items())


def trials_that_fit(resources: TrialResources, nodes: list[dict[str, float]], most: int) -> int:
    """How many trials, up to `most`, the nodes (each one's resources) hold at once, every one of them
    whole: its own placement group on one node, each of its workers on any. Trials are placed one
    after the other, each bundle first-fit, the largest first, as Ray's scheduler would find room."""
    free = [dict(node) for node in nodes]

    def place(bundle: dict[str, float]) -> bool:
        for node in free:
            if all(node.get(kind, 0.0) >= amount - 1e-9 for kind, amount in bundle.items()):
                for kind, amount in bundle.items():
                    node[kind] = node.get(kind, 0.0) - amount
                return True
        return False

    own = summed(resources.trial)                   # STRICT_PACK: the trial's bundles as one
    largest_first = lambda bundle: (bundle.get("GPU", 0.0), bundle.get("CPU", 0.0))
    for held in range(most):
        if not all(place(bundle) for bundle in sorted([own, *resources.workers], key=largest_first, reverse=True)):
            return held
    return most


def cluster_nodes() -> list[dict[str, float]]:
    """The CPUs and GPUs of each live node of the cluster."""
    return [{"CPU": node["Resources"].get("CPU", 0.0), "GPU": node["Resources"].get("GPU", 0.0)}
            for node in ray.nodes() if node["Alive"]]


def concurrent_trials(cfg: SweepJobConfig, nodes: Optional[list[dict[str, float]]] = None) -> int:
    """How many of the study's trials run at once, printed with what each holds.

    On an autoscaling cluster: sweep.max_concurrent_trials, or sweep.num_samples (trials wait for the
    nodes their requests make the autoscaler add). Otherwise as many whole trials as the cluster's
    nodes hold (`trials_that_fit`: drivers, data pipelines and Train workers, TrialResources), so that
    every trial started gets its workers and its pipeline its CPUs: more drivers would hold the CPUs
    that their workers wait for, and the sweep would hang. sweep.max_concurrent_trials lowers the
    number; set above it, it is lowered to it, with a message. A trial that no node can hold raises
    ResourceRequestError here, before any trial starts, naming what it asks for and what there is.
    """
    resources, asked = trial_resources(cfg), cfg.sweep.max_concurrent_trials
    if cfg.sweep.autoscaling:
        concurrency = asked or cfg.sweep.num_samples
        print(f"{cfg.dataset.name}: up to {concurrency} trials at once on a cluster that grows, each holding "
              f"{resources.describe()}", flush=True)
        return concurrency
    nodes = cluster_nodes() if nodes is None else nodes
    have = {kind: sum(node.get(kind, 0.0) for node in nodes) for kind in ("CPU", "GPU")}
    fits = trials_that_fit(resources, nodes, most=max(cfg.sweep.num_samples, asked or 0))
    if not fits:
        raise ResourceRequestError(
            f"one trial of the {cfg.dataset.name} sweep asks for {resources.describe()}, and the cluster's "
            f"nodes have {'; '.join(amounts(node) for node in nodes) or 'nothing'} ({amounts(have)} in all): no "
            f"trial could ever start. Lower execution.num_workers, execution.cpus_per_worker or sweep.trial_cpus, "
            f"set execution.use_gpu=false, add nodes, or on a cluster that grows set sweep.autoscaling=true")
    if asked and asked > fits:
        print(f"sweep.max_concurrent_trials={asked} lowered to {fits}: the cluster holds {fits} whole trials at "
              f"once, and the drivers of more would hold CPUs that their Train workers or data wait for",
              flush=True)
    concurrency = min(asked or fits, fits)
    print(f"{cfg.dataset.name}: {concurrency} trial{'s' if concurrency > 1 else ''} at once, each holding "
          f"{resources.describe()}; the cluster has {amounts(have)}", flush=True)
    return concurrency


# --------------------------------------------------------------------------------------------
# One study per dataset
# --------------------------------------------------------------------------------------------

def sweep_dataset(cfg: SweepJobConfig, base: dict[str, Any], space: dict[str, Any], sweep_dir: str,
                  storage: str, concurrency: int) -> tune.ResultGrid:
    """One dataset's study: a new Tuner, or the restored one of a sweep that was stopped. Its trials
    hold their drivers' and data pipelines' bundles (trial_resources); `concurrency` trials run at
    once (concurrent_trials)."""
    name = cfg.dataset.name
    experiment = os.path.join(sweep_dir, name)
    trial = tune.with_parameters(run_trial, base=base, runs_dir=os.path.join(experiment, "runs"))
    trainable = tune.with_resources(trial, trial_resources(cfg).placement())
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
        metric="validation", mode=mode, points_to_evaluate=[first], study_name=name,
        sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed), storage=optuna.storages.RDBStorage(storage))
    scheduler = ASHAScheduler(metric="probe", mode=mode, time_attr="step", max_t=cfg.train.steps,
                              grace_period=cfg.sweep.grace_period, reduction_factor=cfg.sweep.reduction_factor)
    save_base(experiment, base)
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.sweep.num_samples,
                                    max_concurrent_trials=concurrency,
                                    reuse_actors=True),     # a trial's process starts once, not per trial
        run_config=tune.RunConfig(storage_path=sweep_dir, name=name, callbacks=[CancelTrainReservations()],
                                  stop=StopUnhealthy(cfg.sweep.grace_period) if cfg.sweep.stop_unhealthy else None,
                                  failure_config=tune.FailureConfig(max_failures=cfg.sweep.trial_retries)))
    return tuner.fit()


BASE = "trial_base.json"         # in a study's Tune folder: the config its trials start from


def study_folder(experiment: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem (local, or a bucket's) and path of a study's Tune folder."""
    return pyarrow.fs.FileSystem.from_uri(experiment if in_bucket(experiment) else str(Path(experiment).resolve()))


def base_file(experiment: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a study's trial_base.json."""
    filesystem, folder = study_folder(experiment)
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
    overrides = [override for override in HydraConfig.get().overrides.task
                 if override.split("=")[0].lstrip("+~") not in ("dataset", "datasets")]
    return hydra.compose(config_name="sweep", overrides=[*overrides, f"dataset={dataset}"])


def pin_train_coordinator_here() -> None:
    """Create Ray Train's detached AutoscalingCoordinator actor on this (the head's) node now.

    Train V2 creates it with the first run, on that run's node: a worker node, which the autoscaler
    then never removes because a detached actor lives there. Created here first, Train reuses it.
    """
    ray.get(autoscaling_coordinator().__ray_ready__.remote())


def baseline_probes_once(base: dict[str, Any], experiment: str) -> dict[str, Any]:
    """The baselines under the trials' probe and splits (a random-init encoder of the base config's
    architecture, with its online probe for the report's curves; the raw inputs), computed before the
    first trial, so that a stopped sweep's report has them. A study's folder keeps them with the
    config they were computed for, and reads them again while that config is the same."""
    filesystem, folder = study_folder(experiment)
    path = f"{folder}/{BASELINES}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        with filesystem.open_input_stream(path) as f:
            saved = json.loads(f.read())
        if saved.get("config") == json.loads(json.dumps(base)):       # the JSON round trip: tuples as lists
            return saved["probes"]
    trial = trial_config(base, {}, out_dir="unused")
    data, dataset = load_dataset(trial.dataset, seed=trial.train.seed)
    trial = replace(trial, dataset=dataset)
    encoder = random_init_encoder(data, trial)
    results = baseline_probes(data, trial, encoder)
    probes = {name: result.summary() for name, result in results.items()}
    probes["random_init"]["probe"] = online_probe(encoder, data, dataset, trial.execution.probe_examples).score
    filesystem.create_dir(f"{folder}/{BASELINE_PREDICTIONS}", recursive=True)
    for name, result in results.items():
        with filesystem.open_output_stream(f"{folder}/{BASELINE_PREDICTIONS}/{name}.npz") as f:
            result.test_predictions.save(f)
    with filesystem.open_output_stream(f"{path}.tmp") as f:        # renamed whole: never read half-written
        f.write(json.dumps({"config": base, "probes": probes}, indent=2).encode())
    filesystem.move(f"{path}.tmp", path)
    return probes


def baselines_line(name: str, baselines: dict[str, Any]) -> str:
    """The baselines' scores, each with its split."""
    first = next(iter(baselines.values()))
    return (f"{name} baselines, {first['metric']} of the {first['method']} linear probe "
            f"(validation: {first['splits']['validation']}; test: the {first['splits']['test']!r} split): "
            + "; ".join(f"{BASELINE_NAMES[key]} validation {value['validation']:.4f}, test {value['test']:.4f}"
                        for key, value in baselines.items()))


def summary(name: str, results: tune.ResultGrid, mode: str, baselines: dict[str, Any]) -> str:
    """The study in one line: its best trial by validation score, that trial's test score, the baselines'."""
    finished = [r for r in results if r.metrics and "validation" in r.metrics]
    failed = [r for r in results if r.error]
    against = "".join(f", {BASELINE_NAMES[key]} {value['test']:.4f}" for key, value in baselines.items())
    if not finished:
        return f"{name}: no trial finished ({len(failed)} failed)" + (f"; test{against}" if against else "")
    best = (max if mode == "max" else min)(finished, key=lambda r: r.metrics["validation"])
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items())
    return (f"{name}: best validation score {best.metrics['validation']:.4f} with {params}; its test score "
            f"{best.metrics['test']:.4f}{against}; {len(finished)} finished, "
            f"{len(results) - len(finished) - len(failed)} stopped early, {len(failed)} failed")


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
            base["execution"]["check_resources"] = False
        prepared.append((cfg, base, search_space(cfg.space, base)))
    return prepared


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="sweep")
def main(job: DictConfig) -> None:
    prepared = studies(job)
    sweep_cfg = prepared[0][0].sweep
    sweep_dir = sweep_folder(sweep_cfg, [cfg.dataset.name for cfg, _, _ in prepared])
    storage = optuna_storage(sweep_cfg, sweep_dir)
    check_new_studies([cfg.dataset.name for cfg, _, _ in prepared], sweep_dir, storage)
    if not ray.is_initialized():
        connect_ray()
    if sweep_cfg.autoscaling:
        pin_train_coordinator_here()
    # every study's trials checked against the cluster before any starts (one that fits nowhere fails here)
    concurrency = {cfg.dataset.name: concurrent_trials(cfg) for cfg, _, _ in prepared}
    # every study's baselines before any trial: a dataset whose baselines fail stops the sweep here
    baselines = {cfg.dataset.name: baseline_probes_once(base, os.path.join(sweep_dir, cfg.dataset.name))
                 if cfg.sweep.baseline else {} for cfg, base, _ in prepared}
    for name, probes in baselines.items():
        if probes:
            print(baselines_line(name, probes), flush=True)
    lines = []
    for cfg, base, space in prepared:
        results = sweep_dataset(cfg, base, space, sweep_dir, storage, concurrency[cfg.dataset.name])
        lines.append(summary(cfg.dataset.name, results, METRICS[cfg.dataset.metric], baselines[cfg.dataset.name]))
    print("\n".join(["", *lines, f"sweep folder: {sweep_dir}",
                     f"optuna-dashboard {storage}    tensorboard --logdir {sweep_dir}"]), flush=True)
    if not in_bucket(sweep_dir):
        report = write_report(sweep_dir, storage)
        print(report_head(report), f"report: {report}", sep="\n", flush=True)


def register_sweep() -> None:
    """The sweep's own schema and resolver, beside metamae's (metamae.process.start_command)."""
    ConfigStore.instance().store(name="sweep_schema", node=SweepJobConfig)
    # Hydra's own log folder (configs/sweep.yaml): in a local sweep folder, else in this folder
    OmegaConf.register_new_resolver("local_or_here", lambda folder: "." if in_bucket(folder) else folder,
                                    replace=True)


if __name__ == "__main__":
    start_command()
    register_sweep()
    main()
