# `make demo`: install into .venv and run the embedded synthetic benchmark end to end.
# `make test`: install into .venv and run the test-suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.PHONY: install demo test test-slow bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes first and pinned: an unpinned torch (or a dependency asking for a newer one) pulls CUDA wheels.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,viz]" "torch==$(TORCH_VERSION)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m dida demo --out work_dirs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
