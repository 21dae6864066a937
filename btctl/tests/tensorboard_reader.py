"""Reads event files back with TensorBoard's own reader and prints what it found as JSON.

usage: tensorboard_reader.py DIR  ->
  {"scalars": {"tag": [[step, value], ...]},
   "images": {"tag": [[step, width, height, [first row's grey values]], ...]}}
"""
import io
import json
import sys

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
acc.Reload()
tags = acc.Tags()
scalars = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in tags["scalars"]}
images = {}
for tag in tags["images"]:
    images[tag] = []
    for e in acc.Images(tag):
        img = Image.open(io.BytesIO(e.encoded_image_string)).convert("L")
        row = [img.getpixel((x, 0)) for x in range(img.width)]
        images[tag].append([e.step, e.width, e.height, row])
print(json.dumps({"scalars": scalars, "images": images}))
