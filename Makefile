# Everything a fresh machine needs: `make demo` runs the tiny CPU pipeline, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo lint test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) launch/demo.py
	$(PY) launch/demo_pipeline.py

lint: install
	$(VENV)/bin/ruff check step3vl_train rl launch data tests benchmarks
	$(VENV)/bin/ruff format --check step3vl_train rl launch data tests benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
