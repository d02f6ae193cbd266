"""Build the Fashion-MNIST subset shipped in engine/data/embedded/.

Run from the repository root (needs Debian's dataset-fashion-mnist, or any
Fashion-MNIST IDX directory passed with --source):

    python -m engine.data.make_embedded
    python -m engine.data.make_embedded --source DIR --train-per-class 900 --test-per-class 200

How the subset is chosen: for each split and each of the 10 classes, a
permutation from numpy's default_rng(seed) picks `per-class` indices of that
class; the union is sorted back into the original file order (already
shuffled by Zalando). Same source + same arguments -> byte-identical files
(gzip level 9, mtime 0). 900 + 200 per class keeps the package under 5 MB
at about 433 bytes per compressed image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .idx import read_idx, write_idx
from .mnist import SPLIT_PREFIX, find_idx_file

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).parent / "embedded"
LICENSE_NAME = "LICENSE-fashion-mnist.txt"

LICENSE_TEXT = """\
Fashion-MNIST subset shipped with pocketfed
===========================================

These files are a SUBSET of Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist),
taken from Debian's package dataset-fashion-mnist and unchanged except for the selection:
{train_n} training images ({train_k} per class) and {test_n} test images ({test_k} per class),
chosen per class with numpy.random.default_rng({seed}) and kept in the original order.
Made by engine/data/make_embedded.py.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def balanced_indices(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """`per_class` indices of every class, picked at random, returned in ascending order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(f"class {cls} has only {len(members)} samples, {per_class} requested")
        chosen.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(chosen))


def make_subset(source: Path, out: Path, train_per_class: int, test_per_class: int, seed: int) -> int:
    """Write the four gz IDX files and the licence into `out`; returns total bytes written."""
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        prefix = SPLIT_PREFIX[split]
        images = read_idx(find_idx_file(source, f"{prefix}-images-idx3-ubyte"), expected_ndim=3)
        labels = read_idx(find_idx_file(source, f"{prefix}-labels-idx1-ubyte"), expected_ndim=1)
        keep = balanced_indices(labels, per_class, seed)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])
    (out / LICENSE_NAME).write_text(
        LICENSE_TEXT.format(
            train_n=10 * train_per_class,
            train_k=train_per_class,
            test_n=10 * test_per_class,
            test_k=test_per_class,
            seed=seed,
        )
    )
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEBIAN_SOURCE, help="full Fashion-MNIST IDX directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--train-per-class", type=int, default=900)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    total = make_subset(args.source, args.out, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
