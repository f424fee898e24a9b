# Two commands do everything on a fresh machine: `make repro` and `make test`.
VENV := .venv
STAMP := $(VENV)/.installed-requirements
# DVC stages run `python -m stages.…`: put the venv first so they get its python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test lint bench bench-pruning team-up team-down reproduce study clean-venv

# Reinstall only when requirements.txt changes.
$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

repro: $(STAMP)
	dvc repro

lint: $(STAMP)
	ruff check .

# One worker per core (two on CI); each test file runs whole on one worker, because the
# end-to-end modules share one repo per module and run in file order.
test: lint
	python -m pytest tests -q -n auto --dist loadfile --durations=15

bench: $(STAMP)
	python -m cifar3study.bench.speed --train data/cifar3/train.npz --stats data/cifar3/stats.json --rounds 2 --json bench.json

# What ASHA saves: one study run without a pruner and with it, on the data `dvc repro stats` made (docs/studies.md).
bench-pruning: $(STAMP)
	python -m cifar3study.bench.pruning studies/bench-pruning.yaml --json bench-pruning.json

# A team's stack on loopback (PostgreSQL, S3, MLflow server, DVC remote): eval "$$(make -s team-up)".
team-up: $(STAMP)
	python -m cifar3study.team.stack up

team-down: $(STAMP)
	python -m cifar3study.team.stack down

# Rerun a recorded run here and judge it against its record: make reproduce RUN=<run id, run name or DVC experiment>.
reproduce: $(STAMP)
	python -m cifar3study.reproduction.run $(RUN)

# Tune each model on a holdout, judge the winners on the test split (this box, or RAY_ADDRESS's cluster):
# make study STUDY=studies/<name>.yaml.
study: $(STAMP)
	python -m cifar3study.studies.run $(STUDY)

clean-venv:
	rm -rf $(VENV)
