"""Loads what `btctl export` wrote into stock torchvision models and checks their outputs.

usage: export_reference.py EXPORT.pth EXPORT.safetensors IO.safetensors ARCH CIFAR_STEM

EXPORT.pth is loaded with `torch.load` (weights_only, the default), EXPORT.safetensors (exported
with --projector) with safetensors; both go into `torchvision.models.ARCH()` with `fc` removed
(and, for CIFAR_STEM=1, the 3x3 stride-1 stem and no max-pool) through
`load_state_dict(strict=True)`. IO.safetensors holds a fixed batch `x` and bt's backbone output
`y` on it (eval mode); every model must reproduce `y` to 1e-5.
"""
import sys

import torch
import torchvision
from safetensors.torch import load_file


def build(arch, cifar_stem):
    m = getattr(torchvision.models, arch)()
    if cifar_stem:
        m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = torch.nn.Identity()
    m.fc = torch.nn.Identity()
    return m.eval()


def main():
    pth, st, io, arch, cifar = sys.argv[1:6]
    ref = load_file(io)
    x, y = ref["x"], ref["y"]
    with_projector = load_file(st)
    projector = [k for k in with_projector if k.startswith("projector.")]
    assert projector, "the --projector export has no projector.* keys"
    cases = {
        "pth": torch.load(pth),
        "safetensors": {k: v for k, v in with_projector.items() if not k.startswith("projector.")},
    }
    for name, sd in cases.items():
        m = build(arch, cifar == "1")
        m.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out = m(x)
        err = (out - y).abs().max().item()
        print(f"{name}: {len(sd)} tensors, max |torchvision - bt| = {err:.3g}")
        assert out.shape == y.shape, (out.shape, y.shape)
        assert err < 1e-5, f"{name}: outputs differ by {err}"
    print("ok")


if __name__ == "__main__":
    main()
