#!/usr/bin/env bash
# Installs what the build and the tests need, idempotently:
#  - torch 2.13.0 + torchvision 0.28.0 (PyPI) into a virtual environment in a per-user cache keyed by
#    the torch version ($BT_VENV, default ~/.cache/bt/torch-2.13.0), reused by every clone. tch builds
#    against it (LIBTORCH_USE_PYTORCH=1) unless you set LIBTORCH to a libtorch of your own; the
#    PyTorch reference tests always use it.
#    kubernetes-validate 1.31.0 (offline Kubernetes schemas) and checkov 3.3.30 (offline policy
#    checks) check the manifests in deploy/ (deploy/check.py).
#  - Fashion-MNIST (Debian's dataset-fashion-mnist) for the demo.
# protoc needs no install: the build uses a vendored binary.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

want="$BT_TORCH_VERSION"
if ! "$BT_VENV/bin/python" - "$want" >/dev/null 2>&1 <<'PY'
import sys, torch, torchvision, numpy, safetensors, kubernetes_validate, tensorboard, checkov.version
ok = torch.__version__.split("+")[0] == sys.argv[1] and checkov.version.version == "3.3.30"
sys.exit(0 if ok else 1)
PY
then
  echo "setup: installing torch==$want and torchvision==0.28.0 into $BT_VENV (about 4.7 GB, a few minutes)"
  python3 -m venv "$BT_VENV"
  "$BT_VENV/bin/pip" install --quiet --disable-pip-version-check \
    "torch==$want" "torchvision==0.28.0" numpy safetensors "kubernetes-validate==1.31.0" \
    "tensorboard==2.20.0" "checkov==3.3.30"
fi
echo "setup: torch $("$BT_VENV/bin/python" -c 'import torch; print(torch.__version__)') in $BT_VENV"
if [ -n "${LIBTORCH:-}" ]; then
  echo "setup: building against LIBTORCH=$LIBTORCH"
fi

fm=/usr/share/datasets/fashion-mnist
if ! ls "$fm"/train-images-idx3-ubyte* >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST is missing from $fm; install it with: sudo apt-get install dataset-fashion-mnist" >&2
    exit 1
  fi
fi
echo "setup: Fashion-MNIST in $fm"

# The web dashboard: Node (npm) for its dependencies, the browser test's Chromium (Debian's; the
# test drives it with playwright-core, which downloads nothing). The coordinator embeds the
# committed dashboard/dist/, so building the coordinator needs neither.
as_root_apt() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    return 1
  fi
}
if ! command -v npm >/dev/null; then
  echo "setup: installing Node.js and npm (Debian's) for the dashboard"
  as_root_apt nodejs npm ||
    echo "setup: npm is missing (install Node.js 20 or later); the dashboard's tests will fail" >&2
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing Debian's chromium for the dashboard's browser test"
  as_root_apt chromium ||
    echo "setup: /usr/bin/chromium is missing (sudo apt-get install chromium); the browser test will be skipped" >&2
fi
# A real Prometheus server for the scrape test (tests/tests/prometheus.rs): Debian's package.
if ! command -v prometheus >/dev/null; then
  echo "setup: installing Debian's prometheus for the metrics scrape test"
  as_root_apt prometheus ||
    echo "setup: prometheus is missing (sudo apt-get install prometheus); the scrape test will fail" >&2
fi
if command -v npm >/dev/null; then
  if [ ! -f dashboard/node_modules/.package-lock.json ] ||
    [ dashboard/package-lock.json -nt dashboard/node_modules/.package-lock.json ]; then
    echo "setup: installing the dashboard's npm dependencies (npm ci)"
    (cd dashboard && npm ci --no-audit --no-fund --loglevel=error)
  fi
  echo "setup: dashboard dependencies in dashboard/node_modules (node $(node --version))"
fi
