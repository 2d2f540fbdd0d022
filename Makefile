# One virtualenv, pinned by constraints.txt, shared by every target.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: install test demo lint format

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q

demo: $(INSTALLED)
	OMP_NUM_THREADS=1 $(VENV)/bin/python train/train_ddpm.py --preset demo --output_dir runs/demo

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
