"""tune/sweep.py on a real `ray start --head` on 127.0.0.1: a sweep with early stopping, of either kind
of trial, whose driver is killed mid-sweep and resumed ends with every trial terminated and the Optuna study's history
kept; `ray job submit` runs a sweep to SUCCEEDED; a wrong search-space key fails naming it."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import hydra
import optuna
import pandas as pd
import pytest

from metamae.config import CONFIG_DIR, DatasetConfig
from metamae.data.shards import ShardWriter
from metamae.data.synthetic import synthetic
from metamae.modality import ImageSpec, spec_from_dict
from metamae.process import start_command
from tests.ray_head import RAY, two_cpu_head
from tune import sweep
from tune.report import write_report

ROOT = Path(__file__).resolve().parents[1]

PORT, DASHBOARD_PORT = 6480, 8480               # not Ray's defaults, which other tests' Rays use
QUICK = ["train.steps=20", "train.log_every=10", "sweep.grace_period=10", "sweep.reduction_factor=2",
         "probe.epochs=1", "execution.probe_examples=200", "execution.cpus_per_worker=0.4", "sweep.baseline=false"]


@pytest.fixture(scope="module")
def head():
    with two_cpu_head("raysweep-", PORT, DASHBOARD_PORT) as (env, work):
        yield env, work


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "tune/sweep.py", f"sweep.dir={sweep_dir.parent}", f"sweep.name={sweep_dir.name}",
            *QUICK, *overrides]


def compose_sweep(overrides: list[str]):
    """configs/sweep.yaml with `overrides`, as `python tune/sweep.py` composes it."""
    start_command()
    sweep.register_sweep()
    with hydra.initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra.compose("sweep", overrides=overrides)


def study_trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    if not (sweep_dir / "optuna.db").is_file():
        return []
    try:
        return optuna.load_study(study_name="digits", storage=f"sqlite:///{sweep_dir}/optuna.db").get_trials()
    except (KeyError, ValueError, optuna.exceptions.StorageInternalError):
        return []                                                # the study is being created


@pytest.mark.parametrize("mode, num_trials, kill_after", [([], 6, 3), (["execution.num_workers=2"], 3, 1)],
                         ids=["loop-in-trial", "ray-train-run"])
def test_a_killed_sweep_resumes_keeping_finished_trials_and_the_study_history(head, tmp_path, mode, num_trials,
                                                                              kill_after):
    """Either kind of trial: one worker (the loop in the trial's process, 5 at once) or two (a Ray Train
    run each, 2 at once); the driver is killed once kill_after of the num_trials have finished."""
    env, _ = head
    env = {**env, "RAY_ADDRESS": f"127.0.0.1:{PORT}"}
    sweep_dir = tmp_path / "killed"
    command = sweep_command(sweep_dir, f"sweep.num_samples={num_trials}", "sweep.baseline=true", *mode)
    log = tmp_path / "killed-driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=out)
    try:
        deadline = time.time() + 400
        while len([t for t in study_trials(sweep_dir) if t.state.is_finished()]) < kill_after:
            assert driver.poll() is None, f"the sweep ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no {kill_after} trials finished in time"
            time.sleep(2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)                # the driver, as a lost head node would
        driver.wait()
    before = {t.number: (t.state, t.value) for t in study_trials(sweep_dir) if t.state.is_finished()}
    # The stopped sweep's report has its baselines, probed before the first trial, in its first line:
    # against the best trial so far, or, where Tune's last snapshot before the kill holds no finished
    # trial yet (it lags the Optuna study by seconds), on their own.
    baselines = json.loads((sweep_dir / "digits" / "baselines.json").read_text())["probes"]
    assert set(baselines) == {"random_init", "raw_input"} and baselines["raw_input"]["test"] > 0.9
    stopped = write_report(sweep_dir).read_text().splitlines()[2]
    assert stopped.startswith("**digits") and "random-init encoder" in stopped, stopped
    assert f"raw-input probe (test {baselines['raw_input']['test']:.4f})" in stopped or \
           f"raw-input probe test {baselines['raw_input']['test']:.4f}" in stopped, stopped

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the digits sweep" in resumed.stdout

    table = pd.read_csv(sweep_dir / "digits.csv")                # the report, written at the end
    assert list(table.loc[table["outcome"] == "baseline", "trial_id"]) == ["baseline: random-init encoder",
                                                                          "baseline: raw-input probe"]
    trials = table[table["outcome"] != "baseline"]
    assert len(trials) == num_trials and set(trials["status"]) == {"TERMINATED"}, trials[["trial_id", "status"]]
    # Each trial ran to the final evaluation, or ASHA stopped it at its rung (step 10 of 20): how many
    # of each is up to the probes (test_report.py pins ASHA's choices with reports of its own).
    evaluated = trials["validation"].notna()
    assert evaluated.any() and (trials.loc[evaluated, "step"] == 20).all(), trials[["trial_id", "step", "validation"]]
    assert (trials.loc[~evaluated, "step"] == 10).all(), trials[["trial_id", "step", "validation"]]
    after = {t.number: t for t in study_trials(sweep_dir)}
    for number, (state, value) in before.items():                # the history is kept as it was
        assert (after[number].state, after[number].value) == (state, value)
    finished = [t for t in after.values() if t.state.is_finished()]
    assert len(finished) >= num_trials
    assert (sweep_dir / "report.md").is_file() and list((sweep_dir / "plots").glob("*.png"))


def test_ray_job_submit_runs_a_sweep_to_succeeded_with_its_progress_in_the_job_log(head, tmp_path):
    env, _ = head
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
         *["python", *sweep_command(tmp_path / "job", "sweep.num_samples=1")[1:]]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in submit.stdout.splitlines() if "submitted successfully" in line)
    status = subprocess.run([RAY, "job", "status", "--address", address, job_id], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "succeeded" in status.stdout.lower(), status.stdout
    logs = subprocess.run([RAY, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert "Trial status" in logs and "digits: best validation score" in logs
    header = [line for line in logs.splitlines() if "Trial name" in line][-1]     # once trials have reported
    assert " step " in header and " probe " in header, header    # Tune's table shows the online probe
    assert (tmp_path / "job" / "report.md").is_file()


@pytest.mark.parametrize("override, message", [
    ("+space.train.lrr={dist:uniform,low:0,high:1}", "space.train.lrr: 'train.lrr' is not a config key"),
    ("+space.train.lr={dist:gaussian,low:0,high:1}", "space.train.lr is"),
    ("sweep.num_sampels=3", "num_sampels"),
    ("datasets=[digits,pamap2]", f"dataset 'pamap2': no prepared shards at {ROOT / 'data' / 'pamap2'}"),
])
def test_a_wrong_sweep_key_fails_before_anything_starts_naming_it(override, message, tmp_path):
    run = subprocess.run(sweep_command(tmp_path / "bad", override), cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0 and message in run.stdout + run.stderr
    assert not (tmp_path / "bad").exists()


def test_a_sweep_into_a_bucket_keeps_hydras_log_folder_local_and_unmangled(tmp_path):
    """Hydra's run folder follows sweep.dir; for s3://... it would be a local folder named 's3:'."""
    run = subprocess.run([sys.executable, str(ROOT / "tune" / "sweep.py"), "sweep.dir=s3://bucket/sweeps",
                          "dataset=pamap2"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "no prepared shards" in run.stdout + run.stderr       # after Hydra's set-up
    assert [p.name for p in tmp_path.iterdir()] == [".hydra"]


def test_a_new_sweep_refuses_a_storage_that_holds_another_sweeps_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="digits", storage=storage)            # an earlier sweep's
    run = subprocess.run(sweep_command(tmp_path / "second", f"sweep.storage={storage}"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "already holds an Optuna study named 'digits'" in run.stdout + run.stderr
    assert "Trial status" not in run.stdout


@pytest.mark.parametrize("where", ["sweep folder", "sweep.storage"])
def test_a_reader_of_the_study_database_cannot_break_the_sweep_that_creates_it(where, tmp_path):
    """Whoever opens a fresh SQLite file first creates Optuna's tables in it; two at once collide
    ("table studies already exists"). Here a reader polls the database while the sweep creates it,
    as optuna-dashboard or the killed-sweep test above do. Plain creation failed 11 of 20 rounds, so
    10 rounds miss it with a chance of about 3 in 10,000. The database is the default
    SWEEP_DIR/optuna.db, or one that sweep.storage names."""
    def poll(database: Path, stop: threading.Event) -> None:
        while not stop.is_set():
            if database.is_file():
                try:
                    optuna.load_study(study_name="digits", storage=f"sqlite:///{database}")
                except Exception:                                  # no study yet, or a half-made one
                    pass

    for round_ in range(10):
        sweep_dir, elsewhere = tmp_path / str(round_), tmp_path / f"studies-{round_}" / "study.db"
        database = sweep_dir / "optuna.db" if where == "sweep folder" else elsewhere
        config = sweep.SweepConfig(storage=None if where == "sweep folder" else f"sqlite:///{elsewhere}")
        stop = threading.Event()
        reader = threading.Thread(target=poll, args=(database, stop))
        reader.start()
        try:
            storage = sweep.optuna_storage(config, str(sweep_dir))
        finally:
            stop.set()
            reader.join()
        optuna.create_study(study_name="digits", storage=storage)
        assert [p.name for p in database.parent.iterdir()] == [database.name]


def test_a_trial_gets_its_dotted_values_typed_and_checked():
    base = {"dataset": {"name": "digits", "input": {"kind": "image", "channels": 1, "height": 8, "width": 8,
                                                    "patch": 2}, "num_classes": 10, "metric": "accuracy",
                        "source": "digits"}}
    cfg = sweep.trial_config(base, {"objective.inner_lr": 0.3, "train.lr": 0.01}, out_dir="x")
    assert cfg.objective.inner_lr == 0.3 and cfg.train.lr == 0.01 and cfg.out_dir == "x"
    with pytest.raises(ValueError, match="objective.mask_ratio is 1.5"):
        sweep.trial_config(base, {"objective.mask_ratio": 1.5}, out_dir="x")
    space = sweep.search_space({"objective": {"inner_lr": {"dist": "loguniform", "low": 0.1, "high": 1.0}},
                                "model": {"enc_depth": {"choices": [2, 4]}}}, base | {"model": {"enc_depth": 4},
                                                                                     "objective": {"inner_lr": 0.5}})
    assert set(space) == {"objective.inner_lr", "model.enc_depth"}
    with pytest.raises(ValueError, match=r"space.objective.mask_ratio can draw 1.5.*objective.mask_ratio is 1.5"):
        sweep.search_space({"objective": {"mask_ratio": {"dist": "uniform", "low": 0.5, "high": 1.5}}},
                           base | {"objective": {"mask_ratio": 0.5}})
    depth = sweep.search_space({"model": {"enc_depth": {"dist": "int", "low": 1, "high": 2}}},
                               base | {"model": {"enc_depth": 4}})
    assert {depth["model.enc_depth"].sample() for _ in range(50)} == {1, 2}                 # high included


def test_a_trial_holds_its_worker_and_on_shards_keeps_a_cpu_share_for_its_ray_data_tasks():
    from dataclasses import replace

    from metamae.config import ExecutionConfig
    digits = sweep.SweepJobConfig(dataset=DatasetConfig(name="digits", source="digits"))
    shards = sweep.SweepJobConfig(dataset=DatasetConfig(name="pamap2", source="shards", path="data/pamap2"))
    for one_worker in (digits, shards):                     # the loop in the trial's process, reading its data
        assert sweep.trial_resources(one_worker) == sweep.TrialResources(({"CPU": 0.5},), ())
    in_bucket = replace(digits, sweep=replace(digits.sweep, dir="s3://bucket/sweeps"))   # a Ray Train run
    assert sweep.trial_resources(in_bucket) == sweep.TrialResources(({"CPU": 0.1},), ({"CPU": 0.5},))
    streaming = replace(shards, execution=ExecutionConfig(num_workers=2))         # two workers stream through Ray Data,
    assert sweep.trial_resources(streaming).trial == ({"CPU": 0.1}, {"CPU": 1.0})  # in a CPU the trial reserves
    assert sweep.trial_resources(streaming).total()["CPU"] == pytest.approx(2.1)   # (tests/test_sweep_shards.py)


def test_a_trial_on_a_custom_dataset_carries_the_manifests_name_input_classes_and_metric(tmp_path):
    """configs/dataset/custom.yaml leaves them to the manifest; the trials' config must hold them, as
    every checkpoint stores it and rebuilds its model from it (metamae.evaluate)."""
    data = synthetic(ImageSpec(channels=1, height=8, width=8, patch=2), num_classes=3, train=40, test=10)
    writer = ShardWriter(tmp_path / "mine", "mine", data.spec, 3, "weighted_f1", progress=False)
    writer.add("train", data.train.x, data.train.y)
    writer.add("test", data.test.x, data.test.y)
    writer.finish()
    job = compose_sweep(["dataset=custom", f"dataset.path={tmp_path / 'mine'}"])
    [(_, base, _)] = sweep.studies(job)
    assert job.dataset.name == base["dataset"]["name"] == "mine"           # sweeps/.../mine, the manifest's name
    assert spec_from_dict(base["dataset"]["input"]) == data.spec
    assert (base["dataset"]["num_classes"], base["dataset"]["metric"]) == (3, "weighted_f1")


def test_a_resumed_sweep_refuses_settings_its_trials_did_not_start_with(tmp_path):
    base = {"train": {"steps": 600, "lr": 1e-3}, "dataset": {"name": "digits", "input": {"patch": 2}}}
    sweep.save_base(str(tmp_path / "digits"), base)
    sweep.check_same_base(str(tmp_path / "digits"), base)                    # the same command resumes
    changed = base | {"train": {"steps": 900, "lr": 1e-3}}
    with pytest.raises(ValueError, match=r"started with train.steps=600; resuming it with train.steps=900"):
        sweep.check_same_base(str(tmp_path / "digits"), changed)
    sweep.check_same_base(str(tmp_path / "older"), changed)                  # a sweep from before the file


def test_a_studys_baselines_are_kept_for_its_config_and_probed_again_for_another(tmp_path):
    job = compose_sweep(["execution.probe_examples=100"])
    [(_, base, _)] = sweep.studies(job)
    experiment = str(tmp_path / "digits")
    first = sweep.baseline_probes_once(base, experiment)
    assert set(first) == {"random_init", "raw_input"} and first["raw_input"]["test"] > 0.95
    saved = (tmp_path / "digits" / "baselines.json").stat().st_mtime_ns
    assert sweep.baseline_probes_once(base, experiment) == first
    assert (tmp_path / "digits" / "baselines.json").stat().st_mtime_ns == saved          # read, not probed again
    wider = json.loads(json.dumps(base))
    wider["model"]["enc_width"] = 32
    other = sweep.baseline_probes_once(wider, experiment)
    assert other["random_init"]["test"] != first["random_init"]["test"]
    assert json.loads((tmp_path / "digits" / "baselines.json").read_text())["config"]["model"]["enc_width"] == 32
