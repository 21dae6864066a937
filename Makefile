# The two commands: `make demo` (set up, build, run a real 2-rank Barlow Twins job end to end) and
# `make test` (set up, fmt, clippy, every test).
SHELL := /bin/bash
ENV := source scripts/env.sh &&

.PHONY: setup build demo test bench

setup:
	scripts/setup.sh

build: setup
	$(ENV) cargo build --workspace --bins

demo: build
	$(ENV) scripts/demo.sh

test: setup
	$(ENV) cargo fmt --all --check
	$(ENV) cargo clippy --workspace --all-targets -- -D warnings
	$(ENV) cargo build --workspace --bins
	$(ENV) scripts/run-tests.sh

bench: build
	$(ENV) cargo run --release -p bt-worker --bin bt-bench -- all
