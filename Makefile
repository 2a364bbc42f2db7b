# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel: an unpinned torch would pull several GB of CUDA packages. GPU users: install
# your own CUDA torch into the venv first, then `make install TORCH_SPEC=`.
TORCH_SPEC ?= torch==2.13.0
# Where MNIST lives (torchvision layout: DIR/MNIST/raw/*.gz); missing files are downloaded.
DHP_DATA_DIR ?= ./data
export DHP_DATA_DIR
STAMP := $(VENV)/.installed

.PHONY: install demo test bench cpp clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install -q "$(TORCH_SPEC)")
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dhp_deploy.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_layer.py

clean:
	rm -rf $(VENV) build serve/cpp/build

# The LibTorch program of serve/cpp, built against the pip-installed torch.
cpp: $(STAMP)
	cmake -S serve/cpp -B serve/cpp/build -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build serve/cpp/build -j 2
