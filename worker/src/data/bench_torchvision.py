#!/usr/bin/env python3
"""Reference data pipeline for `bt-bench data`: torchvision transforms + PIL doing the same
two-view Barlow Twins augmentations (BYOL's table), fed by a torch DataLoader with N worker
processes. Prints one JSON line: {"images_per_s": ..., "images": ..., "seconds": ...}.

The pipeline mirrors the official Barlow Twins code: PIL images, RandomResizedCrop(bicubic),
RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8), RandomGrayscale(0.2),
Gaussian blur (p 1.0 / 0.1) and solarization (p 0 / 0.2) as the official code does them, with
PIL's ImageFilter.GaussianBlur(radius=sigma), sigma uniform in [0.1, 2], and ImageOps.solarize,
then ToTensor, Normalize. (torchvision's own GaussianBlur convolves with a dense 2-D kernel and is
several times slower at 224 pixels; PIL's is what the official pipeline ran.)
"""
import argparse
import gzip
import json
import os
import random
import struct
import time

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PilBlur:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.random() * 1.9 + 0.1))
        return img


class PilSolarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def view(crop, blur, blur_p, sol_p):
    ops = [
        T.RandomResizedCrop(crop, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur and blur_p > 0:
        ops.append(PilBlur(blur_p))
    if sol_p > 0:
        ops.append(PilSolarize(sol_p))
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


def read_idx(path):
    opener = gzip.open if open(path, "rb").read(2) == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        raw = f.read()
    nd = raw[3]
    dims = struct.unpack(">" + "I" * nd, raw[4 : 4 + 4 * nd])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


class TwoViews(Dataset):
    def __init__(self, args):
        if args.kind == "idx":
            name = "train-images-idx3-ubyte"
            path = os.path.join(args.path, name)
            if not os.path.exists(path):
                path += ".gz"
            self.arr = read_idx(path)
            self.files = None
        else:
            self.arr = None
            self.files = sorted(
                os.path.join(r, f)
                for r, _, fs in os.walk(args.path)
                for f in fs
                if f.lower().endswith((".jpg", ".jpeg", ".png"))
            )
        self.a = view(args.crop, args.blur, 1.0, 0.0)
        self.b = view(args.crop, args.blur, 0.1, 0.2)

    def __len__(self):
        return len(self.arr) if self.arr is not None else len(self.files)

    def __getitem__(self, i):
        if self.arr is not None:
            img = Image.fromarray(self.arr[i], mode="L").convert("RGB")
        else:
            with open(self.files[i], "rb") as f:
                img = Image.open(f).convert("RGB")
        return self.a(img), self.b(img)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=["idx", "jpeg"], required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--crop", type=int, required=True)
    p.add_argument("--blur", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = TwoViews(args)
    dl = DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=True,
        prefetch_factor=2,
    )
    it = iter(dl)
    next(it)  # warm-up: worker start
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.steps):
        try:
            a, b = next(it)
        except StopIteration:
            it = iter(dl)
            a, b = next(it)
        n += a.shape[0]
    dt = time.perf_counter() - t0
    print(json.dumps({"images_per_s": n / dt, "images": n, "seconds": dt}))


if __name__ == "__main__":
    main()
