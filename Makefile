# Two entry points: `make demo` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test chaos unit lint tools kafka-start kafka-stop bench clean

# uv installs PyTorch's multi-gigabyte wheels from its cache in seconds (pip: minutes).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[test]'
	touch $(STAMP)

# System tools the tests drive for real: kcat (an independent Kafka client),
# Prometheus and promtool, Java and Maven for the local broker.
tools:
	@deploy/install-tools.sh

demo: $(STAMP) tools
	$(BIN)/python -m deploy.demo

test: $(STAMP) tools
	$(BIN)/python -m ruff check pipeline producer trainer deploy tests bench
	$(BIN)/python -m pytest -m "not chaos"

# Workers and the broker killed mid-stream, rebalances, 100,000 hostile records (about 15 minutes).
chaos: $(STAMP) tools
	$(BIN)/python -m pytest -m chaos -s -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not chaos"

lint: $(STAMP)
	$(BIN)/python -m ruff check pipeline producer trainer deploy tests bench

kafka-start: $(STAMP)
	$(BIN)/python -m deploy.kafka start

kafka-stop: $(STAMP)
	$(BIN)/python -m deploy.kafka stop

clean:
	-$(BIN)/python -m deploy.kafka stop
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
