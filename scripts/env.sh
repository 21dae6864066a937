# Source this file: points the build at the project's libtorch (see scripts/setup.sh).
BT_TORCH_VERSION=2.13.0
BT_CACHE="${BT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bt}"
BT_VENV="${BT_VENV:-$BT_CACHE/torch-$BT_TORCH_VERSION}"
export BT_VENV
if [ -n "${LIBTORCH:-}" ]; then
  unset LIBTORCH_USE_PYTORCH
else
  export LIBTORCH_USE_PYTORCH=1
  export PATH="$BT_VENV/bin:$PATH"
fi
