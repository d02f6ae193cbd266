/**
 * The math a delta goes through before it leaves the device (docs/protocol.md, "Encoding rules"):
 * global L2 norm, clipping, Gaussian noise, top-k with error feedback, int8. Mirrors protocol/deltas.py
 * number for number (float32 results, norms accumulated in float64).
 */

import { gaussian, type Uniform } from "./random.js";

export type Delta = Map<string, Float32Array>;

export function globalL2Norm(delta: Delta): number {
  let sum = 0;
  for (const values of delta.values()) for (const v of values) sum += v * v;
  return Math.sqrt(sum);
}

/** Scale the whole delta to a global norm <= maxNorm; returns the clipped delta and the norm before. */
export function clipByL2(delta: Delta, maxNorm: number): { delta: Delta; norm: number } {
  if (!(maxNorm > 0)) throw new RangeError(`clip norm must be > 0, got ${maxNorm}`);
  const norm = globalL2Norm(delta);
  const factor = norm > 0 ? Math.min(1, maxNorm / norm) : 1;
  if (factor >= 1) return { delta, norm };
  const f = Math.fround(factor);
  const out: Delta = new Map();
  for (const [name, values] of delta)
    out.set(
      name,
      values.map((v) => Math.fround(v * f)),
    );
  return { delta: out, norm };
}

/** delta + N(0, std^2) on every element (a new delta). */
export function addGaussianNoise(delta: Delta, std: number, uniform: Uniform): Delta {
  if (!(std >= 0)) throw new RangeError(`noise std must be >= 0, got ${std}`);
  const normal = gaussian(uniform);
  const out: Delta = new Map();
  for (const [name, values] of delta)
    out.set(
      name,
      values.map((v) => v + std * normal()),
    );
  return out;
}

export function topkCount(size: number, fraction: number): number {
  return size === 0 ? 0 : Math.min(size, Math.max(1, Math.ceil(fraction * size)));
}

/** Flat indices of the k largest-magnitude entries, ascending (the wire order). */
export function topkIndices(flat: Float32Array, k: number): Int32Array {
  if (k >= flat.length) return Int32Array.from(flat.keys());
  const order = Int32Array.from(flat.keys()).sort((a, b) => Math.abs(flat[b]!) - Math.abs(flat[a]!));
  return order.subarray(0, k).sort();
}

/**
 * Top-k with error feedback: for each tensor, the largest entries of (delta + residual) are sent and
 * the rest is carried to the next round. Returns the dense delta to send (zeros elsewhere) and the new residual.
 */
export function topkCompress(delta: Delta, fraction: number, residual: Delta): { sent: Delta; residual: Delta } {
  if (!(fraction > 0 && fraction <= 1)) throw new RangeError(`top-k fraction must be in (0, 1], got ${fraction}`);
  const sent: Delta = new Map();
  const left: Delta = new Map();
  for (const [name, values] of delta) {
    const carried = residual.get(name);
    const total = carried && carried.length === values.length ? values.map((v, i) => v + carried[i]!) : values.slice();
    const keep = topkIndices(total, topkCount(total.length, fraction));
    const dense = new Float32Array(total.length);
    for (const i of keep) dense[i] = total[i]!;
    sent.set(name, dense);
    left.set(
      name,
      total.map((v, i) => v - dense[i]!),
    );
  }
  return { sent, residual: left };
}

/** Round half to even, like numpy's rint. */
export function rint(v: number): number {
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** Symmetric per-tensor int8: |x - q * scale| <= scale / 2 (bit-identical to protocol.deltas.quantize_int8). */
export function quantizeInt8(x: Float32Array): { q: Int8Array; scale: number } {
  let peak = 0;
  for (const v of x) peak = Math.max(peak, Math.abs(v));
  const scale = peak / 127;
  const q = new Int8Array(x.length);
  if (scale === 0) return { q, scale: 0 };
  const s = Math.fround(scale);
  for (let i = 0; i < x.length; i++) q[i] = Math.max(-127, Math.min(127, rint(Math.fround(x[i]! / s))));
  return { q, scale };
}
