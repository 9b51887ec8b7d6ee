# make run  — install what is needed, then run the gate on the built-in example.
# make test — install what is needed (Python packages and Debian tools), then run the whole suite,
#             then the HTTP suite again on the pure-Python engine (docs/gate.md, "The HTTP engine").
# make image — build the container image from the Dockerfile (docs/deployment.md, "The image").

PYTHON ?= python3
, := ,
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONFIG := config.example.toml
SAMPLES := daemon/icpgate/samples/filings.ndjson

# The image: podman, else buildah. BASE= another base image (empty: the Dockerfile's, from Docker
# Hub; `make debian-base` prints one made from Debian's packages); CA_BUNDLE= the certificates pip
# trusts while building (this machine's, for a TLS-inspecting proxy; not kept in the image);
# ISOLATION=chroot runs the RUN steps without an OCI runtime (cgroups v1 or hybrid hosts, containers).
IMAGE ?= localhost/icpgate:latest
BASE ?=
BUILDER ?= $(firstword $(shell command -v podman buildah 2>/dev/null))
CA_BUNDLE ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
ISOLATION ?= chroot

# The HTTP tests run a second time with ICPGATE_HTTP_ENGINE=python: both engines pass them all.
HTTP_SUITE := $(addprefix tests/,test_http_engine.py test_gate_http.py test_http_framing.py \
	test_http_responses_gate.py test_http_schemes.py test_differential.py test_chunk_cost.py \
	test_inspection_cost.py test_gate_auto.py test_gate_tls.py test_sniff.py)

.PHONY: run test lint build-deps system-deps image debian-base bench bench-scale clean

# The install compiles the HTTP engine (daemon/icpgate/gate/http/_engine.pyx): a C compiler and
# Python's headers first.
$(STAMP): pyproject.toml daemon/icpgate/gate/http/_engine.pyx | build-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/icpgate import $(SAMPLES) -c $(CONFIG)
	$(PY) -m icpgate.cli.demo -c $(CONFIG)

build-deps:
	bash tests/build-deps.sh $(PYTHON)

system-deps:
	bash tests/system-deps.sh

test: $(STAMP) system-deps
	$(VENV)/bin/ruff check daemon tests bench
	$(PY) -m pytest
	ICPGATE_HTTP_ENGINE=python $(PY) -m pytest -q $(HTTP_SUITE)

image:
	@test -n "$(BUILDER)" || { echo "make image needs podman or buildah (apt-get install podman)" >&2; exit 1; }
	$(BUILDER) build --format docker --isolation=$(ISOLATION) $(if $(BASE),--build-arg BASE=$(BASE)) \
		$(if $(CA_BUNDLE),--secret id=ca-bundle$(,)src=$(CA_BUNDLE)) --tag $(IMAGE) .

debian-base:
	@bash tests/debian-base.sh

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
