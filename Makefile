# Two commands on a fresh machine (see README): `make quickstart` and `make test`.
PY ?= python3
VENV ?= .venv
EXTRAS ?= dev,ray,beam,airflow
CONSTRAINTS ?= requirements/constraints.txt
BIN := $(VENV)/bin

.PHONY: install quickstart test lint bench clean browser

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

# Writes ./sample, curates it into ./out/quickstart, and checks the result against VILA's output contract.
quickstart: install
	$(BIN)/vila2-curate sample sample
	$(BIN)/vila2-curate run configs/quickstart.yaml
	$(BIN)/vila2-curate run configs/recaption.yaml --round 1
	$(BIN)/vila2-curate validate out/quickstart/r0 --world-size 8
	$(BIN)/vila2-curate validate out/quickstart/r1
	$(BIN)/vila2-curate report out/quickstart/r0 out/quickstart/r1

lint: install
	$(BIN)/ruff check .

# the report test opens the page in Debian's headless Chromium (installed with apt-get when missing)
browser:
	bash .ci/install_chromium.sh || [ -z "$$CI" ]  # outside CI a missing browser only skips that test

test: install lint browser
	$(BIN)/python -m pytest -q

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf sample out
