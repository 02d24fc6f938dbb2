# make run   — set up, then train the Quickstart recipe (QLoRA SFT on the packaged Gemma 3 270M)
# make test  — set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.petune-installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is a CPU wheel on the dev/CI machines,
# while an unpinned torch would pull several GB of CUDA packages there.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/petune run recipes/qlora_sft.toml --overwrite

# a worker per core (tests use their own temp folders and ports); a file's tests stay on one
# worker so its module fixtures (e.g. one short Gemma run several tests read) are built once
JOBS ?= auto
test: setup
	$(PY) -m pytest -n $(JOBS) --dist loadfile --durations=15

# the rules are pinned in pyproject.toml ([tool.ruff.lint]); CI fails on any finding
lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/petune bench --smoke

clean:
	rm -rf $(VENV) runs .pytest_cache
