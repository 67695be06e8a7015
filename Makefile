# Two commands on a fresh machine: `make demo` (the main job on WordNet + MiniLM) and `make test`.
# Each creates its own virtual environment and installs with -c constraints.txt: the exact versions
# this project is tested with (pyproject.toml states ranges; torch 2.13.0 is the CPU wheel).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/simskip-faiss run --output runs/wordnet

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/quality.py

.PHONY: install demo test bench
