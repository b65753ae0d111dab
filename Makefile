# Each target creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install deps clean nano

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sphinx-edge demo

# System tools and npm packages of the on-device tests: cmake, g++, the aarch64 cross compiler, qemu-user
# and the aarch64 ExecuTorch libraries (C++ runner); chromium, Node.js packages (browser demo). Best effort:
# without root or apt the scripts print what to install, and those tests skip saying so.
deps: $(STAMP)
	-PYTHON=$(BIN)/python bash runtime/cpp/install-deps.sh
	-bash runtime/web/install-deps.sh

test: $(STAMP) deps
	$(BIN)/python -m pytest -q -n 2 tests

# SPHINX-Nano from scratch on this CPU (about 1 h 45 min on 2 cores): data (the VQA set and a reading-only
# set), tokenizer, a supervised warm-up of the two experts, the one-stage recipe, evaluation; then the
# weights are copied to sphinx_edge/weights/nano (what ships).
nano: $(STAMP)
	$(BIN)/sphinx-edge data synth --out data/nano --train 60000 --test 500 --workers 2
	$(BIN)/sphinx-edge data synth --out data/nano-text --train 30000 --test 0 --seed 2 --workers 2 --domains text
	$(BIN)/sphinx-edge data tokenizer data/nano/train.json --out data/nano/tokenizer.model --vocab-size 1024
	$(BIN)/sphinx-edge warmup-encoders data/nano/train.json data/nano-text/train.json --out runs/nano-encoders \
		--steps 2800 --tokenizer data/nano/tokenizer.model --eval data/nano/test.json
	$(BIN)/sphinx-edge train recipes/nano.toml
	$(BIN)/sphinx-edge eval --checkpoint runs/nano/model --data data/nano/test.json --json runs/nano/eval.json
	mkdir -p sphinx_edge/weights/nano && cp runs/nano/model/* sphinx_edge/weights/nano/

clean:
	rm -rf $(VENV) build *.egg-info
