#!/usr/bin/env bash
# The demo: a coordinator and two worker daemons on loopback, a real two-rank Barlow Twins job on
# Fashion-MNIST submitted with btctl, its metrics streamed until it ends, then the kNN accuracy of
# the pretrained backbone next to a random-init baseline. State and logs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BT_BIN_DIR:-target/debug}
RUN=${BT_DEMO_DIR:-runs/demo}
SPEC=${BT_DEMO_SPEC:-examples/demo.toml}
rm -rf "$RUN"
mkdir -p "$RUN"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "demo: starting the coordinator (state in $RUN/coordinator.db)"
"$BIN/bt-coordinator" --listen 127.0.0.1:0 --addr-file "$RUN/coordinator.addr" \
  --db "$RUN/coordinator.db" --checkpoint-root "$RUN/checkpoints" >"$RUN/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$RUN/coordinator.addr" ] && break; sleep 0.1; done
[ -s "$RUN/coordinator.addr" ] || { echo "demo: the coordinator did not start; see $RUN/coordinator.log" >&2; exit 1; }
export BT_COORDINATOR=$(cat "$RUN/coordinator.addr")
echo "demo: coordinator at $BT_COORDINATOR"

for i in 1 2; do
  "$BIN/bt-worker" --coordinator "$BT_COORDINATOR" --name "demo-worker-$i" --cpu-slots 1 \
    --port-range "$((29400 + i * 20))-$((29420 + i * 20))" --work-dir "$RUN/worker-$i" \
    >"$RUN/worker-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 150); do
  n=$("$BIN/btctl" workers -o json 2>/dev/null | grep -c '"state": "online"' || true)
  [ "$n" -ge 2 ] && break
  sleep 0.2
done
"$BIN/btctl" workers

job=$("$BIN/btctl" submit "$SPEC" "$@")
echo "demo: submitted job $job; streaming its progress (btctl watch $job)"
start=$(date +%s)
status=0
"$BIN/btctl" watch "$job" || status=$?
echo "demo: the job took $(( $(date +%s) - start ))s"
"$BIN/btctl" get "$job"
"$BIN/btctl" checkpoints "$job"
exit $status
