# Quick start: `make demo` runs the main job; `make test` runs the tests.
# Each makes .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Apache Thrift's own compiler, for the interoperability tests (a test is
# skipped, saying why, where it cannot be installed).
tools:
	@command -v thrift >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq thrift-compiler) >/dev/null 2>&1 \
	      || echo "note: could not install thrift-compiler"; \
	  else echo "note: thrift-compiler not installed; interop tests will be skipped"; fi; }

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy examples/demo.py
	$(BIN)/python -m pytest -q

# The benchmark (about 4 minutes; loopback only). Options through BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--only limit hs256".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
