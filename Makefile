# Two entry points: `make demo` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Which PyTorch build goes into .venv (deploy/install-torch.sh; README, "PyTorch: CPU or CUDA"):
#   cpu   PyTorch's CPU wheels from TORCH_CPU_INDEX (~200 MB); if that index cannot be reached,
#         PyPI's wheel instead, with a warning
#   cuda  PyPI's default wheel, which on Linux x86-64 is the CUDA build (several GB, its own CUDA)
# Default: cuda where `nvidia-smi` is on PATH, else cpu. Override: `make test TORCH=cuda`.
TORCH           ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export TORCH TORCH_CPU_INDEX

.PHONY: demo test chaos containers unit lint rules tools system-tools go-tools kafka-start kafka-stop bench clean

# uv installs PyTorch's multi-gigabyte wheels from its cache in seconds (pip: minutes).
# PyTorch first (the build chosen above), then the project with the trainer and test extras.
$(STAMP): pyproject.toml deploy/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv
	deploy/install-torch.sh $(BIN)/python
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[train,test,bench,confluent]'
	touch $(STAMP)

# Tools the tests drive for real: kcat (an independent Kafka client), Java and Maven for the
# local broker (system-tools); built with Go (go-tools): the Prometheus server and promtool of
# the compose file's Prometheus release, and compose-config (the compose loader, without Docker).
tools: system-tools go-tools

system-tools:
	@deploy/install-tools.sh --system-only

go-tools:
	@deploy/install-tools.sh --go-only

demo: $(STAMP) system-tools
	$(BIN)/python -m deploy.demo

test: $(STAMP) tools
	$(BIN)/python -m ruff check pipeline producer trainer deploy tests bench quality tools
	$(BIN)/python -m pytest -m "not chaos and not docker"

# Workers and the broker killed mid-stream, rebalances, 100,000 hostile records (about 15 minutes).
chaos: $(STAMP) system-tools
	$(BIN)/python -m pytest -m chaos -s -p no:cacheprovider -o faulthandler_timeout=1150

# The container suite (README, "Containers"): Podman serves the Docker API where no Docker engine
# runs (installed from Debian's packages if missing), the images are built without any registry
# (deploy/containers), then the testcontainers tests and the compose stack run for real.
containers: $(STAMP) tools
	$(BIN)/python -m deploy.containers images
	FRAUD_CONTAINER_IMAGES=prebuilt $(BIN)/python -m deploy.containers run -- \
	  $(BIN)/python -m pytest -m docker -s -p no:cacheprovider -o faulthandler_timeout=1500

# tests/unit and the doctests: no broker, no Java, no Go (the tests that need the Go-built tools run in
# `make test`; tests/conftest.py marks each test by its folder). One pytest
# process per core (pytest-xdist): 1:30 on two cores, 2:34 in one process (2026-12-07).
unit: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not integration and not chaos and not docker and not tools"

lint: $(STAMP)
	$(BIN)/python -m ruff check pipeline producer trainer deploy tests bench quality tools

# The alerting rules: check them and run their unit tests (deploy/prometheus/rules_test*.yml).
rules: go-tools
	cd deploy/prometheus && ../../.cache/tools/bin/promtool check rules rules.yml
	cd deploy/prometheus && ../../.cache/tools/bin/promtool test rules rules_test.yml rules_test_weekly.yml

kafka-start: $(STAMP)
	$(BIN)/python -m deploy.kafka start

kafka-stop: $(STAMP)
	$(BIN)/python -m deploy.kafka stop

clean:
	-$(BIN)/python -m deploy.kafka stop
	rm -rf $(VENV) .cache runs .pytest_cache .ruff_cache
