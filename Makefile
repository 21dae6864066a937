# The two commands: `make demo` (set up, build, run a real 2-rank Barlow Twins job end to end) and
# `make test` (set up, fmt, clippy, every test).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo quality test bench dashboard chaos

setup:
	scripts/setup.sh

build: setup
	$(ENV) cargo build --workspace --bins

demo: build
	$(ENV) scripts/demo.sh

# The longer quality run (~36 min on 2 cores): examples/quality.toml, then a linear probe.
quality: build
	$(ENV) BT_DEMO_SPEC=examples/quality.toml BT_DEMO_DIR=runs/quality BT_DEMO_PROBE=1 scripts/demo.sh

test: setup
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) cargo build --workspace --bins
	$(ENV) scripts/run-tests.sh

# The long chaos run (the short one is part of `make test`): CHAOS_SECONDS of seeded faults
# (CHAOS_SEED) over a real cluster, then its figures.
chaos: build
	$(ENV) CHAOS_SECONDS=$${CHAOS_SECONDS:-600} CHAOS_SEED=$${CHAOS_SEED:-1} \
	  cargo nextest run --profile chaos -p bt-tests --test chaos --no-capture

# Benchmark figures (release build: the first run compiles everything once more).
# Config (a) of the side-by-side with the PyTorch recipe: ResNet-50 + 8192x3 at 224, 2 threads.
MODEL_A := --backbone resnet50 --cifar-stem false --projector 8192,8192,8192 --image-size 224
CONFIG_A := $(MODEL_A) --torch-threads 2
bench: setup
	$(ENV) cargo build --release -p bt-worker --bins
	$(ENV) target/release/bt-bench data
	$(ENV) target/release/bt-bench step
	@echo "== scaling, (a) at batch 16 per rank: two ranks pinned to a core each (train.pin_cpus) vs one"
	$(ENV) target/release/bt-bench step --world 2 --scaling-only --pin-cpus --torch-threads 1 $(MODEL_A) \
	  --batch 16 --steps 5
	@echo "== bt vs the PyTorch recipe, (a) ResNet-50 + 8192x3, batch 16 at 224, 2 threads"
	$(ENV) target/release/bt-bench step --against-torch $(CONFIG_A) --batch 16 --steps 3 --loss-n 16
	@if bench/python_jemalloc.sh -c "" 2>/dev/null; then \
	  echo "== (a) again, the recipe on bt's allocator (jemalloc preloaded, bench/python_jemalloc.sh)"; \
	  $(ENV) BT_PYTHON=bench/python_jemalloc.sh target/release/bt-bench step --against-torch $(CONFIG_A) \
	    --batch 16 --steps 3 --loss-n 16; \
	else echo "== (skipped: the recipe on jemalloc needs libjemalloc2)"; fi
	@echo "== the same at batch 32 (memory)"
	$(ENV) target/release/bt-bench step --against-torch $(CONFIG_A) --batch 32 --steps 2 --rounds 3 --loss-n 32
	@echo "== (b) ResNet-18 CIFAR stem + 2048x3, batch 256 at 32, 2 threads"
	$(ENV) target/release/bt-bench step --against-torch --backbone resnet18 --cifar-stem true \
	  --projector 2048,2048,2048 --image-size 32 --batch 256 --steps 3 --torch-threads 2 --loss-n 256 --loss-d 2048
	$(ENV) PROBE=target/release/bt-dist-probe bench/dist_bench.sh

# Rebuild the dashboard's assets (dashboard/dist/, embedded in bt-coordinator; commit them).
dashboard: setup
	cd dashboard && npm run build
