#!/usr/bin/env python3
"""Writes the test cut of Fashion-MNIST used by the worker's unit tests.

The first 512 training images/labels are written gzipped and the first 256 test images/labels raw,
so the tests cover both encodings. Source: Debian's fashion-mnist package (gzipped IDX files).

    python3 make_fashion_mnist_cut.py [/usr/share/datasets/fashion-mnist]
"""
import gzip
import os
import struct
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion-mnist-cut")


def cut(name, n, compress):
    with gzip.open(os.path.join(SRC, name + ".gz"), "rb") as f:
        raw = f.read()
    ndims = raw[3]
    dims = list(struct.unpack(">" + "I" * ndims, raw[4 : 4 + 4 * ndims]))
    item = 1
    for d in dims[1:]:
        item *= d
    dims[0] = n
    body = raw[4 + 4 * ndims : 4 + 4 * ndims + n * item]
    data = raw[:4] + struct.pack(">" + "I" * ndims, *dims) + body
    path = os.path.join(OUT, name + (".gz" if compress else ""))
    if compress:
        with open(path, "wb") as f:
            f.write(gzip.compress(data, compresslevel=9, mtime=0))
    else:
        with open(path, "wb") as f:
            f.write(data)


os.makedirs(OUT, exist_ok=True)
cut("train-images-idx3-ubyte", 512, True)
cut("train-labels-idx1-ubyte", 512, True)
cut("t10k-images-idx3-ubyte", 256, False)
cut("t10k-labels-idx1-ubyte", 256, False)
