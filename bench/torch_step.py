"""The Barlow Twins recipe's training step in plain PyTorch, timed on command, for
`bt-bench step --against-torch` (which interleaves rounds of it with rounds of bt's own step).

The recipe as the paper and its public implementation describe it (../shared/design/BARLOW_TWINS.md),
written here from that description: a torchvision ResNet without `fc`, the projector
Linear-BN-ReLU-Linear-BN-ReLU-Linear without biases, the cross-correlation C = BN(z_a)^T BN(z_b) / N
with an affine-free BN, the loss sum (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 through the D x D
matrix, and LARS as a per-parameter Python loop (weight decay and the trust ratio on weights only,
momentum 0.9), one optimizer step per training step.

Protocol (line based): argv gives the configuration; the script prints `ready <peak_rss_kib>` once
built, then for every `run K` line on stdin runs K steps and prints
`{"ms": [...], "peak_rss_kib": N}`; `quit` (or end of input) exits.

usage: torch_step.py ARCH CIFAR_STEM(0|1) PROJECTOR(e.g. 8192,8192,8192) BATCH IMAGE_SIZE THREADS
                     [PRECISION(fp32|bf16) [LAYOUT(contiguous|channels-last)]]

PRECISION bf16 runs the forward under `torch.autocast(device_type="cpu", dtype=torch.bfloat16)`
(what a PyTorch user turns on first, the recipe's own AMP on a CPU); LAYOUT channels-last converts the
model and the inputs with `memory_format=torch.channels_last`. The defaults are the recipe as
published on a CPU: fp32, contiguous.
"""
import contextlib
import json
import resource
import sys
import time

import torch
import torch.nn as nn
import torchvision

LAMBDA = 0.0051
ETA = 0.001
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-6
LR_WEIGHTS = 0.2
LR_BIASES = 0.0048


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Recipe(nn.Module):
    def __init__(self, arch, cifar_stem, projector):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
        if cifar_stem:
            self.backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.backbone.maxpool = nn.Identity()
        features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        sizes = [features] + projector
        layers = []
        for i in range(len(sizes) - 2):
            layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
        self.projector = nn.Sequential(*layers)
        self.bn = nn.BatchNorm1d(sizes[-1], affine=False)

    def forward(self, y1, y2):
        z1 = self.projector(self.backbone(y1))
        z2 = self.projector(self.backbone(y2))
        c = self.bn(z1).T @ self.bn(z2) / z1.shape[0]
        on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
        n = c.shape[0]
        off = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
        off_diag = off.pow_(2).sum()
        return on_diag + LAMBDA * off_diag


class Lars:
    """LARS, one parameter tensor at a time."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.mu = {}

    @torch.no_grad()
    def step(self, lr_scale):
        for p in self.params:
            if p.grad is None:
                continue
            dp = p.grad
            if p.ndim != 1:
                dp = dp.add(p, alpha=WEIGHT_DECAY)
                p_norm = torch.norm(p)
                d_norm = torch.norm(dp)
                one = torch.ones_like(p_norm)
                q = torch.where(p_norm > 0.0, torch.where(d_norm > 0, ETA * p_norm / d_norm, one), one)
                dp = dp.mul(q)
                lr = LR_WEIGHTS * lr_scale
            else:
                lr = LR_BIASES * lr_scale
            if p not in self.mu:
                self.mu[p] = torch.zeros_like(p)
            mu = self.mu[p]
            mu.mul_(MOMENTUM).add_(dp)
            p.add_(mu, alpha=-lr)


def main():
    arch, cifar, projector, batch, size, threads = sys.argv[1:7]
    precision = sys.argv[7] if len(sys.argv) > 7 else "fp32"
    layout = sys.argv[8] if len(sys.argv) > 8 else "contiguous"
    if precision not in ("fp32", "bf16") or layout not in ("contiguous", "channels-last"):
        sys.exit(f"bad precision/layout {precision!r} {layout!r}")
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    model = Recipe(arch, cifar == "1", [int(x) for x in projector.split(",")]).train()
    b, s = int(batch), int(size)
    y1 = torch.randn(b, 3, s, s)
    y2 = torch.randn(b, 3, s, s)
    if layout == "channels-last":
        model = model.to(memory_format=torch.channels_last)
        y1 = y1.contiguous(memory_format=torch.channels_last)
        y2 = y2.contiguous(memory_format=torch.channels_last)
    opt = Lars(model.parameters())
    lr_scale = b / 256

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        for p in model.parameters():
            p.grad = None
        with autocast():
            loss = model(y1, y2)
        loss.backward()
        opt.step(lr_scale)

    step()  # warm-up (allocations, momentum buffers)
    print(f"ready {peak_rss_kib()}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
            print(json.dumps({"ms": times, "peak_rss_kib": peak_rss_kib()}), flush=True)


if __name__ == "__main__":
    main()
