# Two commands do all the set-up on a fresh machine (Debian packages, a virtualenv, torch's CPU build, the package):
#   make demo   - the offline Alt-MoE demo (main job), results in runs/demo
#   make test   - the test suite (fast tiny-config tests + slow tests on the real zoo backbones)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build lies on this kind of machine's disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEBIAN_PACKAGES := fonts-noto-color-emoji espeak-ng pocketsphinx-testdata dataset-fashion-mnist

.PHONY: demo demo-quick test test-fast system install

demo: install
	$(BIN)/multimodal-moe demo --output-dir runs/demo

demo-quick: install
	$(BIN)/multimodal-moe demo --output-dir runs/demo-quick --quick

test: install
	RUN_SLOW=1 $(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

install: system $(VENV)/.installed

system:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $(DEBIAN_PACKAGES); }

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[all]'
	touch $@
