#!/usr/bin/env python3
"""Independent reference for the deterministic parts of bt's augmentation (worker/tests/augment_reference.rs).

Reads the case written by the Rust test from DIR (case.json, img.bin, views.bin, ours_resize.bin,
ours_color.bin), recomputes it with PIL and torchvision.transforms.functional, and prints one JSON
line with the differences:

- crop + resize + flip: PIL `Image.crop(box).resize((S, S), BICUBIC)` (what torchvision's
  RandomResizedCrop does on PIL images), then FLIP_LEFT_RIGHT; u8 differences.
- device stage: torchvision.transforms.functional on float tensors in [0, 1]: adjust_brightness /
  adjust_contrast / adjust_saturation / adjust_hue in the sample's order, rgb_to_grayscale(3),
  gaussian_blur, solarize(128/255), normalize; float differences.
"""
import json
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image

d = sys.argv[1]
case = json.load(open(os.path.join(d, "case.json")))
h, w = case["height"], case["width"]
img = np.fromfile(os.path.join(d, "img.bin"), dtype=np.uint8).reshape(h, w, 3)
pil = Image.fromarray(img, mode="RGB")

ours = np.fromfile(os.path.join(d, "ours_resize.bin"), dtype=np.uint8)
off = 0
resize_max, resize_gt1, resize_n, resize_per_case = 0, 0, 0, []
for c in case["resize"]:
    s = c["size"]
    ref = pil.crop((c["left"], c["top"], c["left"] + c["w"], c["top"] + c["h"])).resize(
        (s, s), Image.BICUBIC
    )
    if c["flip"]:
        ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
    ref = np.asarray(ref).transpose(2, 0, 1).astype(np.int32)  # CHW
    got = ours[off : off + ref.size].reshape(ref.shape).astype(np.int32)
    off += ref.size
    diff = np.abs(ref - got)
    resize_per_case.append(int(diff.max()))
    resize_max = max(resize_max, int(diff.max()))
    resize_gt1 += int((diff > 1).sum())
    resize_n += diff.size

n, S = case["n"], case["size"]
views = torch.from_numpy(np.fromfile(os.path.join(d, "views.bin"), dtype=np.uint8).reshape(n, 3, S, S))
got = torch.from_numpy(np.fromfile(os.path.join(d, "ours_color.bin"), dtype=np.float32).reshape(n, 3, S, S))
ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
color_max, per_sample = 0.0, []
for i, p in enumerate(case["samples"]):
    x = views[i].float() / 255.0
    if p["jitter"] is not None:
        j = p["jitter"]
        fac = [j["brightness"], j["contrast"], j["saturation"], j["hue"]]
        for op in j["order"]:
            x = ops[op](x, fac[op])
    if p["grayscale"]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p["blur_sigma"] is not None:
        k = case["blur_kernel"]
        x = F.gaussian_blur(x, [k, k], [p["blur_sigma"], p["blur_sigma"]])
    if p["solarize"]:
        x = F.solarize(x, 128.0 / 255.0)
    x = F.normalize(x, case["mean"], case["std"])
    dmax = float((x - got[i]).abs().max())
    per_sample.append(dmax)
    color_max = max(color_max, dmax)

print(
    json.dumps(
        {
            "resize_max": resize_max,
            "resize_frac_gt1": resize_gt1 / max(resize_n, 1),
            "resize_per_case": resize_per_case,
            "color_max": color_max,
            "color_per_sample": per_sample,
        }
    )
)
