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

# torch and torchvision are installed first as a matched pair: CompressAI imports torchvision,
# and PyPI's torchvision fails beside a CPU-only torch wheel (`torchvision::nms does not exist`).
# These machines keep torch 2.14.1 / torchvision 0.29.1 on disk (a CUDA build that also runs on
# the CPU, about 5.5 GB); a venv where both already import keeps what it has.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install --quiet $(TORCH_PAIR)
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
