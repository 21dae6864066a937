#!/usr/bin/env bash
# Collective timings of the Rust c10d shim (bt-dist-probe) and of torch.distributed (Gloo), same
# machine, same run, loopback, alternating ROUNDS times per world size; prints each run and then a
# side-by-side table (bench/dist_compare.py). Usage: bench/dist_bench.sh [WORLD_SIZES...]
# (default: 2 4). Env: PROBE (default target/release/bt-dist-probe), REPS (per figure, default 15),
# ROUNDS (default 5). Needs a built probe: cargo build --release -p bt-worker --bin bt-dist-probe.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
PROBE="${PROBE:-target/release/bt-dist-probe}"
REPS="${REPS:-15}"
ROUNDS="${ROUNDS:-5}"
[ -x "$PROBE" ] || { echo "no probe at $PROBE (cargo build --release -p bt-worker --bin bt-dist-probe)" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run_world() { # $1 = world, $2... = command prefix taking RANK WORLD PORT
  local w=$1; shift
  local p; p=$(port)
  local pids=()
  for ((r = 0; r < w; r++)); do "$@" "$r" "$w" "$p" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
rust_rank() { "$PROBE" --rank "$1" --world "$2" --port "$3" bench --reps "$REPS"; }
py_rank() { python3 bench/dist_bench.py "$1" "$2" "$3" "$REPS"; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
{
  echo "cores: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)  rounds: $ROUNDS  reps: $REPS"
  for w in ${@:-2 4}; do
    for ((i = 0; i < ROUNDS; i++)); do
      run_world "$w" rust_rank
      run_world "$w" py_rank
    done
  done
} | tee "$log"
echo
python3 bench/dist_compare.py "$log"
