# perturbscope — two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SCREEN ?= norman2019_subset
STAMP  := $(VENV)/.installed

export KEDRO_DISABLE_TELEMETRY := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test viz mlflow-ui bench retrain airflow-dag clean help

help:
	@echo "make run     set up .venv and run every pipeline on the demo screen (SCREEN=$(SCREEN))"
	@echo "make test    set up .venv and run the test suite"
	@echo "make viz     open kedro-viz;  make mlflow-ui  open the MLflow UI"
	@echo "make bench   install the bench extra (scvi-tools) and run the side-by-side benchmarks"
	@echo "make retrain retrain every registered screen whose file is new or changed"
	@echo "make airflow-dag  regenerate airflow_dags/ from conf/airflow/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the dependency list changes: a second call reuses the venv.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/kedro run --params screen=$(SCREEN)
	@echo "Report: data/08_reporting/$(SCREEN)/report.html"

test: setup
	$(BIN)/python -m pytest

viz: setup
	$(BIN)/kedro viz run

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlruns

bench: setup
	$(BIN)/python -m pip install -e ".[test,bench]"
	$(BIN)/python bench/contrastive_vs_scvi.py
	$(BIN)/python bench/linear_vs_scvi.py

retrain: setup
	$(BIN)/python -m perturbscope.retrain

airflow-dag: setup
	$(BIN)/kedro airflow create --env airflow --jinja-file conf/airflow/retrain_dag.j2

clean:
	rm -rf $(VENV) .viz mlruns mlflow.db build
