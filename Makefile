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

.PHONY: install chromium demo test ui lint clean-build

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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

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
