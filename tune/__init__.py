"""The sweep: `python tune/sweep.py` (Ray Tune + Optuna over metamae's pretraining) and its report
(`python tune/report.py SWEEP_DIR`). Ray stays here and in metamae.distributed; metamae's math and
data run without it."""
