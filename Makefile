# `make demo` and `make test` are all a fresh machine needs (Python 3.11 and pip).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ratefit-installed

.PHONY: install demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is installed first at 2.13.0, of which these machines keep a CPU wheel (a bare `torch`
# requirement would pull several GB of CUDA wheels); a venv that has torch keeps it.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ratefit demo demo-output

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-output .pytest_cache
