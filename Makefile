# hs_scale: the two commands a fresh machine needs are `make demo` and `make test`.
#
# torch is installed first and pinned through a pip constraint for everything after it: an unpinned torch, or a
# package asking for a newer one, pulls several GB of CUDA wheels on CPU machines (docs in README, "Install").

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
STAMP := .install-stamp
CONSTRAINT := .torch-constraint.txt
EXTRAS ?= dev,parallel,ray

.PHONY: install system-deps test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	echo "torch==$(TORCH_VERSION)" > $(CONSTRAINT)
	PIP_CONSTRAINT=$(CONSTRAINT) $(PYTHON) -m pip install -e ".[$(EXTRAS)]"
	touch $(STAMP)

# Debian packages for the launcher tests (a real local Slurm cluster, numactl for the DeepSpeed launcher).
# Only where we are root with apt; elsewhere those tests skip with the reason.
system-deps:
	bash launchers/install_test_deps.sh

test: install system-deps
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m hs_scale.cli demo

bench: install
	$(PYTHON) benchmarks/attention.py --json benchmarks/results/attention.json
	$(PYTHON) benchmarks/data.py --quick --json benchmarks/results/data.json
	$(PYTHON) benchmarks/train_throughput.py --quick --json benchmarks/results/train_throughput.json

lint: install
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(STAMP) $(CONSTRAINT) runs .pytest_cache
