/**
 * The update wire format (docs/protocol.md, "Update metadata"; protocol/update.py): one device's delta
 * for one round in a container of kind "update", as float32, float16 or int8 values, dense or top-k
 * sparse. `decodeUpdate` reads what `encodeUpdate` writes (tests, and the top-k residual of what was
 * really sent); the Python decoder reads it too (tests/test_js_agent.py).
 */

import { bytesOf, type Container, dumps, loads, type RawTensor, toFloat32 } from "./container.js";
import { type Delta, quantizeInt8, topkCount, topkIndices } from "./deltas.js";
import { FLOAT16_MAX, fromFloat16Bits, toFloat16Bits } from "./float16.js";

export type Encoding = "float32" | "float16" | "int8";
export const ENCODINGS: readonly Encoding[] = ["float32", "float16", "int8"];

export class UpdateError extends Error {
  override name = "UpdateError";
}

export interface UpdateInfo {
  sampleCount: number;
  roundId: number;
  baseVersion: number;
  metrics?: Record<string, number>;
  encoding?: Encoding;
  topkFraction?: number | null;
}

function encodeValues(
  name: string,
  values: Float32Array,
  encoding: Encoding,
): { raw: RawTensor; extra: object; decoded: Float32Array } {
  const shape = [values.length];
  if (encoding === "float32") {
    return { raw: { dtype: "float32", shape, bytes: bytesOf(values) }, extra: {}, decoded: values };
  }
  if (encoding === "float16") {
    const bits = new Uint16Array(values.length);
    for (let i = 0; i < values.length; i++) {
      if (Math.abs(values[i]!) > FLOAT16_MAX) {
        throw new UpdateError(
          `tensor ${JSON.stringify(name)}: values exceed the float16 range (${FLOAT16_MAX}); clip the delta or use float32`,
        );
      }
      bits[i] = toFloat16Bits(values[i]!);
    }
    const decoded = Float32Array.from(bits, fromFloat16Bits);
    return { raw: { dtype: "float16", shape, bytes: bytesOf(bits) }, extra: {}, decoded };
  }
  const { q, scale } = quantizeInt8(values);
  const s = Math.fround(scale);
  const decoded = Float32Array.from(q, (v) => Math.fround(v * s));
  return { raw: { dtype: "int8", shape, bytes: bytesOf(q) }, extra: { scale }, decoded };
}

/**
 * Encode `delta` (name -> values, with `shapes`) as update bytes. Returns the bytes and the dense values
 * the server will decode (for the top-k residual: what was not sent, including rounding, is carried on).
 */
export function encodeUpdate(
  delta: Delta,
  shapes: Map<string, number[]>,
  info: UpdateInfo,
): { body: Uint8Array; sent: Delta } {
  const encoding = info.encoding ?? "float32";
  if (!ENCODINGS.includes(encoding))
    throw new UpdateError(`encoding ${encoding} is not one of ${ENCODINGS.join(", ")}`);
  const fraction = info.topkFraction ?? null;
  if (fraction !== null && !(fraction > 0 && fraction <= 1))
    throw new UpdateError(`topk_fraction ${fraction} must be in (0, 1]`);
  for (const [field, value, min] of [
    ["sample_count", info.sampleCount, 1],
    ["round_id", info.roundId, 0],
    ["base_version", info.baseVersion, 0],
  ] as const) {
    if (!Number.isInteger(value) || value < min)
      throw new UpdateError(`${field} must be an integer >= ${min}, got ${value}`);
  }
  const metrics: Record<string, number> = {};
  for (const [key, value] of Object.entries(info.metrics ?? {})) {
    if (!Number.isFinite(value)) throw new UpdateError(`metric ${key} is not finite (${value})`);
    metrics[key] = value;
  }
  const tensors: [string, RawTensor][] = [];
  const described: Record<string, object> = {};
  const sent: Delta = new Map();
  for (const [name, values] of delta) {
    const shape = shapes.get(name);
    if (!shape) throw new UpdateError(`tensor ${JSON.stringify(name)}: no shape given`);
    if (!values.every(Number.isFinite))
      throw new UpdateError(`tensor ${JSON.stringify(name)}: contains NaN or Inf; refusing to send it`);
    if (fraction === null) {
      const { raw, extra, decoded } = encodeValues(name, values, encoding);
      tensors.push([name, { ...raw, shape: [...shape] }]);
      described[name] = { shape: [...shape], encoding, ...extra };
      sent.set(name, decoded);
    } else {
      if (name.includes("/"))
        throw new UpdateError(`tensor ${JSON.stringify(name)}: names with '/' cannot be sparse-encoded`);
      const indices = topkIndices(values, topkCount(values.length, fraction));
      const picked = Float32Array.from(indices, (i) => values[i]!);
      const { raw, extra, decoded } = encodeValues(name, picked, encoding);
      tensors.push([`${name}/indices`, { dtype: "int32", shape: [indices.length], bytes: bytesOf(indices) }]);
      tensors.push([`${name}/values`, raw]);
      described[name] = { shape: [...shape], encoding: "sparse", values: encoding, ...extra };
      const dense = new Float32Array(values.length);
      indices.forEach((i, j) => {
        dense[i] = decoded[j]!;
      });
      sent.set(name, dense);
    }
  }
  const metadata = {
    format: "pocketfed-update",
    format_version: 1,
    encoding,
    sparse: fraction !== null,
    sample_count: info.sampleCount,
    round_id: info.roundId,
    base_version: info.baseVersion,
    metrics,
    tensors: described,
  };
  return { body: dumps(tensors, metadata, "update"), sent };
}

function decodeValues(name: string, raw: RawTensor, encoding: unknown, spec: Record<string, unknown>): Float32Array {
  if (raw.dtype !== encoding)
    throw new UpdateError(`tensor ${name}: stored as ${raw.dtype}, its encoding says ${String(encoding)}`);
  const view = new DataView(raw.bytes.buffer, raw.bytes.byteOffset, raw.bytes.byteLength);
  if (encoding === "float32") return toFloat32(raw);
  if (encoding === "float16")
    return Float32Array.from({ length: raw.bytes.length / 2 }, (_, i) => fromFloat16Bits(view.getUint16(i * 2, true)));
  if (encoding === "int8") {
    const scale = spec.scale;
    if (typeof scale !== "number" || !(scale >= 0))
      throw new UpdateError(`tensor ${name}: int8 scale ${String(scale)} must be a number >= 0`);
    const s = Math.fround(scale);
    return Float32Array.from({ length: raw.bytes.length }, (_, i) => Math.fround(view.getInt8(i) * s));
  }
  throw new UpdateError(`tensor ${name}: encoding ${String(encoding)} is not one of ${ENCODINGS.join(", ")}`);
}

/** Parse update bytes into dense float32 tensors plus its numbers (strict, like protocol.update.decode_update). */
export function decodeUpdate(data: Uint8Array): {
  delta: Delta;
  metadata: Record<string, unknown>;
  container: Container;
} {
  const container = loads(data, "update");
  const meta = container.metadata;
  if (meta.format !== "pocketfed-update" || meta.format_version !== 1)
    throw new UpdateError("not a pocketfed-update, format_version 1");
  const described = meta.tensors;
  if (typeof described !== "object" || described === null) throw new UpdateError("tensors must be an object");
  const delta: Delta = new Map();
  for (const [name, specValue] of Object.entries(described as Record<string, unknown>)) {
    const spec = specValue as Record<string, unknown>;
    const size = (spec.shape as number[]).reduce((a, b) => a * b, 1);
    if (spec.encoding !== "sparse") {
      const raw = container.tensors.get(name);
      if (!raw) throw new UpdateError(`tensor ${name}: described but its data is missing`);
      delta.set(name, decodeValues(name, raw, spec.encoding, spec));
      continue;
    }
    const indices = container.tensors.get(`${name}/indices`);
    const values = container.tensors.get(`${name}/values`);
    if (!indices || !values || indices.dtype !== "int32")
      throw new UpdateError(`tensor ${name}: sparse parts missing or mistyped`);
    const idx = new DataView(indices.bytes.buffer, indices.bytes.byteOffset, indices.bytes.byteLength);
    const decoded = decodeValues(name, values, spec.values, spec);
    const dense = new Float32Array(size);
    for (let j = 0; j < decoded.length; j++) dense[idx.getInt32(j * 4, true)] = decoded[j]!;
    delta.set(name, dense);
  }
  return { delta, metadata: meta, container };
}
