# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv data clean

# one pytest worker per core, each single-threaded (tests/conftest.py sets torch to one thread too)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

$(STAMP): pyproject.toml requirements.lock requirements-test.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock -r requirements-test.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps k-diffusion==0.1.1.post1 torch-fidelity==0.4.0
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# data that pip cannot bring (Fashion-MNIST, a Debian package): installed where possible, else one line saying how
data:
	@bash tools/get_data.sh

demo: $(STAMP) data
	$(PY) -m difflab demo

# the linter and formatter configured in pyproject.toml ([tool.ruff]); CI runs them through `make test`
# (`$(PY) -m ruff format difflab papers tests bench tools` formats a change)
lint: $(STAMP)
	$(PY) -m ruff check difflab papers tests bench tools
	$(PY) -m ruff format --check difflab papers tests bench tools

test: $(STAMP) data lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest tests -n $(JOBS) --dist worksteal --durations=15 -rs

bench: $(STAMP)
	$(PY) bench/samplers.py

clean:
	rm -rf $(VENV) build *.egg-info
