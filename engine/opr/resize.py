"""Nearest-neighbour resizing of the two spatial axes of NCHW (ONNX's Resize, mode "nearest";
PyTorch's nn.Upsample(mode="nearest")). Each output pixel copies one input pixel, chosen by
ONNX's coordinate transformation and rounding rules, so the gradient adds each output's
gradient back onto the pixel it copied.
"""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, shape_str

COORDINATE_MODES = ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners", "tf_half_pixel_for_nn")
NEAREST_MODES = ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil")


def source_index(out_size: int, in_size: int, coordinate: str, nearest: str) -> np.ndarray:
    """For each output position along one axis, the input position it copies."""
    dst = np.arange(out_size, dtype=np.float64)
    scale = out_size / in_size
    if coordinate == "asymmetric":
        src = dst / scale
    elif coordinate == "align_corners":
        src = dst * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros(out_size)
    elif coordinate == "tf_half_pixel_for_nn":
        src = (dst + 0.5) / scale
    elif coordinate == "pytorch_half_pixel" and out_size == 1:
        src = np.zeros(out_size)
    else:  # half_pixel, pytorch_half_pixel
        src = (dst + 0.5) / scale - 0.5
    if nearest == "floor":
        index = np.floor(src)
    elif nearest == "ceil":
        index = np.ceil(src)
    elif nearest == "round_prefer_ceil":
        index = np.floor(src + 0.5)
    else:  # round_prefer_floor
        index = np.ceil(src - 0.5)
    return np.clip(index, 0, in_size - 1).astype(np.intp)


class ResizeNearest(Operator):
    n_inputs = 1

    def infer(self, x):
        if x.ndim != 4 or None in x.shape[2:]:
            raise ShapeError(
                f"ResizeNearest: input must be NCHW with static height and width, got {shape_str(x.shape)}"
            )
        if self.coordinate not in COORDINATE_MODES or self.nearest not in NEAREST_MODES:
            raise ShapeError(
                f"ResizeNearest: coordinate mode {self.coordinate!r} / nearest mode {self.nearest!r} not in "
                f"{COORDINATE_MODES} / {NEAREST_MODES}"
            )
        if len(self.size) != 2 or min(self.size) < 1:
            raise ShapeError(f"ResizeNearest: output size {self.size} must be two positive sizes")
        return (*x.shape[:2], *self.size), x.dtype

    def indices(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            source_index(self.size[0], h, self.coordinate, self.nearest),
            source_index(self.size[1], w, self.coordinate, self.nearest),
        )

    def forward(self, x):
        rows, cols = self.indices(*x.shape[2:])
        return x[:, :, rows[:, None], cols[None, :]]

    def grad(self, out, dout):
        x = out.inputs[0]
        return [ResizeNearestGrad.make(dout, x, size=self.size, coordinate=self.coordinate, nearest=self.nearest)]


class ResizeNearestGrad(Operator):
    """Sum each output gradient into the input pixel it was copied from; `like` is the input."""

    n_inputs = 2

    def infer(self, dout, like):
        return like.shape, dout.dtype

    def forward(self, dout, like):
        n, c, h, w = like.shape
        rows, cols = ResizeNearest(size=self.size, coordinate=self.coordinate, nearest=self.nearest).indices(h, w)
        # rows first: sum output rows copied from the same input row, then the same for columns
        by_row = np.zeros((n, c, h, dout.shape[3]), dout.dtype)
        np.add.at(by_row, (slice(None), slice(None), rows), dout)
        out = np.zeros((n, c, h, w), dout.dtype)
        np.add.at(out, (slice(None), slice(None), slice(None), cols), by_row)
        return out
