# streamtune: two commands matter, `make demo` and `make test`.
# Both install what is missing into ./.venv (idempotent: a stamp file records
# the lock's hash, so a second run skips the install).

PY          ?= python3
VENV        := .venv
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.installed-$(shell cat requirements.lock Makefile pyproject.toml | sha1sum | cut -c1-12)
DEEPSPEED   := deepspeed==0.19.8
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint typecheck kafka-jars s3-server schema-registry clean \
        gpu-deps gpu-check prometheus ops

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -r requirements.lock
	DS_BUILD_OPS=0 $(BIN)/uv pip install --python $(BIN)/python --no-build-isolation --no-deps $(DEEPSPEED)
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

kafka-jars: install
	$(BIN)/streamtune kafka fetch

# SeaweedFS, the S3 server the object-storage tests start (built once from the Go module
# proxy into ~/.cache/streamtune/seaweedfs; about 7 CPU-minutes the first time).
s3-server: install
	$(BIN)/python -m harness.s3server fetch

# Apicurio Registry, the schema registry the Avro tests start (a ready-to-run distribution from
# Maven Central, unpacked once into ~/.cache/streamtune/schema-registry).
schema-registry: install
	$(BIN)/python -m harness.schema_registry fetch

# Prometheus and promtool (Debian's package, unpacked into ~/.cache/streamtune/prometheus, not
# installed), for the alert rules' tests.
prometheus: install
	$(BIN)/python -m services.prometheus fetch

# A real Prometheus beside a running `streamtune up` on this machine: it scrapes every Ray node
# the session lists and evaluates deploy/prometheus/alerts.yml; prints its URL, Ctrl-C stops it.
# OPS_ARGS: e.g. --port 9090 --scrape-interval 5s --session-dir /tmp/ray/session_...
ops: install
	$(BIN)/python -m services.prometheus run $(OPS_ARGS)

# The GPU check runs where Ray is not installed and nothing can be downloaded: `make gpu-deps`
# (here) puts what it needs beyond PyTorch, transformers and pyarrow under build/gpu-deps, which
# travels with the working tree; `make gpu-check` (there) runs it with whatever python3 has torch.
gpu-deps: install
	$(BIN)/python -m harness.gpu_deps

gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,python3) -m harness.gpu_check $(GPU_CHECK_ARGS)

demo: install kafka-jars
	$(BIN)/streamtune demo $(DEMO_ARGS)

# The whole suite: unit tests, then integration tests against a real Kafka
# broker, a local Ray instance and Ray Serve. Nothing is skipped.
# The multi-node cluster test gets a fresh Python process: its driver joins a
# `ray start` cluster, which a Ray session started earlier in the same process
# would stand in the way of.
ISOLATED    := tests/services/test_cluster.py
test: install kafka-jars s3-server schema-registry prometheus lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(ISOLATED))
	@for t in $(ISOLATED); do $(BIN)/python -m pytest $(PYTEST_ARGS) $$t || exit 1; done

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

clean:
	rm -rf $(VENV) state .pytest_cache .mypy_cache .ruff_cache
