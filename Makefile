# Each target creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install deps clean nano bundled-export

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sphinx-edge demo

# What the tests of the device paths and the peer comparison need: cmake, g++, the aarch64 cross compiler,
# qemu-user, the aarch64 ExecuTorch libraries (C++ runner) and clang's libFuzzer (its request reader);
# chromium and the Node.js packages (browser demo); llama.cpp and onnxruntime-genai (the peers extra,
# compiled by pip: a few minutes once). A step that fails fails `make deps` (and so `make test`): the
# scripts install with apt-get as root and otherwise say what to install. SPHINX_EDGE_SKIP_DEPS=1 lets
# `make test` go on without them; their tests then skip, saying what is missing (under CI=true they fail).
PEERS := $(VENV)/.peers
deps: $(STAMP) $(PEERS)
	PYTHON=$(abspath $(BIN))/python bash runtime/cpp/install-deps.sh
	bash runtime/web/install-deps.sh

# The peers extra, llama.cpp compiled for this CPU every time (benchmarks/install-peers.sh says why).
$(PEERS): $(STAMP)
	bash benchmarks/install-peers.sh $(abspath $(BIN))/python
	touch $(PEERS)

test: $(STAMP) deps
	$(BIN)/python -m pytest -q -n 2 tests

# SPHINX-Nano from scratch on this CPU, in three stages (about 4 h 30 min on 2 cores). Nano 1 (1 h 45 min):
# the plain look's five domains and a reading-only set, a tokenizer, a supervised warm-up of the two
# experts on 128 px views, the one-stage recipe. Nano 2 (about 1 h 45 min): the varied look's nine domains,
# the recipe again from all of Nano 1. Then Nano 2 on 192 px views (1 h): its weights are copied to
# sphinx_edge/weights/nano (what ships).
nano: $(STAMP)
	$(BIN)/sphinx-edge data synth --out data/nano --train 60000 --test 500 --workers 2
	$(BIN)/sphinx-edge data synth --out data/nano-text --train 30000 --test 0 --seed 2 --workers 2 --domains text
	$(BIN)/sphinx-edge data tokenizer data/nano/train.json --out data/nano/tokenizer.model --vocab-size 1024
	$(BIN)/sphinx-edge warmup-encoders data/nano/train.json data/nano-text/train.json --out runs/nano-encoders \
		--steps 2800 --tokenizer data/nano/tokenizer.model --eval data/nano/test.json --view-size 128
	$(BIN)/sphinx-edge train recipes/nano.toml
	$(BIN)/sphinx-edge eval --checkpoint runs/nano/model --data data/nano/test.json --json runs/nano/eval.json
	$(BIN)/sphinx-edge data synth --out data/nano2 --train 30000 --test 900 --look varied --workers 2
	$(BIN)/sphinx-edge data synth --out data/nano2-more --train 30000 --test 0 --seed 2 --look varied --workers 2
	$(BIN)/sphinx-edge data independent --out data/independent --n 450
	$(BIN)/sphinx-edge train recipes/nano2.toml
	$(BIN)/sphinx-edge eval --checkpoint runs/nano2/model --data data/nano2/test.json --json runs/nano2/eval.json
	$(BIN)/sphinx-edge eval --checkpoint runs/nano2/model --data data/independent/test.json --json runs/nano2/eval-independent.json
	$(BIN)/sphinx-edge train recipes/nano2-v192.toml
	$(BIN)/sphinx-edge eval --checkpoint runs/nano2-v192/model --data data/nano2/test.json --json runs/nano2-v192/eval.json
	$(BIN)/sphinx-edge eval --checkpoint runs/nano2-v192/model --data data/independent/test.json --json runs/nano2-v192/eval-independent.json
	mkdir -p sphinx_edge/weights/nano && cp runs/nano2-v192/model/* sphinx_edge/weights/nano/

# The SPHINX-Nano int4 ONNX export that ships inside the package (`sphinx-edge run` with no export
# answers from it); rerun after the bundled weights change.
bundled-export: $(STAMP)
	$(BIN)/sphinx-edge export --size nano --quant int4 --format onnx --out sphinx_edge/exports/nano_int4 --overwrite

clean:
	rm -rf $(VENV) build *.egg-info
