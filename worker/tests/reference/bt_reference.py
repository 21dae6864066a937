#!/usr/bin/env python3
"""Independent PyTorch reference for worker/tests/reference.rs.

Usage: bt_reference.py <mode> <dir>, mode in {backbone, loss, step, amp}. Inputs are read from
<dir>/args.json and <dir>/*.safetensors written by the Rust test; results go to
<dir>/out.safetensors (and <dir>/out.json). Everything runs on the CPU.

The model comes from torchvision (the layout the Rust model must reproduce); the Barlow Twins
loss and LARS are written here from their definitions (../shared/design/BARLOW_TWINS.md), not
taken from the Rust code.
"""
import json
import math
import sys

import torch
import torchvision
from safetensors.torch import load_file, save_file


def resnet(arch, cifar_stem, dtype, stem_stride=1):
    """torchvision's ResNet in `dtype` (cast before loading weights, so f64 weights stay f64);
    the CIFAR stem is a 3x3 convolution of stride `stem_stride` without the max-pool."""
    m = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        m.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        m.maxpool = torch.nn.Identity()
    return m.to(dtype)


def load_backbone(m, sd):
    """Loads torchvision-named weights; the only keys allowed to be missing are fc.*."""
    res = m.load_state_dict(sd, strict=False)
    missing = sorted(res.missing_keys)
    if missing != ["fc.bias", "fc.weight"] or res.unexpected_keys:
        raise SystemExit(f"unexpected key sets: missing={missing} unexpected={res.unexpected_keys}")
    m.fc = torch.nn.Identity()
    return m


def mode_backbone(d, args):
    weights = load_file(f"{d}/weights.safetensors")
    x = load_file(f"{d}/input.safetensors")["x"]
    dtype = x.dtype
    stride = args.get("stem_stride", 1)
    eval_m = load_backbone(resnet(args["arch"], args["cifar_stem"], dtype, stride), weights).eval()
    train_m = load_backbone(resnet(args["arch"], args["cifar_stem"], dtype, stride), weights).train()
    with torch.no_grad():
        out = {"eval": eval_m(x).contiguous(), "train": train_m(x).contiguous()}
    # Running statistics after the training-mode forward.
    for k, v in train_m.state_dict().items():
        if "running_" in k or "num_batches_tracked" in k:
            out[f"state.{k}"] = v.contiguous()
    save_file(out, f"{d}/out.safetensors")


def standardize(z, eps=1e-5):
    """Per-feature over the batch: mean 0, biased variance 1, no affine."""
    mean = z.mean(dim=0, keepdim=True)
    var = ((z - mean) ** 2).mean(dim=0, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def bt_loss(za, zb, lam):
    n, dim = za.shape
    c = standardize(za).T @ standardize(zb) / n
    on = ((torch.diagonal(c) - 1) ** 2).sum()
    off_mask = ~torch.eye(dim, dtype=torch.bool)
    off = (c[off_mask] ** 2).sum()
    return on + lam * off, on, off


def mode_loss(d, args):
    t = load_file(f"{d}/input.safetensors")
    za = t["za"].clone().requires_grad_(True)
    zb = t["zb"].clone().requires_grad_(True)
    loss, on, off = bt_loss(za, zb, args["lambda"])
    loss.backward()
    save_file(
        {
            "loss": loss.detach().reshape(1),
            "on_diag": on.detach().reshape(1),
            "off_diag": off.detach().reshape(1),
            "grad_a": za.grad.contiguous(),
            "grad_b": zb.grad.contiguous(),
        },
        f"{d}/out.safetensors",
    )


def lr_factor(step, global_batch, warmup, total):
    base = global_batch / 256
    if step < warmup:
        return base * step / warmup
    step -= warmup
    total -= warmup
    q = 0.5 * (1 + math.cos(math.pi * step / total))
    return base * q + base * 0.001 * (1 - q)


@torch.no_grad()
def lars_step(named_params, momentum, a):
    f = lr_factor(a["step"], a["global_batch"], a["warmup_steps"], a["total_steps"])
    for name, p in named_params:
        if p.grad is None:
            continue
        g = p.grad * a["loss_scale"]
        if p.ndim != 1:
            dp = g + a["weight_decay"] * p
            pn, un = torch.norm(p), torch.norm(dp)
            q = a["eta"] * pn / un if (pn > 0 and un > 0) else 1.0
            dp = dp * q
            lr = a["lr_weights"] * f
        else:
            dp = g
            lr = a["lr_biases"] * f
        mu = momentum[name]
        mu.mul_(a["momentum"]).add_(dp)
        p.sub_(lr * mu)


def mode_step(d, args):
    w = load_file(f"{d}/weights.safetensors")
    inp = load_file(f"{d}/input.safetensors")
    mom = load_file(f"{d}/momentum.safetensors")
    xa, xb = inp["xa"], inp["xb"]
    dtype = xa.dtype
    bb_sd = {k[len("backbone."):]: v for k, v in w.items() if k.startswith("backbone.")}
    backbone = load_backbone(resnet(args["arch"], args["cifar_stem"], dtype), bb_sd)
    widths = args["projector"]
    layers, d_in = [], 2048 if args["arch"] == "resnet50" else 512
    for i, d_out in enumerate(widths):
        layers.append(torch.nn.Linear(d_in, d_out, bias=False))
        if i + 1 < len(widths):
            layers += [torch.nn.BatchNorm1d(d_out), torch.nn.ReLU()]
        d_in = d_out
    projector = torch.nn.Sequential(*layers).to(dtype)
    pr_sd = {k[len("projector."):]: v for k, v in w.items() if k.startswith("projector.")}
    projector.load_state_dict(pr_sd, strict=True)
    model = torch.nn.ModuleDict({"backbone": backbone, "projector": projector}).train()

    za = projector(backbone(xa))
    zb = projector(backbone(xb))
    loss, _, _ = bt_loss(za, zb, args["lambda"])
    loss.backward()
    named = list(model.named_parameters())
    momentum = {k: v.clone() for k, v in mom.items()}
    if sorted(momentum) != sorted(n for n, _ in named):
        raise SystemExit("momentum names differ from parameter names")
    lars_step(named, momentum, args)
    out = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out.update({f"momentum.{k}": v.contiguous() for k, v in momentum.items()})
    out["loss"] = loss.detach().reshape(1)
    save_file(out, f"{d}/out.safetensors")


def mode_amp(d, args):
    """Backbone forward (train mode) and backward of sum(out·r) under torch.autocast on the CPU
    with bfloat16 and channels-last weights and input, plus the same in fp32 contiguous."""
    weights = load_file(f"{d}/weights.safetensors")
    inp = load_file(f"{d}/input.safetensors")
    x, r = inp["x"], inp["r"]
    out = {}
    for tag, amp in (("bf16", True), ("fp32", False)):
        m = load_backbone(resnet(args["arch"], args["cifar_stem"], torch.float32), weights).train()
        xin = x
        if amp:
            m = m.to(memory_format=torch.channels_last)
            xin = x.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = m(xin)
        (y.float() * r).sum().backward()
        out[f"{tag}.out"] = y.detach().float().contiguous()
        for name in args["grads"]:
            out[f"{tag}.grad.{name}"] = m.get_parameter(name).grad.contiguous()
    save_file(out, f"{d}/out.safetensors")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    mode, d = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    with open(f"{d}/args.json") as f:
        args = json.load(f)
    {"backbone": mode_backbone, "loss": mode_loss, "step": mode_step, "amp": mode_amp}[mode](d, args)
    with open(f"{d}/out.json", "w") as f:
        json.dump({"ok": True, "torch": torch.__version__, "torchvision": torchvision.__version__}, f)


if __name__ == "__main__":
    main()
