# make setup | test | bench — each bootstraps .venv on a fresh machine; fast when nothing changed,
# rebuilds the extensions when csrc/ or setup.py changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
EXTRAS ?= dev,hf
CSRC := $(shell find csrc -type f 2>/dev/null)
# one pytest worker per core (pytest-xdist); PYTEST_ARGS= runs in one process
PYTEST_ARGS ?= -n auto
# the test-only extension _C_testing (host builds of the CUDA logic) is part of the dev build
export TRUTHGPT_BUILD_TESTING ?= 1

.PHONY: setup test bench info clean asan-test compat

setup: $(VENV)/.built

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" ninja pybind11 packaging
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(CSRC)
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@out=bench-results/make-bench-$$(date +%Y%m%d-%H%M%S); \
	$(PY) -m truthgpt_kernels bench --json $$out.json --plot $$out.png $(BENCH_ARGS); status=$$?; \
	echo; for f in $$out.json $$out.png; do test -f $$f && echo "make bench wrote $$f"; done; \
	test -f $$out.json && echo "compare a later run: $(PY) -m truthgpt_kernels bench --compare $$out.json"; \
	exit $$status

info: setup
	$(PY) -m truthgpt_kernels info

clean:
	rm -rf build *.egg-info truthgpt_kernels/*.so $(VENV)/.built

# The CPU extension built with AddressSanitizer (TRUTHGPT_DEBUG=1) in a copy of the tree, then
# the validation and property suites under it. Any ASan report fails the run. libstdc++ is
# preloaded with libasan so that exceptions thrown by other extensions (triton) intercept cleanly.
ASAN_DIR := build/asan-tree
asan-test: $(VENV)/.built
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	git ls-files -z | xargs -0 cp --parents -t $(ASAN_DIR)
	cd $(ASAN_DIR) && TRUTHGPT_DEBUG=1 TRUTHGPT_BUILD_CUDA=0 TRUTHGPT_BUILD_TESTING=0 $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(ASAN_DIR) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
		$(abspath $(PY)) -m pytest tests/test_validation.py tests/test_properties.py -q -p no:cacheprovider

# The version floors of pyproject.toml, proved: the op and HF tests against the oldest torch and
# transformers it admits and against the newest, each in its own venv under build/compat/.
compat:
	bash tools/compat.sh
