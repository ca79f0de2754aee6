# Quick start: `make demo` runs the main job; `make test` runs the tests.
# Each makes .venv and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-under-load lint bench clean tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# For the interoperability tests: Apache Thrift's own compiler, and for the
# Java compile test its Java library and a JDK (javac); for the storage and
# topology tests PostgreSQL (its server programs; the fixture runs initdb in a
# temporary directory) and HAProxy. Each missing package is
# installed on its own, quietly, where we are root with apt-get; a test whose
# tool is still missing is skipped, saying why. Never fails the build.
JAVA_THRIFT_JAR := /usr/share/java/thrift.jar
tools:
	@need=""; \
	command -v thrift >/dev/null 2>&1 || need="$$need thrift-compiler"; \
	command -v javac >/dev/null 2>&1 || need="$$need default-jdk-headless"; \
	[ -f $(JAVA_THRIFT_JAR) ] || need="$$need libthrift-java"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need="$$need haproxy"; \
	if [ -z "$$need" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq >/dev/null 2>&1 || echo "note: apt-get update failed"; \
	  for pkg in $$need; do \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg \
	      >/dev/null 2>&1 || echo "note: could not install $$pkg; the tests needing it will be skipped"; \
	  done; \
	else echo "note:$$need not installed (needs root and apt-get); the tests needing them will be skipped"; fi

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/mypy examples/demo.py examples/notes/notes_service.py
	$(BIN)/python -m pytest -q
	# The example service is a project of its own (its own pytest.ini), as a user's would be.
	cd examples/notes && $(CURDIR)/$(BIN)/python -m pytest -q

# The tests as CI may meet them: every core kept busy by other work. Timing
# bounds in tests must hold here too (run it three times before trusting a
# change to a timing-sensitive test).
test-under-load:
	scripts/with-busy-cores $(MAKE) test

# The benchmark (about 4 minutes; loopback only). Options through BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--only limit hs256".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
