# The two commands a newcomer runs are `make demo` and `make test`; both set themselves up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# The local emulator's API for `make demo` and `make up`: v1 (Iamport) or v2 (PortOne V2).
API ?= v1
export IAMPORT_EMULATOR_API := $(API)

.PHONY: setup demo test test-fast lint bench bench-full simulate up clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/overrides.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python --overrides requirements/overrides.txt \
		-e '.[mysql,test,dev]'
	# setuptools leaves the package's metadata in plugins/, its package dir. Airflow puts the
	# plugins folder on sys.path, finds the distribution there and in .venv, and registers the
	# plugin twice ("Plugin 'iamport_billing' already registered"). The .venv copy is the one.
	rm -rf plugins/*.egg-info
	touch $(STAMP)

demo: setup
	$(BIN)/python -m iamport_billing.demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e and not chaos"

lint: setup
	$(BIN)/ruff check plugins dags tests bench
	$(BIN)/ruff format --check plugins dags tests bench

bench: setup
	$(BIN)/python -m bench.run

bench-full: setup
	$(BIN)/python -m bench.run --full

# A year of billing for 1,000 subscriptions, day by day through the real DAGs (scenarios/).
simulate: setup
	$(BIN)/iamport-billing simulate scenarios/default.yaml --api $(API) --out .simulate/report.json

up: setup
	$(BIN)/python -m iamport_billing.devserver

clean:
	rm -rf $(VENV) .demo .simulate .pytest_cache
