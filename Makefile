# The two commands of the README: `make demo` and `make test`. Both set up .venv first (once per pyproject change).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where CIFAR-10 lies (passed to the product by flag; the product never assumes a path): DATA=..., else
# DYNASTUDY_DATA, else ../shared/data beside the checkout.
DATA ?= $(or $(DYNASTUDY_DATA),$(abspath ../shared/data))
RESULTS ?= $(abspath dynastudy-results)
STUDY ?= demo

.PHONY: setup tools demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# A small real sweep: 6 Elastic ResNet-20 trials on a 4,000-image CIFAR-10 subset (2 epochs each, 2 at a time),
# local Ray, Optuna and MLflow in SQLite under $(RESULTS); then the Pareto front and one `best` answer.
demo: $(STAMP)
	$(BIN)/dynastudy sweep --method elastic --study $(STUDY) --dataset cifar10 --data-dir $(DATA) \
		--subset 4000 --epochs 2 --trials 6 --concurrency 2 --set model.depth=20 --results-dir $(RESULTS)
	$(BIN)/dynastudy best --study $(STUDY) --max-macs 2.5e7 --results-dir $(RESULTS)
	@echo
	@echo "Open the MLflow UI on these results:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(RESULTS)/mlflow.db --host 127.0.0.1 --port 5000"

# Debian's chromium + chromedriver (the dashboard's browser test) and docker-compose (the compose file's
# validation test), when missing (apt-get, as root or with sudo).
tools:
	@sh scripts/install-test-tools.sh

test: $(STAMP) tools
	DYNASTUDY_DATA=$(DATA) $(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) build *.egg-info
