"""The report of a sweep: a CSV per dataset, plots, and report.md, from a Ray Tune + Optuna sweep folder.

    python tune/report.py SWEEP_DIR [--storage URL]

A sweep folder holds one Tune experiment folder per dataset and the Optuna storage
(default `sqlite:///SWEEP_DIR/optuna.db`) with one study per dataset, named after it. For each
dataset the report reads
  - every trial's status, config and error file from Tune's newest `experiment_state-*.json`,
    read as plain JSON (`ray.tune.ExperimentAnalysis` reads the same file but shows RUNNING trials
    as PENDING, and would make this script import Ray),
  - every report of a trial from its `result.json` (`progress.csv` keeps only the keys of the first
    report, so it lacks `objective` and `checkpoint_path`),
  - the direction (which objective is best) and the finished trials of the Optuna study.
It works on a sweep that is still running, as of Tune's last copy of the experiment into SWEEP_DIR (every
~10 s): trials without reports yet, a half-written last line of `result.json` and studies with no completed
trial are reported as what they are.
"""
import argparse
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

MIN_TRIALS_FOR_IMPORTANCES = 5   # completed trials below which fANOVA importances are noise
METRICS = ["objective", "probe", "step", "time_total_s"]   # from a trial's last report, in this order
OUTCOMES = ["finished", "stopped early", "failed", "pending or running"]


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
    def outcome(self) -> str:
        """finished, stopped early (ended without a final evaluation: ASHA), failed, or pending or running."""
        if self.status == "TERMINATED":
            return "finished" if "objective" in self.last else "stopped early"
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


def config_keys(trials: list[TrialRecord]) -> list[str]:
    """Every searched key, in the order trials first show them."""
    return list(dict.fromkeys(key for trial in trials for key in trial.config))


def trial_table(trials: list[TrialRecord]) -> pd.DataFrame:
    """One row per trial: id, status, outcome, config, final objective, last probe and step, time, error and
    checkpoint."""
    keys = config_keys(trials)
    rows = [{"trial_id": trial.trial_id, "status": trial.status, "outcome": trial.outcome,
             **{key: trial.config.get(key) for key in keys},
             **{metric: trial.last.get(metric) for metric in METRICS},
             "error": trial.error, "checkpoint_path": trial.last.get("checkpoint_path")} for trial in trials]
    columns = ["trial_id", "status", "outcome", *keys, *METRICS, "error", "checkpoint_path"]
    return pd.DataFrame(rows, columns=columns).convert_dtypes()   # steps stay integers beside missing values


def best_trial(table: pd.DataFrame, direction: optuna.study.StudyDirection) -> pd.Series | None:
    """The row with the best final objective in the study's direction; None before any trial finished."""
    finished = table.dropna(subset=["objective"])
    if finished.empty:
        return None
    objective = finished["objective"].astype(float)
    return finished.loc[objective.idxmax() if direction == optuna.study.StudyDirection.MAXIMIZE
                        else objective.idxmin()]


def spans_decades(values: pd.Series) -> bool:
    """Positive numbers two or more decades apart, such as learning rates: drawn on a log axis."""
    numbers = pd.to_numeric(values, errors="coerce")
    return bool(numbers.notna().all() and (numbers > 0).all() and numbers.max() >= 100 * numbers.min())


def save(figure: plt.Figure, path: Path) -> None:
    """Write a figure as PNG, cropped to what it draws (long dotted keys included), and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_objective_against_params(table: pd.DataFrame, keys: list[str], path: Path) -> None:
    """Final objective against each searched key, one panel per key, one point per finished trial."""
    finished = table.dropna(subset=["objective"])
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), sharey=True, squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = finished.dropna(subset=[key])
        values = points[key]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        axis.scatter(values.to_numpy(float) if numeric else values.astype(str), points["objective"].to_numpy(float))
        if numeric and spans_decades(values):
            axis.set_xscale("log")
        axis.set_xlabel(key)
    axes[0][0].set_ylabel("objective")
    save(figure, path)


def plot_probe_curves(trials: list[TrialRecord], path: Path) -> None:
    """The online probe metric against the pretraining step, one line per trial."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        curve = [(report["step"], report["probe"]) for report in trial.reports if "probe" in report]
        if curve:
            axis.plot(*zip(*curve), marker=".", label=f"{trial.trial_id} ({trial.outcome})")
    axis.set_xlabel("step")
    axis.set_ylabel("probe")
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
                  study: optuna.Study) -> list[str]:
    """Draw the plots that one dataset's results so far allow; return their markdown lines."""
    plots, keys = sweep_dir / "plots", config_keys(trials)
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    lines = []
    if table["objective"].notna().any() and keys:
        plot_objective_against_params(table, keys, plots / f"{dataset}_objective_vs_params.png")
        lines += [f"![objective against each hyperparameter](plots/{dataset}_objective_vs_params.png)", ""]
    if any(trial.reports for trial in trials):
        plot_probe_curves(trials, plots / f"{dataset}_probe_curves.png")
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


def dataset_section(sweep_dir: Path, dataset: str, trials: list[TrialRecord], study: optuna.Study) -> str:
    """Write one dataset's CSV and plots; return its section of report.md."""
    table, keys = trial_table(trials), config_keys(trials)
    table.to_csv(sweep_dir / f"{dataset}.csv", index=False)
    outcomes = Counter(trial.outcome for trial in trials)
    lines = [f"## {dataset}", "",
             f"Optuna study `{dataset}`: {study.direction.name.lower()} `objective`. {len(trials)} trials: "
             + ", ".join(f"{outcomes[outcome]} {outcome}" for outcome in OUTCOMES)
             + f". Every trial: [{dataset}.csv]({dataset}.csv).", ""]
    best = best_trial(table, study.direction)
    if best is None:
        lines += ["No trial has finished yet: no best config.", ""]
    else:
        lines += [f"**Best**: objective {format_cell(best['objective'])} (trial `{best['trial_id']}`) with "
                  f"{config_text({key: best[key] for key in keys})}.", "",
                  f"Best checkpoint: `{best['checkpoint_path']}`", ""]
    lines += plots_section(sweep_dir, dataset, trials, table, study)
    lines += ["### Trials", "", markdown_table(table.drop(columns=["checkpoint_path"]))]
    failed = [trial for trial in trials if trial.outcome == "failed"]
    if failed:
        lines += ["### Failed trials", ""]
        lines += [f"- `{trial.trial_id}` with {config_text(trial.config)}: {trial.error or 'no error message'}"
                  for trial in failed]
        lines += [""]
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, storage: str | None = None) -> Path:
    """Write SWEEP_DIR/<dataset>.csv for every dataset, SWEEP_DIR/plots/*.png and SWEEP_DIR/report.md.

    `storage` is the Optuna storage URL, by default SWEEP_DIR/optuna.db. Returns the path of report.md.
    """
    sweep_dir = Path(sweep_dir).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a folder")
    experiments = find_experiments(sweep_dir)
    if storage is None:
        database = sweep_dir / "optuna.db"
        if not database.exists():   # sqlite would create an empty database
            raise FileNotFoundError(f"{sweep_dir} has no Optuna storage {database.name}; pass --storage URL")
        storage = f"sqlite:///{database}"
    sections = [dataset_section(sweep_dir, folder.name, read_trials(folder), load_study(folder.name, storage))
                for folder in experiments]
    report = sweep_dir / "report.md"
    report.write_text(f"# Sweep report: {sweep_dir.name}\n\n" + "\n".join(sections))
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
