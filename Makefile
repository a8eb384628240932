# The two commands a newcomer needs: `make quickstart` (the main job, CPU by default) and
# `make test`. Both create/refresh .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on this project's dev/CI disk; on a GPU machine with torch
# already installed, set TORCH_SPEC= (empty) to keep the system torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: quickstart test lint install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev,datagen]"
	@touch $@

quickstart: $(STAMP)
	$(VENV)/bin/nla-mcore quickstart

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
