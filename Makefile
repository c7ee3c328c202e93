# detloop: `make demo` runs the whole loop on the embedded demo data; `make test` runs the tests.
# Both create the virtual environment first if it is missing (offline apart from the package index).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
export YOLO_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export FIFTYONE_DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
OPENCV := opencv-python-headless==4.14.0.94
PYTEST_ARGS ?=

.PHONY: install chromium demo test test-slow test-team team-deps ui lint clean-build bench

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (detloop needs Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	# ultralytics pulls opencv-python and fiftyone opencv-python-headless; both write cv2/. Keep one.
	$(BIN)/pip uninstall -q -y opencv-python opencv-python-headless
	$(BIN)/pip install --disable-pip-version-check -q --no-deps $(OPENCV)
	$(BIN)/python -c "import cv2, detloop; print('cv2', cv2.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/detloop demo-data
	# record the data in the local DVC cache; data.dvc stays as committed (the generator is deterministic)
	$(BIN)/dvc commit -f -q data.dvc
	$(BIN)/dvc repro
	@echo
	$(BIN)/detloop registry
	@echo
	@echo "Metrics: $(BIN)/dvc metrics show"
	@echo "MLflow UI: make ui   (then open http://127.0.0.1:5000)"

test: install chromium
	$(BIN)/python -m pytest -m "not team and not slow" $(PYTEST_ARGS)

# The slow tests (marker `slow`: the README's pipeline on fresh clones, the UI drives in Chromium, Label
# Studio, FiftyOne's App, the recipe search, the shared server's races). CI runs them after `make test`.
test-slow: install chromium labelstudio
	$(BIN)/python -m pytest -m "slow and not team" $(PYTEST_ARGS)

# The team setting's tests (tests/team/, marker `team`): real PostgreSQL, moto S3, an MLflow server with
# basic auth, two clones, a single-node SLURM. CI runs them after `make test`.
test-team: install team-deps
	$(BIN)/python -m pytest -m team $(PYTEST_ARGS)

# Debian's PostgreSQL 15 and SLURM (slurmctld slurmd slurm-client munge) for the team stack.
team-deps:
	@test -x /usr/lib/postgresql/15/bin/initdb && command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  echo "installing Debian's postgresql and slurm for the team stack"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    postgresql slurmctld slurmd slurm-client munge >/dev/null; }

# Headless Chromium renders the MLflow UI and the FiftyOne App in the UI tests (Debian package chromium).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium for the UI tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Re-measure every figure of benchmarks/README.md and print old against new (benchmarks/README.md, "Re-measuring
# everything"); e.g. BENCH_ARGS="--only mix_scale,serve_load" or BENCH_ARGS=--no-run. Exit 1 on a regression.
BENCH_ARGS ?=

bench: install
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

# The local team stack (PostgreSQL, S3 by moto, MLflow server with basic auth; TEAM_ARGS=--slurm adds SLURM):
# `make team-up`, then `source build/team/env.sh`; `make team-down` stops every process it started.
.PHONY: team-up team-down
TEAM_ARGS ?=

team-up: install
	$(BIN)/detloop team up $(TEAM_ARGS)

team-down: install
	$(BIN)/detloop team down

# Label Studio for `detloop review annotate`: the server runs from a virtualenv of its own (build/labelstudio/venv;
# label-studio pins Django, which stays out of .venv). `make labelstudio` builds it (once, ~1 GB; the tests need it),
# `make labelstudio-up` starts the server on 127.0.0.1 and `make labelstudio-down` stops it (by pid).
.PHONY: labelstudio labelstudio-up labelstudio-down

labelstudio: install
	$(BIN)/detloop annotation install

labelstudio-up: install
	$(BIN)/detloop annotation up

labelstudio-down: install
	$(BIN)/detloop annotation down

# the UI test corrects boxes in a real Label Studio (tests/integration/test_labelstudio.py, a slow test)
