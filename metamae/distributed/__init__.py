"""Ray at the edges, around the pure-PyTorch library: Ray Data streaming (stream.py), Ray Train runs
(trainer.py, collectives.py) and the hand-over of a Train run's reports to its Tune trial
(tune_reports.py)."""
