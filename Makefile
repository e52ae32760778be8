# `make demo` and `make test` are all a fresh machine needs (Python 3.11 and pip).
# `make test` runs every test not marked `slow` (under 20 minutes on the 2-core machine; each
# slow acceptance run keeps a small sibling there) and prints the 15 slowest; `make test-slow`
# runs the `slow` ones: the full Kodak, budget, zoo, quality-map, outage and 12 MP acceptance
# runs the README's figures come from (about 25 minutes on 2 cores).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ratefit-installed

.PHONY: install demo test test-slow clean

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
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow --durations=15

clean:
	rm -rf $(VENV) demo-output .pytest_cache
