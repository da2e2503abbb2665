# make demo     : set up .venv if needed, run a small real sweep on the embedded digits (tune/sweep.py)
# make test     : set up .venv if needed, run the whole test suite (what CI runs)
# make test-fast: the tests that need no Ray (under 3 minutes: two pytest processes of one thread each)
# make lint     : ruff
# make baselines: pretrain MetaMAE and MAE on the digits, probe them beside a random-init encoder and the raw inputs
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint baselines bench install clean

install: $(STAMP)

# torch==2.13.0 (a CPU build) goes in first where there is no torch: a bare `torch` requirement
# would pull a multi-GB CUDA build. The constraint keeps whatever torch is there from being swapped.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tune/sweep.py

baselines: $(STAMP)
	$(PY) -m metamae.pretrain baselines=true

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=15 -m "not ray and not cluster" -n 2 --dist worksteal

lint: $(STAMP)
	$(PY) -m ruff check metamae tune tests bench cluster

bench: $(STAMP)
	$(PY) bench/step.py
	$(PY) bench/scaling.py
	$(PY) bench/sweep_overhead.py

clean:
	rm -rf $(VENV) runs sweeps
