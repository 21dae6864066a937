#!/usr/bin/env bash
# The demo: a coordinator and two worker daemons on loopback, a real two-rank Barlow Twins job on
# Fashion-MNIST submitted with btctl, its metrics streamed until it ends, then the kNN accuracy of
# the pretrained backbone next to its two baselines (the same network untrained, with its default
# init; raw pixels) and the margin over the better one. State and logs go to runs/demo/.
# BT_DEMO_SPEC, BT_DEMO_DIR: another spec and folder (`make quality`); BT_DEMO_PROBE=1: then a
# linear probe of the final checkpoint (`btctl eval`, the full test set), also with both baselines.
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

# Secured like a real cluster: TLS (daemons with client certificates) and bearer tokens.
"$BIN/bt-coordinator" init-secrets --dir "$RUN/secrets" >/dev/null
echo "demo: generated a CA, certificates and tokens in $RUN/secrets (admin token: $RUN/secrets/admin.token)"
echo "demo: starting the coordinator (state in $RUN/coordinator.db)"
"$BIN/bt-coordinator" --listen 127.0.0.1:0 --addr-file "$RUN/coordinator.addr" \
  --db "$RUN/coordinator.db" --checkpoint-root "$RUN/checkpoints" \
  --tokens-file "$RUN/secrets/tokens.toml" --tls-cert "$RUN/secrets/server.pem" \
  --tls-key "$RUN/secrets/server.key" --tls-client-ca "$RUN/secrets/ca.pem" \
  >"$RUN/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$RUN/coordinator.addr" ] && break; sleep 0.1; done
[ -s "$RUN/coordinator.addr" ] || { echo "demo: the coordinator did not start; see $RUN/coordinator.log" >&2; exit 1; }
export BT_COORDINATOR=$(cat "$RUN/coordinator.addr")
export BT_TOKEN_FILE="$RUN/secrets/admin.token" BT_CA_CERT="$RUN/secrets/ca.pem"
echo "demo: coordinator at https://$BT_COORDINATOR; to use btctl from another shell:"
echo "  export BT_COORDINATOR=$BT_COORDINATOR BT_TOKEN_FILE=$BT_TOKEN_FILE BT_CA_CERT=$BT_CA_CERT"
echo "demo: dashboard at https://$BT_COORDINATOR/ (CA: $BT_CA_CERT; paste the token from $BT_TOKEN_FILE)"

for i in 1 2; do
  "$BIN/bt-worker" --coordinator "$BT_COORDINATOR" --name "demo-worker-$i" --cpu-slots 1 \
    --port-range "$((29400 + i * 20))-$((29420 + i * 20))" --work-dir "$RUN/worker-$i" \
    --checkpoint-root "$RUN/checkpoints" --token-file "$RUN/secrets/worker.token" \
    --ca-cert "$RUN/secrets/ca.pem" --client-cert "$RUN/secrets/worker.pem" \
    --client-key "$RUN/secrets/worker.key" \
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
if [ "$status" -eq 0 ] && [ -n "${BT_DEMO_PROBE:-}" ]; then
  ck=$("$BIN/btctl" checkpoints "$job" -o json | python3 -c \
    'import json, sys; print(max(json.load(sys.stdin), key=lambda c: c["step"])["path"])')
  echo "demo: linear probe of $ck (btctl eval)"
  pstart=$(date +%s)
  "$BIN/btctl" eval "$ck" --set eval.test_size=10000 --set "eval.probe_epochs=${BT_DEMO_PROBE_EPOCHS:-30}" \
    --set train.torch_threads=2 \
    --watch || status=$?
  echo "demo: the probe took $(( $(date +%s) - pstart ))s"
  "$BIN/btctl" checkpoints "$job"
fi
echo "demo: result (kNN top-1 of the pretrained backbone, both baselines, margin over the better):"
"$BIN/btctl" get "$job" | grep '^eval:' | tail -1
exit $status
