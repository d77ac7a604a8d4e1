# Two entry points, each installing what it needs into ./.venv first:
#   make demo   - the main job on the built-in default (synthetic phantom -> dataset -> ...), output in demo_out/
#   make test   - the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.txt requirements-test.txt requirements-lock.txt
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-test.txt -c requirements-lock.txt -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/ldm-finetune demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -n 2 --dist worksteal -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
