# make run  — install what is needed, then run the gate on the built-in example.
# make test — install what is needed (Python packages and Debian tools), then run the whole suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG := config.example.toml
SAMPLES := daemon/icpgate/samples/filings.ndjson

.PHONY: run test lint system-deps bench bench-scale clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/icpgate import $(SAMPLES) -c $(CONFIG)
	$(PY) -m icpgate.cli.demo -c $(CONFIG)

system-deps:
	bash tests/system-deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check daemon tests bench
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/ruff format --check daemon tests bench

# Against nginx; then transparent mode (TPROXY, network namespaces) against a static backend, and
# QUIC (Initials decided per CPU second, relay throughput against a minimal UDP relay). Needs root.
bench: $(STAMP) system-deps
	$(PY) bench/run.py
	$(PY) bench/inline_bench.py
	$(PY) bench/quic_bench.py

# Scale figures (docs/performance.md): 1M then 10M filings. Heavy: the 10M run takes most of an hour.
bench-scale: $(STAMP)
	$(PY) bench/scale.py --filings 1000000
	$(PY) bench/feed_bench.py --filings 1000000 --rounds 20
	$(PY) bench/scale.py --filings 10000000

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
