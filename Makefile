# The README's two commands: `make demo` and `make test`. Each sets up .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: test test-gpu demo bench bench-peer lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	# torch first, the local CPU build; then nothing in the package can swap it for a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,deepspeed]'
	# the browser of tests/test_app.py: Debian's chromium (Playwright downloads no browser of its own)
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	$(BIN)/python -c "import torch, sys; print('torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check anymodal tests benchmarks

test: $(STAMP) lint
	# pytest exit code 5 (no tests collected) is a failure, like any other non-zero code.
	$(BIN)/python -m pytest -q -x --durations=15

# on a machine with a CUDA device (a CUDA build of torch): FlexAttention, bf16 and DeepSpeed ZeRO through Lightning
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu
	$(BIN)/python benchmarks/cuda_throughput.py

demo: $(STAMP)
	$(BIN)/anymodal demo --out checkpoints/demo

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# lucidrains' transfusion-pytorch trained beside anymodal on the same data, size and wall-clock budget
bench-peer: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[peer]'
	$(BIN)/python benchmarks/peer.py

clean:
	rm -rf $(VENV) checkpoints/demo
