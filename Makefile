# perturbscope — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SCREEN ?= norman2019_subset
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
# Airflow lives in its own environment (its pins and the project's stay apart); the tests run the
# retrain DAG with it (`airflow dags test`)
AIRFLOW_VENV  := .venv-airflow
AIRFLOW_LOCK  := requirements-airflow.lock
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed
AIRFLOW_VERSION := 3.3.2

export KEDRO_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup lock run test lint format viz mlflow-ui bench retrain airflow-dag airflow-env airflow-lock clean help

help:
	@echo "make run     set up .venv and run every pipeline on the demo screen (SCREEN=$(SCREEN))"
	@echo "make test    set up .venv and run the test suite"
	@echo "make lint    ruff: lint and format check (make format rewrites)"
	@echo "make viz     open kedro-viz;  make mlflow-ui  open the MLflow UI"
	@echo "make bench   install the bench extra (scvi-tools) and run the side-by-side benchmarks"
	@echo "make retrain retrain every registered screen whose file is new or changed"
	@echo "make airflow-dag  regenerate airflow_dags/ from conf/airflow/"
	@echo "make airflow-env  Airflow $(AIRFLOW_VERSION) in $(AIRFLOW_VENV) from $(AIRFLOW_LOCK) (the DAG test uses it)"
	@echo "make lock    re-resolve $(LOCK) from pyproject.toml (after changing a dependency)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every package comes pinned from the lock file, so a fresh clone gets the environment the
# tests ran on; the project itself is installed on top without resolving anything again.
# Reinstall only when the lock changes: a second call reuses the venv.
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

# Re-resolve the whole environment (runtime + test extra) from pyproject.toml with pip-tools.
# torch's local build label (+cpu) is dropped so the pin resolves on any machine.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip-tools==7.6.2
	.venv-lock/bin/pip-compile --quiet --allow-unsafe --strip-extras --extra test --no-emit-index-url \
		--no-emit-find-links --output-file $(LOCK) pyproject.toml
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+/\1/' $(LOCK)

setup: $(STAMP)

$(AIRFLOW_STAMP): $(AIRFLOW_LOCK)
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q -r $(AIRFLOW_LOCK)
	@touch $(AIRFLOW_STAMP)

airflow-env: $(AIRFLOW_STAMP)

# Re-resolve the Airflow environment (after changing AIRFLOW_VERSION)
airflow-lock:
	rm -rf .venv-airflow-lock && $(PYTHON) -m venv .venv-airflow-lock
	.venv-airflow-lock/bin/python -m pip install -q apache-airflow==$(AIRFLOW_VERSION)
	.venv-airflow-lock/bin/python -m pip freeze --exclude-editable > $(AIRFLOW_LOCK)

run: setup
	$(BIN)/kedro run --params screen=$(SCREEN)
	@ls -d data/08_reporting/$(SCREEN)/report.html/*/report.html | tail -n 1 | sed "s/^/Report: /"

test: setup airflow-env
	$(BIN)/python -m pytest

# ruff's rules and line length are in pyproject.toml ([tool.ruff])
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

viz: setup
	$(BIN)/kedro viz run

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlruns

bench: setup
	$(BIN)/python -m pip install -e ".[test,bench]"
	$(BIN)/python bench/contrastive_vs_scvi.py
	$(BIN)/python bench/linear_vs_scvi.py
	$(BIN)/python bench/escape_vs_scvi.py

retrain: setup
	$(BIN)/python -m perturbscope.ops.retrain

# kedro-mlflow's hook is off while generating: the airflow env names the deployment's tracking server
airflow-dag: setup
	DYNACONF_DISABLE_HOOKS_FOR_PLUGINS='@json ["kedro_mlflow", "kedro-mlflow"]' \
		$(BIN)/kedro airflow create --env airflow --jinja-file conf/airflow/retrain_dag.j2

clean:
	rm -rf $(VENV) .venv-lock $(AIRFLOW_VENV) .venv-airflow-lock .viz mlruns mlflow.db build
