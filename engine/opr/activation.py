"""Activations of today's small models: erf (exact GELU), GELU, SiLU, clip (ReLU6), hard sigmoid
and hard swish. Each is one elementwise operator with its gradient written beside it.

numpy has no erf, so `erf` evaluates Cephes' rational approximations (S. Moshier, public domain;
the ones scipy compiles) in float64: exact to rounding, so GELU matches PyTorch's in float64.
"""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator
from .elemwise import Exp, Mul, Neg, _Unary

_T = (9.60497373987051638749e0, 9.00260197203842689217e1, 2.23200534594684319226e3, 7.00332514112805075473e3,
      5.55923013010394962768e4)  # fmt: skip
_U = (1.0, 3.35617141647503099647e1, 5.21357949780152679795e2, 4.59432382970980127987e3, 2.26290000613890934246e4,
      4.92673942608635921086e4)  # fmt: skip
_P = (2.46196981473530512524e-10, 5.64189564831068821977e-1, 7.46321056442269912687e0, 4.86371970985681366614e1,
      1.96520832956077098242e2, 5.26445194995477358631e2, 9.34528527171957607540e2, 1.02755188689515710272e3,
      5.57535335369399327526e2)  # fmt: skip
_Q = (1.0, 1.32281951154744992508e1, 8.67072140885989742329e1, 3.54937778887819891062e2, 9.75708501743205489753e2,
      1.82390916687909736289e3, 2.24633760818710981792e3, 1.65666309194161350182e3,
      5.57535340817727675546e2)  # fmt: skip
_TWO_OVER_SQRT_PI = 2.0 / np.sqrt(np.pi)
_INV_SQRT2 = 1.0 / np.sqrt(2.0)


def _poly(x: np.ndarray, coefficients: tuple) -> np.ndarray:
    out = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        out *= x
        out += c
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, computed in float64 and returned in x's dtype.

    |x| <= 1: x T(x²)/U(x²); else 1 - exp(-x²) P(|x|)/Q(|x|) with x's sign. Cephes switches to a
    third approximation past |x| = 8, where erf is 1 to double precision anyway."""
    x64 = np.asarray(x, np.float64)
    out = np.empty_like(x64)
    a = np.abs(x64)
    small = a <= 1.0
    xs = x64[small]
    z = xs * xs
    out[small] = xs * _poly(z, _T) / _poly(z, _U)
    large = ~small
    al = np.minimum(a[large], 8.0)
    out[large] = np.copysign(1.0 - np.exp(-al * al) * _poly(al, _P) / _poly(al, _Q), x64[large])
    dtype = x.dtype if isinstance(x, np.ndarray) and x.dtype.kind == "f" else np.float64
    return out.astype(dtype, copy=False)


def _like(value: np.ndarray, x: np.ndarray) -> np.ndarray:
    return value.astype(x.dtype, copy=False)


class Erf(_Unary):
    forward_into = Operator.forward_into

    def forward(self, x):
        return _like(erf(x), x)

    def grad(self, out, dout):
        x = out.inputs[0]
        return [Mul.make(dout, Mul.make(Exp.make(Neg.make(Mul.make(x, x))), _TWO_OVER_SQRT_PI))]


class Gelu(_Unary):
    """x * Phi(x) with the exact normal CDF (PyTorch's default GELU)."""

    forward_into = Operator.forward_into

    def forward(self, x):
        return _like(0.5 * x * (1.0 + erf(np.asarray(x, np.float64) * _INV_SQRT2)), x)

    def grad(self, out, dout):
        return [GeluGrad.make(out.inputs[0], dout)]


class GeluGrad(Operator):
    """dout * (Phi(x) + x * phi(x))."""

    n_inputs = 2
    elementwise = True

    def infer(self, x, dout):
        return dout.shape, dout.dtype

    def forward(self, x, dout):
        x64 = np.asarray(x, np.float64)
        cdf = 0.5 * (1.0 + erf(x64 * _INV_SQRT2))
        pdf = np.exp(-0.5 * x64 * x64) / np.sqrt(2.0 * np.pi)
        return (dout * (cdf + x64 * pdf)).astype(dout.dtype, copy=False)


class Silu(_Unary):
    """x * sigmoid(x) (swish)."""

    forward_into = Operator.forward_into

    def forward(self, x):
        return x * _sigmoid(x)

    def grad(self, out, dout):
        return [SiluGrad.make(out.inputs[0], dout)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


class SiluGrad(Operator):
    """dout * s * (1 + x * (1 - s)), s = sigmoid(x)."""

    n_inputs = 2
    elementwise = True

    def infer(self, x, dout):
        return dout.shape, dout.dtype

    def forward(self, x, dout):
        s = _sigmoid(x)
        return dout * s * (1 + x * (1 - s))


class Clip(_Unary):
    """min(max(x, low), high); either bound may be None. ReLU6 is Clip(0, 6). The gradient passes
    where low < x < high (PyTorch's hardtanh/relu6 rule: nothing flows at the bounds)."""

    forward_into = Operator.forward_into

    def infer(self, x):
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ShapeError(f"Clip: low {self.low} is above high {self.high}")
        return x.shape, x.dtype

    def forward(self, x):
        return np.clip(x, self.low, self.high).astype(x.dtype, copy=False)

    def grad(self, out, dout):
        return [ClipGrad.make(out.inputs[0], dout, low=self.low, high=self.high)]


class ClipGrad(Operator):
    n_inputs = 2
    elementwise = True

    def infer(self, x, dout):
        return dout.shape, dout.dtype

    def forward(self, x, dout):
        inside = np.ones(x.shape, bool)
        if self.low is not None:
            inside &= x > self.low
        if self.high is not None:
            inside &= x < self.high
        return dout * inside


class HardSigmoid(_Unary):
    """clip(alpha * x + beta, 0, 1): ONNX's HardSigmoid (PyTorch's is alpha=1/6, beta=1/2)."""

    forward_into = Operator.forward_into

    def forward(self, x):
        return np.clip(x * x.dtype.type(self.alpha) + x.dtype.type(self.beta), 0, 1)

    def grad(self, out, dout):
        x = out.inputs[0]
        return [HardGrad.make(x, dout, alpha=self.alpha, beta=self.beta, swish=False)]


class HardSwish(_Unary):
    """x * hardsigmoid(x) with alpha=1/6, beta=1/2 (MobileNetV3)."""

    forward_into = Operator.forward_into

    def forward(self, x):
        return x * np.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1)

    def grad(self, out, dout):
        return [HardGrad.make(out.inputs[0], dout, alpha=1 / 6, beta=0.5, swish=True)]


class HardGrad(Operator):
    """Gradient of hard sigmoid (alpha inside the ramp, 0 outside) and hard swish, with
    PyTorch's values at the ramp's ends (hardswish: 0 at x = -3, 1 at x = +3)."""

    n_inputs = 2
    elementwise = True

    def infer(self, x, dout):
        return dout.shape, dout.dtype

    def forward(self, x, dout):
        t = x * self.alpha + self.beta
        if not self.swish:
            return (dout * np.where((t > 0) & (t < 1), self.alpha, 0.0)).astype(dout.dtype, copy=False)
        slope = np.where(x <= -3, 0.0, np.where(x < 3, x / 3 + 0.5, 1.0))
        return (dout * slope).astype(dout.dtype, copy=False)
