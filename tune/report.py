"""The report of a sweep: a CSV per dataset, plots, and report.md, from a Ray Tune + Optuna sweep folder.

    python tune/report.py SWEEP_DIR [--storage URL]

A sweep folder holds one Tune experiment folder per dataset and the Optuna storage
(default `sqlite:///SWEEP_DIR/optuna.db`) with one study per dataset, named after it. For each
dataset the report reads
  - every trial's status, config and error file from Tune's newest `experiment_state-*.json`,
    read as plain JSON (`ray.tune.ExperimentAnalysis` reads the same file but shows RUNNING trials
    as PENDING, and would make this script import Ray),
  - every report of a trial from its `result.json` (`progress.csv` keeps only the keys of the first
    report, so it lacks `validation` and `checkpoint_path`),
  - the direction (whether a higher validation score is better) and the finished trials of the Optuna study.
  - the baselines the sweep probed before its trials (`baselines.json`: a random-init encoder and the
    raw inputs, under the trials' probe and splits) and the test predictions of the baselines
    (`baselines/<name>.npz`) and of the best trial (`runs/<trial id>/test_predictions.npz`), for the
    best trial's gain over each baseline with a paired bootstrap interval over the test examples.
Trials are chosen on their validation score (`validation`, the metric Tune and Optuna optimise); each
one's test score is shown beside it and chooses nothing.
It works on a sweep that is still running, as of Tune's last copy of the experiment into SWEEP_DIR (every
~10 s): trials without reports yet, a half-written last line of `result.json` and studies with no completed
trial are reported as what they are.
"""
import argparse
import json
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from metamae.health import unhealthy  # noqa: E402
from metamae.linear_eval import PREDICTIONS, Predictions, paired_bootstrap  # noqa: E402

MIN_TRIALS_FOR_IMPORTANCES = 5   # completed trials below which fANOVA importances are noise
MIN_TRIALS_FOR_RANKING = 3       # finished trials below which a rank correlation says nothing
NEAR_BOUND = 0.05                # a best value this close to a bound (of its range, on its own scale) is flagged
# The CSV's columns taken from a trial's last report, in this order, each named as the report's key.
LAST_REPORT_COLUMNS = ("validation", "test", "probe", "step", "time_total_s")
OUTCOMES = ["finished", "stopped early", "failed", "pending or running"]
BASELINE_NAMES = {"random_init": "random-init encoder", "raw_input": "raw-input probe"}
BASELINES = "baselines.json"         # in a study's Tune folder: the baselines' probes and their config
BASELINE_PREDICTIONS = "baselines"   # ... and their test predictions, <name>.npz (a trial's: runs/<id>/)


@dataclass
class TrialRecord:
    """One Tune trial: its status, searched config, every report so far and its error, if any."""
    number: int      # Tune's trial counter, from 1 in creation order: the experiment tag "7_objective.inner_lr=..."
    trial_id: str
    status: str
    config: dict[str, Any]
    reports: list[dict[str, Any]]
    error: str | None

    @property
    def last(self) -> dict[str, Any]:
        return self.reports[-1] if self.reports else {}

    @property
    def health(self) -> str:
        """The health flags of its last report (metamae/health.py), and 'NaN loss' for a run that
        stopped on one."""
        flags = unhealthy(self.last)
        if self.error and ("NonFiniteLoss" in self.error or " loss is nan" in self.error.lower()):
            flags.append("NaN loss")
        return ", ".join(flags)

    @property
    def outcome(self) -> str:
        """finished, stopped early (ended without a final evaluation: ASHA), failed, or pending or running."""
        if self.status == "TERMINATED":
            return "finished" if "validation" in self.last else "stopped early"
        return "failed" if self.status == "ERROR" else "pending or running"


def find_experiments(sweep_dir: Path) -> list[Path]:
    """The dataset folders of a sweep: Tune experiment folders, each named after its dataset."""
    experiments = sorted(folder for folder in sweep_dir.iterdir() if folder.is_dir() and (
        (folder / "tuner.pkl").exists() or any(folder.glob("experiment_state-*.json"))))
    if not experiments:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep: no dataset folder with a Ray Tune experiment "
                                "(tuner.pkl or experiment_state-*.json) in it")
    return experiments


def read_reports(result_file: Path) -> list[dict[str, Any]]:
    """Every report in a trial's result.json, oldest first, up to a line Tune is still writing."""
    reports = []
    for line in result_file.read_text().splitlines() if result_file.exists() else []:
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return reports


def read_error(error_file: Path) -> str | None:
    """The last line of a trial's error trace (`RuntimeError: ...`), or None when there is none."""
    if not error_file.exists():
        return None
    lines = [line.strip() for line in error_file.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else None


def read_snapshot(path: Path, attempts: int = 3) -> dict[str, Any]:
    """Tune's experiment snapshot. While a sweep runs, Tune copies a new one over it every few seconds:
    a read that catches the copy half-way is tried again."""
    for _ in range(attempts - 1):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            time.sleep(1.0)
    return json.loads(path.read_text())


def read_trial(experiment: Path, trial_json: str, metadata_json: str) -> TrialRecord:
    """One trial from its two JSON strings in Tune's experiment snapshot, its reports and its error file."""
    state, metadata = json.loads(trial_json), json.loads(metadata_json)
    folder = experiment / state["relative_logdir"]
    return TrialRecord(
        number=int(state["experiment_tag"].split("_")[0]), trial_id=state["trial_id"], status=state["status"],
        config=state["config"], reports=read_reports(folder / "result.json"),
        error=read_error(folder / metadata["error_filename"]) if metadata["error_filename"] else None)


def read_trials(experiment: Path) -> list[TrialRecord]:
    """Every trial of a Tune experiment in creation order; none before Tune's first snapshot."""
    snapshots = sorted(experiment.glob("experiment_state-*.json"))   # named by start time: newest last
    if not snapshots:
        return []
    trial_data = read_snapshot(snapshots[-1])["trial_data"]
    return sorted((read_trial(experiment, *trial) for trial in trial_data), key=lambda trial: trial.number)


def load_study(dataset: str, storage: str) -> optuna.Study:
    """The Optuna study of one dataset, named after it."""
    try:
        return optuna.load_study(study_name=dataset, storage=storage)
    except KeyError as error:
        raise FileNotFoundError(f"no Optuna study named {dataset!r} in {storage}") from error


def read_baselines(experiment: Path) -> dict[str, Any]:
    """The baselines the sweep probed before its trials ({} for a sweep with sweep.baseline=false)."""
    path = experiment / BASELINES
    return json.loads(path.read_text())["probes"] if path.is_file() else {}


def config_keys(trials: list[TrialRecord]) -> list[str]:
    """Every searched key, in the order trials first show them."""
    return list(dict.fromkeys(key for trial in trials for key in trial.config))


def trial_table(trials: list[TrialRecord], baselines: dict[str, Any]) -> pd.DataFrame:
    """One row per trial: id, status, outcome, config, final validation and test scores, last probe and
    step, time, health, error and checkpoint; then one row per baseline (outcome `baseline`)."""
    keys = config_keys(trials)
    rows = [{"trial_id": trial.trial_id, "status": trial.status, "outcome": trial.outcome,
             **{key: trial.config.get(key) for key in keys},
             **{key: trial.last.get(key) for key in LAST_REPORT_COLUMNS},
             "health": trial.health, "error": trial.error, "checkpoint_path": trial.last.get("checkpoint_path")}
            for trial in trials]
    rows += [{"trial_id": f"baseline: {BASELINE_NAMES[name]}", "outcome": "baseline",
              "validation": baseline["validation"], "test": baseline["test"], "probe": baseline.get("probe")}
             for name, baseline in baselines.items()]
    columns = ["trial_id", "status", "outcome", *keys, *LAST_REPORT_COLUMNS, "health", "error", "checkpoint_path"]
    return pd.DataFrame(rows, columns=columns).convert_dtypes()   # steps stay integers beside missing values


def best_trial(table: pd.DataFrame, direction: optuna.study.StudyDirection) -> pd.Series | None:
    """The trial with the best validation score in the study's direction (its test score chooses
    nothing); None before any trial finished."""
    finished = table[table["outcome"] != "baseline"].dropna(subset=["validation"])
    if finished.empty:
        return None
    validation = finished["validation"].astype(float)
    return finished.loc[validation.idxmax() if direction == optuna.study.StudyDirection.MAXIMIZE
                        else validation.idxmin()]


# --------------------------------------------------------------------------------------------
# The verdict: the best trial against the baselines, on the test split, with uncertainty
# --------------------------------------------------------------------------------------------

@dataclass
class Comparison:
    baseline: str             # its name in BASELINE_NAMES
    baseline_test: float
    gain: float               # the best trial's test score less the baseline's
    interval: tuple[float, float] | None   # the gain's 95 % paired bootstrap interval; None without predictions

    @property
    def verdict(self) -> str:
        if self.interval is None:
            return "beats" if self.gain > 0 else "does not beat"
        if self.interval[0] > 0:
            return "beats"
        return "is worse than" if self.interval[1] < 0 else "does not beat"

    def text(self) -> str:
        spread = (f" [95 % CI {self.interval[0]:+.4f}, {self.interval[1]:+.4f}]" if self.interval
                  else " (no paired test predictions on disk to bound it)")
        plain = {"beats": "it **beats** it",
                 "is worse than": "it is **worse** than it",
                 "does not beat": "it **does not beat** it by more than the uncertainty"}[self.verdict]
        return (f"against the {BASELINE_NAMES[self.baseline]} (test {self.baseline_test:.4f}): "
                f"{self.gain:+.4f}{spread}: {plain}")


def compare(experiment: Path, best: pd.Series, baselines: dict[str, Any], metric: str) -> list[Comparison]:
    """The best trial's test score against each baseline's, with a paired bootstrap interval over the
    test examples where both predictions are on disk."""
    mine = experiment / "runs" / str(best["trial_id"]) / PREDICTIONS
    comparisons = []
    for name, baseline in baselines.items():
        theirs = experiment / "baselines" / f"{name}.npz"
        interval = None
        if mine.is_file() and theirs.is_file():
            a, b = Predictions.load(mine), Predictions.load(theirs)
            if np.array_equal(a.labels, b.labels):              # the same test rows, in the same order
                _, low, high = paired_bootstrap(metric, a.predictions, b.predictions, a.labels, a.examples)
                interval = (low, high)
        comparisons.append(Comparison(name, baseline["test"], float(best["test"]) - baseline["test"], interval))
    return comparisons


def verdict_lines(dataset: str, experiment: Path, table: pd.DataFrame, direction,
                  baselines: dict[str, Any]) -> list[str]:
    """The first lines of a dataset's report: how the chosen configuration fares against each baseline."""
    metric = next(iter(baselines.values()))["metric"] if baselines else "score"
    best = best_trial(table, direction)
    if not baselines:
        return [f"**{dataset}**: no baselines were probed (sweep.baseline=false): nothing says whether "
                "pretraining helps."]
    listed = ", ".join(f"{BASELINE_NAMES[name]} test {value['test']:.4f}" for name, value in baselines.items())
    if best is None:
        return [f"**{dataset}**: no trial has finished, so no configuration can be compared with the baselines "
                f"({listed})."]
    comparisons = compare(experiment, best, baselines, metric)
    losing = [BASELINE_NAMES[c.baseline] for c in comparisons if c.verdict != "beats"]
    head = (f"**{dataset}: the chosen configuration does not beat the {' or the '.join(losing)}.**" if losing else
            f"**{dataset}: the chosen configuration beats every baseline.**")
    return [head + f" Trial `{best['trial_id']}`, chosen on its validation {metric} "
            f"({float(best['validation']):.4f}), scores test {metric} {float(best['test']):.4f}; "
            + "; ".join(c.text() for c in comparisons) + "."]


# --------------------------------------------------------------------------------------------
# Reading the search: bounds, and whether the early-stopping signal ranks trials as the result does
# --------------------------------------------------------------------------------------------

def position_in_range(value: float, distribution) -> float | None:
    """Where a value lies in a numeric distribution's range, 0 at low and 1 at high, on its own scale
    (log for log-uniform draws); None for a range of one value."""
    low, high = distribution.low, distribution.high
    if distribution.log:
        value, low, high = math.log(value), math.log(low), math.log(high)
    return (value - low) / (high - low) if high > low else None


def near_bounds(best: pd.Series, study: optuna.Study, keys: list[str]) -> list[str]:
    """The best config's values within NEAR_BOUND of a bound of their range: the search may have cut off
    better values."""
    distributions = {}
    for trial in study.get_trials(deepcopy=False):
        distributions.update(trial.distributions)
    numeric = (optuna.distributions.FloatDistribution, optuna.distributions.IntDistribution)
    lines = []
    for key in keys:
        if not isinstance(distributions.get(key), numeric) or pd.isna(best[key]):
            continue                                   # choices have no bounds
        position = position_in_range(float(best[key]), distributions[key])
        if position is not None and (position < NEAR_BOUND or position > 1 - NEAR_BOUND):
            bound = "low" if position < NEAR_BOUND else "high"
            lines.append(f"- `{key}={format_cell(best[key])}` lies within {NEAR_BOUND:.0%} of its range's {bound} "
                         f"bound ({format_cell(getattr(distributions[key], bound))}): widen the range past it.")
    return lines


def probe_ranking(trials: list[TrialRecord]) -> list[str]:
    """Spearman's ρ between the online probe at each step that every finished trial probed and their
    final validation scores: how far ASHA's decisions, made on the probe, can be trusted here."""
    finished = [trial for trial in trials if trial.outcome == "finished"]
    if len(finished) < MIN_TRIALS_FOR_RANKING:
        return [f"The online probe's ranking needs {MIN_TRIALS_FOR_RANKING} finished trials; there are "
                f"{len(finished)}."]
    curves = [{report["step"]: report["probe"] for report in trial.reports if "probe" in report}
              for trial in finished]
    final = [trial.last["validation"] for trial in finished]
    steps = sorted(set.intersection(*(set(curve) for curve in curves)))
    if not steps:
        return ["The finished trials share no step at which all of them ran the online probe: no ranking."]
    rhos = []
    for step in steps:
        rho = spearmanr([curve[step] for curve in curves], final)[0]
        rhos.append(f"step {step}: ρ = {rho:+.2f}" if not math.isnan(rho) else f"step {step}: ρ undefined")
    return [f"The online probe (what ASHA stops trials on) against the final validation score of the "
            f"{len(finished)} finished trials, Spearman's ρ: " + ", ".join(rhos) + ". Near +1: ASHA's early "
            "decisions can be trusted on this data; near 0 or below: give trials a longer grace period."]


def spans_decades(values: pd.Series) -> bool:
    """Positive numbers two or more decades apart, such as learning rates: drawn on a log axis."""
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and (numbers > 0).all() and numbers.max() >= 100 * numbers.min())


def save(figure: plt.Figure, path: Path) -> None:
    """Write a figure as PNG, cropped to what it draws (long dotted keys included), and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def draw_baselines(axis, baselines: dict[str, Any], key: str) -> None:
    """A dashed line at each baseline's `key` score."""
    for (name, baseline), style in zip(baselines.items(), ("--", ":")):
        if baseline.get(key) is not None:
            axis.axhline(baseline[key], color="grey", linestyle=style, label=f"{BASELINE_NAMES[name]}")


def plot_validation_against_params(table: pd.DataFrame, keys: list[str], baselines: dict[str, Any],
                                   path: Path) -> None:
    """Final validation score against each searched key, one panel per key, one point per finished
    trial; the baselines' validation scores as dashed lines."""
    finished = table[table["outcome"] != "baseline"].dropna(subset=["validation"])
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), sharey=True, squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = finished.dropna(subset=[key])
        values = points[key]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        axis.scatter(values.to_numpy(float) if numeric else values.astype(str), points["validation"].to_numpy(float))
        draw_baselines(axis, baselines, "validation")
        if numeric and spans_decades(values):
            axis.set_xscale("log")
        axis.set_xlabel(key)
    axes[0][0].set_ylabel("validation score (what the sweep maximises)")
    if baselines:
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save(figure, path)


def plot_probe_curves(trials: list[TrialRecord], baselines: dict[str, Any], path: Path) -> None:
    """The online probe metric against the pretraining step, one line per trial; the random-init
    encoder's online probe as a dashed line."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        curve = [(report["step"], report["probe"]) for report in trial.reports if "probe" in report]
        if curve:
            axis.plot(*zip(*curve), marker=".", label=f"{trial.trial_id} ({trial.outcome})")
    draw_baselines(axis, baselines, "probe")
    axis.set_xlabel("step")
    axis.set_ylabel("online probe (held-out training examples)")
    if len(trials) <= 20:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))   # beside, not over, the curves
    save(figure, path)


def plot_optuna(plot: Any, study: optuna.Study, path: Path) -> None:
    """Save one of optuna.visualization.matplotlib's plots (they are marked experimental)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        save(plot(study).figure, path)


def format_cell(value: Any) -> str:
    """A value as a markdown table cell: floats to 4 significant digits, missing values empty."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return ""
    if isinstance(value, float):
        value = int(value) if value.is_integer() else f"{value:.4g}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A table in GitHub markdown, one line per row."""
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    return header + "".join("| " + " | ".join(format_cell(value) for value in row) + " |\n"
                            for row in table.astype(object).itertuples(index=False))


def config_text(config: dict[str, Any]) -> str:
    """A config inline: `key=value`, ..."""
    return ", ".join(f"`{key}={format_cell(value)}`" for key, value in config.items())


def plots_section(sweep_dir: Path, dataset: str, trials: list[TrialRecord], table: pd.DataFrame,
                  study: optuna.Study, baselines: dict[str, Any]) -> list[str]:
    """Draw the plots that one dataset's results so far allow; return their markdown lines."""
    plots, keys = sweep_dir / "plots", config_keys(trials)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    lines = []
    if table.loc[table["outcome"] != "baseline", "validation"].notna().any() and keys:
        plot_validation_against_params(table, keys, baselines, plots / f"{dataset}_validation_vs_params.png")
        lines += [f"![validation score against each hyperparameter](plots/{dataset}_validation_vs_params.png)", ""]
    if any(trial.reports for trial in trials):
        plot_probe_curves(trials, baselines, plots / f"{dataset}_probe_curves.png")
        lines += [f"![probe against step](plots/{dataset}_probe_curves.png)", ""]
    if completed:
        plot_optuna(optuna_plots.plot_optimization_history, study, plots / f"{dataset}_history.png")
        lines += [f"![Optuna optimisation history](plots/{dataset}_history.png)", ""]
    if len(completed) >= MIN_TRIALS_FOR_IMPORTANCES:
        plot_optuna(optuna_plots.plot_param_importances, study, plots / f"{dataset}_importances.png")
        lines += [f"![Optuna parameter importances](plots/{dataset}_importances.png)", ""]
    else:
        lines += [f"Parameter importances need {MIN_TRIALS_FOR_IMPORTANCES} completed Optuna trials; "
                  f"the study has {len(completed)}.", ""]
    return lines


def splits_text(baselines: dict[str, Any]) -> str:
    """Which examples the validation and test scores are on, as the baselines' probe names them."""
    if not baselines:
        return ("**validation**: the probe's validation split (it chooses the configuration); **test**: the test "
                "split (it chooses nothing).")
    first = next(iter(baselines.values()))
    splits = first["splits"]
    return (f"Every score is the {first['method']} linear probe's {first['metric']}: fitted on {splits['fit']}; "
            f"**validation** = {splits['validation']} (it chooses the configuration and the probe's L2); "
            f"**test** = the {splits['test']!r} split (it chooses nothing). `probe` is the online probe on "
            f"held-out training examples, which early stopping reads.")


@dataclass
class Study:
    """One dataset's study, read from the sweep folder."""
    name: str
    experiment: Path
    trials: list[TrialRecord]
    study: optuna.Study
    baselines: dict[str, Any]

    @cached_property
    def table(self) -> pd.DataFrame:
        return trial_table(self.trials, self.baselines)

    @cached_property
    def verdict(self) -> list[str]:
        """The report's first lines for this study (each paired bootstrap runs once)."""
        return verdict_lines(self.name, self.experiment, self.table, self.study.direction, self.baselines)


def dataset_section(sweep_dir: Path, study: Study) -> str:
    """Write one dataset's CSV and plots; return its section of report.md."""
    dataset, trials = study.name, study.trials
    table, keys = study.table, config_keys(trials)
    table.to_csv(sweep_dir / f"{dataset}.csv", index=False)
    outcomes = Counter(trial.outcome for trial in trials)
    lines = [f"## {dataset}", "", splits_text(study.baselines), "",
             f"Optuna study `{dataset}`: {study.study.direction.name.lower()} the validation score. {len(trials)} "
             "trials: " + ", ".join(f"{outcomes[outcome]} {outcome}" for outcome in OUTCOMES)
             + f". Every trial and baseline: [{dataset}.csv]({dataset}.csv).", ""]
    best = best_trial(table, study.study.direction)
    if best is None:
        lines += ["No trial has finished yet: no best config.", ""]
    else:
        lines += [f"**Best** (by validation): validation {format_cell(best['validation'])}, test "
                  f"{format_cell(best['test'])} (trial `{best['trial_id']}`) with "
                  f"{config_text({key: best[key] for key in keys})}.", "",
                  f"Best checkpoint: `{best['checkpoint_path']}`", ""]
    lines += ["### Reading the search", ""]
    if best is not None:
        lines += near_bounds(best, study.study, keys) or ["- No best value lies within 5 % of a bound of its range."]
    lines += ["- " + line for line in probe_ranking(trials)]
    sick = [trial for trial in trials if trial.health]
    lines += [f"- Health: {len(sick)} of {len(trials)} trials flagged"
              + (": " + "; ".join(f"`{trial.trial_id}` {trial.health}" for trial in sick) if sick else "")
              + ". (support_rises: the inner step raises the support loss on average; collapsed: the "
                "encoder's features barely differ between examples; NaN loss: the run stopped on one.)", ""]
    lines += plots_section(sweep_dir, dataset, trials, table, study.study, study.baselines)
    lines += ["### Trials", "", markdown_table(table.drop(columns=["checkpoint_path"]))]
    failed = [trial for trial in trials if trial.outcome == "failed"]
    if failed:
        lines += ["### Failed trials", ""]
        lines += [f"- `{trial.trial_id}` with {config_text(trial.config)}: {trial.error or 'no error message'}"
                  for trial in failed]
        lines += [""]
    return "\n".join(lines)


def read_studies(sweep_dir: str | Path, storage: str | None = None) -> tuple[Path, list[Study]]:
    """Every dataset's study in a sweep folder; `storage` is the Optuna storage URL, by default
    SWEEP_DIR/optuna.db."""
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    experiments = find_experiments(sweep_dir)
    if storage is None:
        database = sweep_dir / "optuna.db"
        if not database.exists():   # sqlite would create an empty database
            raise FileNotFoundError(f"{sweep_dir} has no Optuna storage {database.name}; pass --storage URL")
        storage = f"sqlite:///{database}"
    return sweep_dir, [Study(folder.name, folder, read_trials(folder), load_study(folder.name, storage),
                             read_baselines(folder)) for folder in experiments]


def report_head(report: Path) -> str:
    """report.md's first lines: the verdicts, before the first dataset's section."""
    return report.read_text().split("\n## ", 1)[0]


def write_report(sweep_dir: str | Path, storage: str | None = None) -> Path:
    """Write SWEEP_DIR/<dataset>.csv for every dataset, SWEEP_DIR/plots/*.png and SWEEP_DIR/report.md.

    `storage` is the Optuna storage URL, by default SWEEP_DIR/optuna.db. Returns the path of report.md.
    """
    sweep_dir, studies = read_studies(sweep_dir, storage)
    sections = [dataset_section(sweep_dir, study) for study in studies]
    first_lines = [line for study in studies for line in study.verdict]
    report = sweep_dir / "report.md"
    report.write_text(f"# Sweep report: {sweep_dir.name}\n\n" + "\n\n".join(first_lines) + "\n\n"
                      + "\n".join(sections))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (storage_path of the Tune runs)")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///SWEEP_DIR/optuna.db)")
    args = parser.parse_args()
    try:
        print(write_report(args.sweep_dir, args.storage))
    except FileNotFoundError as error:
        parser.exit(1, f"report.py: error: {error}\n")


if __name__ == "__main__":
    main()
