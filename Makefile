# hla — the two commands of the quick start:
#   make run    install missing Debian packages, configure, build, run the main job (hla bench)
#   make test   the same set-up, then every test (ctest, then the Python package's pytest)
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
# The Python package builds against Debian's python3-torch, which lives in the system interpreter.
PYTHON ?= /usr/bin/python3

.PHONY: run test build configure deps clean bench-json python-build python-test cuda-variants

deps:
	@scripts/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

configure: deps $(BUILD)/CMakeCache.txt

build: configure
	cmake --build $(BUILD) -j $(JOBS)

run: build
	$(BUILD)/hla bench

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 1200
	$(MAKE) --no-print-directory python-test
	$(MAKE) --no-print-directory cuda-variants

# Builds with fewer CUDA variants still link (~1 min per configuration; skipped without nvcc).
cuda-variants: build
	JOBS=$(JOBS) scripts/check-cuda-variants.sh $(BUILD)-variants

# hla._C links the libhla.a just built (one translation unit against the torch headers, ~1 min).
python-build: build
	cd python && HLA_LIBRARY=$(abspath $(BUILD))/libhla.a $(PYTHON) setup.py -q build_ext --inplace

python-test: python-build
	cd python && $(PYTHON) -m pytest -q tests

clean:
	rm -rf $(BUILD) $(BUILD)-variants
	rm -rf python/build python/hla/_C*.so
