/**
 * The pocketfed tensor container (docs/protocol.md, "Container, byte by byte"): models, updates and the
 * agent's own files all use it. Layout, little-endian:
 *
 *   0        8 bytes  magic "PFTENSOR"
 *   8        u32      container version (1)
 *   12       u64      header length H
 *   20       H bytes  UTF-8 JSON {"kind", "metadata", "payload_sha256", "tensors": [{name, dtype, shape, offset, nbytes}]}
 *   20 + H            payload: the tensors' raw bytes, packed, NOT aligned
 *
 * The reader checks every declared size against the real data before it allocates anything, and the
 * payload's sha256; tensors are copied out (the payload is usually not 4-byte aligned).
 */

import { sha256Hex } from "./sha256.js";

export const MAGIC = "PFTENSOR";
export const CONTAINER_VERSION = 1;
export const MAX_HEADER_BYTES = 64 * 1024 * 1024;
export const MAX_NDIM = 8;

export type DType = "float32" | "float64" | "float16" | "int8" | "uint8" | "int32" | "int64" | "bool";
export const ITEMSIZE: Record<DType, number> = {
  float32: 4,
  float64: 8,
  float16: 2,
  int8: 1,
  uint8: 1,
  int32: 4,
  int64: 8,
  bool: 1,
};

/** A tensor as stored: raw little-endian bytes (its own copy) plus dtype and shape. */
export interface RawTensor {
  dtype: DType;
  shape: number[];
  bytes: Uint8Array;
}

export interface Container {
  kind: string;
  metadata: Record<string, unknown>;
  tensors: Map<string, RawTensor>;
}

export class ContainerError extends Error {
  override name = "ContainerError";
}

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export function elementCount(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Serialize tensors (in the given order) and JSON metadata into container bytes. */
export function dumps(
  tensors: Iterable<[string, RawTensor]>,
  metadata: Record<string, unknown>,
  kind: string,
): Uint8Array {
  const entries: object[] = [];
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const [name, tensor] of tensors) {
    const nbytes = ITEMSIZE[tensor.dtype] * elementCount(tensor.shape);
    if (tensor.bytes.length !== nbytes) {
      throw new ContainerError(`tensor ${name}: ${tensor.bytes.length} bytes, its shape needs ${nbytes}`);
    }
    entries.push({ name, dtype: tensor.dtype, shape: [...tensor.shape], offset, nbytes });
    chunks.push(tensor.bytes);
    offset += nbytes;
  }
  const header = encoder.encode(
    JSON.stringify({ kind, metadata, payload_sha256: sha256Hex(...chunks), tensors: entries }),
  );
  const out = new Uint8Array(20 + header.length + offset);
  out.set(encoder.encode(MAGIC), 0);
  const view = new DataView(out.buffer);
  view.setUint32(8, CONTAINER_VERSION, true);
  view.setBigUint64(12, BigInt(header.length), true);
  out.set(header, 20);
  let at = 20 + header.length;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
}

function isSize(value: unknown): value is number {
  return typeof value === "number" && Number.isInteger(value) && value >= 0;
}

/** Parse container bytes; `kind` (if given) must match. Throws ContainerError naming what is wrong. */
export function loads(data: Uint8Array, kind?: string): Container {
  if (data.length < 20) throw new ContainerError(`${data.length} bytes is too short to be a pocketfed container`);
  const magic = String.fromCharCode(...data.subarray(0, 8));
  if (magic !== MAGIC) throw new ContainerError(`wrong magic ${JSON.stringify(magic)}: not a pocketfed container`);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const version = view.getUint32(8, true);
  if (version !== CONTAINER_VERSION) {
    throw new ContainerError(`container format version ${version} is not supported (this reader: 1)`);
  }
  const headerLength = view.getBigUint64(12, true);
  if (headerLength > BigInt(MAX_HEADER_BYTES) || 20n + headerLength > BigInt(data.length)) {
    throw new ContainerError(`header length ${headerLength} exceeds the data (${data.length} bytes)`);
  }
  const h = Number(headerLength);
  let header: unknown;
  try {
    header = JSON.parse(decoder.decode(data.subarray(20, 20 + h)));
  } catch (error) {
    throw new ContainerError(`header is not valid JSON: ${String(error).slice(0, 200)}`);
  }
  if (typeof header !== "object" || header === null || !Array.isArray((header as { tensors?: unknown }).tensors)) {
    throw new ContainerError("header must be an object with a 'tensors' list");
  }
  const head = header as { kind?: unknown; metadata?: unknown; payload_sha256?: unknown; tensors: unknown[] };
  if (kind !== undefined && head.kind !== kind) {
    throw new ContainerError(`expected a ${JSON.stringify(kind)} container, got ${JSON.stringify(head.kind)}`);
  }
  const metadata = head.metadata ?? {};
  if (typeof metadata !== "object" || metadata === null || Array.isArray(metadata)) {
    throw new ContainerError("metadata must be an object");
  }
  const payload = data.subarray(20 + h);
  if (sha256Hex(payload) !== head.payload_sha256) {
    throw new ContainerError("payload checksum mismatch: the data is corrupt or truncated");
  }
  const tensors = new Map<string, RawTensor>();
  for (const entry of head.tensors) {
    if (typeof entry !== "object" || entry === null) throw new ContainerError("tensor entry is not an object");
    const { name, dtype, shape, offset, nbytes } = entry as Record<string, unknown>;
    if (typeof name !== "string" || !name) throw new ContainerError("tensor entry has no name");
    if (tensors.has(name)) throw new ContainerError(`tensor ${JSON.stringify(name)} appears twice`);
    if (typeof dtype !== "string" || !(dtype in ITEMSIZE)) {
      throw new ContainerError(`tensor ${JSON.stringify(name)}: dtype ${JSON.stringify(dtype)} is not allowed`);
    }
    if (!Array.isArray(shape) || shape.length > MAX_NDIM || !shape.every(isSize)) {
      throw new ContainerError(
        `tensor ${JSON.stringify(name)}: shape ${JSON.stringify(shape)} is not a list of <= 8 sizes`,
      );
    }
    if (!isSize(offset) || !isSize(nbytes)) {
      throw new ContainerError(`tensor ${JSON.stringify(name)}: offset/nbytes must be non-negative integers`);
    }
    const expected = ITEMSIZE[dtype as DType] * elementCount(shape as number[]);
    if (expected !== nbytes) {
      throw new ContainerError(
        `tensor ${JSON.stringify(name)}: shape ${JSON.stringify(shape)} of ${dtype} needs ${expected} bytes, header says ${nbytes}`,
      );
    }
    if (offset + nbytes > payload.length) {
      throw new ContainerError(
        `tensor ${JSON.stringify(name)}: bytes ${offset}..${offset + nbytes} lie past the payload (${payload.length} bytes)`,
      );
    }
    tensors.set(name, {
      dtype: dtype as DType,
      shape: shape as number[],
      bytes: payload.slice(offset, offset + nbytes),
    });
  }
  return { kind: String(head.kind), metadata: metadata as Record<string, unknown>, tensors };
}

// ------------------------------------------------------------------ typed views (copies, little-endian)

const littleEndian = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** float32 values of a float32 tensor (a fresh, aligned copy). */
export function toFloat32(tensor: RawTensor): Float32Array {
  if (tensor.dtype !== "float32") throw new ContainerError(`expected float32, got ${tensor.dtype}`);
  const copy = tensor.bytes.slice();
  if (!littleEndian) {
    const view = new DataView(copy.buffer);
    const out = new Float32Array(copy.length / 4);
    for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
    return out;
  }
  return new Float32Array(copy.buffer, 0, copy.length / 4);
}

/** The little-endian bytes of a typed array (a copy). */
export function bytesOf(values: Float32Array | Int32Array | Int8Array | Uint16Array): Uint8Array {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength).slice();
  if (!littleEndian && values.BYTES_PER_ELEMENT > 1) {
    const n = values.BYTES_PER_ELEMENT;
    for (let i = 0; i < bytes.length; i += n) bytes.subarray(i, i + n).reverse();
  }
  return bytes;
}
