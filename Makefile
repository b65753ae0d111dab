# Each target creates the virtual environment it needs (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean nano

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sphinx-edge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

# SPHINX-Nano from scratch on this CPU (about an hour on 2 cores): data, tokenizer, training,
# evaluation; then the weights are copied to sphinx_edge/weights/nano (what ships).
nano: $(STAMP)
	$(BIN)/sphinx-edge data synth --out data/nano --train 20000 --test 500
	$(BIN)/sphinx-edge data tokenizer data/nano/train.json --out data/nano/tokenizer.model --vocab-size 1024
	$(BIN)/sphinx-edge train recipes/nano.toml
	$(BIN)/sphinx-edge eval --checkpoint runs/nano/model --data data/nano/test.json --json runs/nano/eval.json
	mkdir -p sphinx_edge/weights/nano && cp runs/nano/model/* sphinx_edge/weights/nano/

clean:
	rm -rf $(VENV) build *.egg-info
