# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages. GPU users: install
# your own CUDA torch into the venv first, then `make install TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
# Where MNIST lives (torchvision layout: DIR/MNIST/raw/*.gz); `make demo` downloads missing files.
DHP_DATA_DIR ?= ./data
export DHP_DATA_DIR
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench reproduce cpp clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m dhp_deploy.fused_head  # compiles the fused CPU kernels once (20-40 s)
	touch $@

install: $(STAMP)

# The main job: a short Split MNIST training (1 epoch per task), exported, checked in Python and C++.
DEMO_RUN ?= runs/demo
DEMO_BUNDLE ?= export/bundles/demo
demo: $(STAMP)
	$(BIN)/dhp-train --benchmark split-mnist --method finetune --dhp --epochs 1 --download \
	  --out $(DEMO_RUN) --overwrite
	$(BIN)/dhp-export $(DEMO_RUN) --format all --out $(DEMO_BUNDLE) --overwrite
	$(BIN)/dhp-serve check $(DEMO_BUNDLE) --backend all
	$(MAKE) --no-print-directory cpp
	serve/cpp/build/dhp_check $(DEMO_BUNDLE)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# The inner loop: no real MNIST, nothing marked slow (the maths, statistics, serving edges).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not mnist and not slow"

# Every benchmark script of benchmarks/ into docs/PERFORMANCE.md (BENCH_ARGS=--quick: a fast check).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python benchmarks/performance.py $(BENCH_ARGS)

# The paper's table and the init ablation: strength searches (Split MNIST; Permuted MNIST under
# the grid's protocol), the grid (2 one-thread runs at a time), docs/RESULTS.md. Resumable: run again to continue. REPRODUCE_ARGS go to the permuted
# search and the grid, e.g. REPRODUCE_ARGS="--epochs 1 --seeds 0-2" (a reduced protocol).
REPRODUCE_ARGS ?=
reproduce: $(STAMP)
	$(BIN)/python benchmarks/reproduce.py search --jobs 2
	$(BIN)/python benchmarks/reproduce.py search --benchmark permuted-mnist --jobs 2 $(REPRODUCE_ARGS)
	$(BIN)/python benchmarks/reproduce.py grid --jobs 2 $(REPRODUCE_ARGS)
	$(BIN)/python benchmarks/results.py --from docs/results --out docs/RESULTS.md

clean:
	rm -rf $(VENV) build serve/cpp/build

# The LibTorch program of serve/cpp, built against the pip-installed torch.
cpp: $(STAMP)
	cmake -S serve/cpp -B serve/cpp/build -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build serve/cpp/build -j 2
