#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU (not needed anywhere else):
#   1. build with the NCCL process group (`--features nccl`; CUDA/NCCL headers from the torch wheel's
#      nvidia-* packages plus nvidia-cuda-crt / nvidia-cuda-cccl, installed here if missing),
#   2. a one-GPU NCCL group that really runs its collectives (`--join-alone`): timings,
#   3. training-step figures of ResNet-50 + 8192-8192-8192 projector on the GPU (bt-bench step), in
#      fp32 contiguous and in bf16 autocast + channels-last, images/s with the breakdown,
#   4. Fashion-MNIST quality on the GPU (examples/gpu.toml): kNN top-1 every 5 epochs next to both
#      baselines, and the training time (target: >= 90 % within 5 minutes of training).
# Output goes to stdout; keep it with the device run's results.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
if [ ! -e "$SITE/nvidia/cu13/include/crt/host_defines.h" ]; then
  pip install --quiet "nvidia-cuda-crt==13.0.88" "nvidia-cuda-cccl==13.0.85"
fi
export BT_CUDA_INCLUDE="$SITE/nvidia/cu13/include:$SITE/nvidia/cu13/include/cccl"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
cargo build --release -p bt-worker --features nccl --bins
echo "== one-GPU NCCL group (real collectives at world 1)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/bt-dist-probe --rank 0 --world 1 --port "$port" --nccl --join-alone bench --reps 5 \
  || echo "NCCL check failed"
for mode in "fp32 contiguous" "bf16 channels-last"; do
  set -- $mode
  echo "== ResNet-50 + 8192 projector step on cuda:0, $1, $2"
  target/release/bt-bench step --device cuda:0 --backbone resnet50 --cifar-stem false \
    --projector 8192,8192,8192 --image-size 224 --batch 64 --steps 5 --loader-threads 8 \
    --loss-n 256 --loss-d 8192 --precision "$1" --memory-format "$2" || echo "step benchmark failed"
done
echo "== Fashion-MNIST Barlow Twins on cuda:0 (examples/gpu.toml; target: kNN >= 90 % within 5 min)"
timeout 420 target/release/bt-bench pretrain examples/gpu.toml --device-kind cuda \
  || echo "GPU quality run failed or ran past 7 minutes"
