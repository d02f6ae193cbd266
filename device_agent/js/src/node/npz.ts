/**
 * A tiny .npz reader (a zip of .npy files, stored or deflated) for the Node CLI: no dependencies, no
 * pickle (object arrays are refused). Reads `x` (float32/float64/uint8 items) and `y` (integer labels).
 */

import { readFileSync } from "node:fs";
import { inflateRawSync } from "node:zlib";

import type { Dataset } from "../data.js";
import { checkDataset } from "../data.js";

export class NpzError extends Error {
  override name = "NpzError";
}

interface NpyArray {
  descr: string;
  shape: number[];
  data: Uint8Array;
}

/** The files inside a zip archive, by name (central directory first, as the format intends). */
export function unzip(archive: Uint8Array): Map<string, Uint8Array> {
  const view = new DataView(archive.buffer, archive.byteOffset, archive.byteLength);
  let end = -1;
  for (let i = archive.length - 22; i >= Math.max(0, archive.length - 22 - 65535); i--) {
    if (view.getUint32(i, true) === 0x06054b50) {
      end = i;
      break;
    }
  }
  if (end < 0) throw new NpzError("not a zip archive (no end of central directory)");
  const count = view.getUint16(end + 10, true);
  let at = view.getUint32(end + 16, true);
  const files = new Map<string, Uint8Array>();
  for (let n = 0; n < count; n++) {
    if (at + 46 > archive.length || view.getUint32(at, true) !== 0x02014b50)
      throw new NpzError("corrupt central directory");
    const method = view.getUint16(at + 10, true);
    const compressed = view.getUint32(at + 20, true);
    const size = view.getUint32(at + 24, true);
    const nameLength = view.getUint16(at + 28, true);
    const extraLength = view.getUint16(at + 30, true);
    const commentLength = view.getUint16(at + 32, true);
    const local = view.getUint32(at + 42, true);
    const name = new TextDecoder().decode(archive.subarray(at + 46, at + 46 + nameLength));
    if (compressed === 0xffffffff || size === 0xffffffff || local === 0xffffffff)
      throw new NpzError(`${name}: zip64 archives over 4 GiB are not supported`);
    if (local + 30 > archive.length || view.getUint32(local, true) !== 0x04034b50)
      throw new NpzError(`${name}: bad local header`);
    const start = local + 30 + view.getUint16(local + 26, true) + view.getUint16(local + 28, true);
    if (start + compressed > archive.length) throw new NpzError(`${name}: truncated`);
    const raw = archive.subarray(start, start + compressed);
    let data: Uint8Array;
    if (method === 0) data = raw;
    else if (method === 8) data = new Uint8Array(inflateRawSync(raw, { maxOutputLength: size }));
    else throw new NpzError(`${name}: compression method ${method} is not supported (stored or deflate only)`);
    if (data.length !== size) throw new NpzError(`${name}: ${data.length} bytes, the directory says ${size}`);
    files.set(name, data);
    at += 46 + nameLength + extraLength + commentLength;
  }
  return files;
}

/** Parse one .npy file (format 1.0-3.0). */
export function parseNpy(file: Uint8Array, name: string): NpyArray {
  const magic = String.fromCharCode(...file.subarray(0, 6));
  if (magic !== "\x93NUMPY") throw new NpzError(`${name}: not a .npy file`);
  const major = file[6]!;
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const headerStart = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(file.subarray(headerStart, headerStart + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1];
  if (!descr || !fortran || shapeText === undefined)
    throw new NpzError(`${name}: unreadable .npy header ${JSON.stringify(header)}`);
  if (fortran === "True") throw new NpzError(`${name}: Fortran-ordered arrays are not supported`);
  const shape = shapeText
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  return { descr, shape, data: file.subarray(headerStart + headerLength) };
}

const READERS: Record<string, [number, (v: DataView, i: number) => number]> = {
  "<f4": [4, (v, i) => v.getFloat32(i, true)],
  "<f8": [8, (v, i) => v.getFloat64(i, true)],
  "|u1": [1, (v, i) => v.getUint8(i)],
  "|i1": [1, (v, i) => v.getInt8(i)],
  "<i2": [2, (v, i) => v.getInt16(i, true)],
  "<i4": [4, (v, i) => v.getInt32(i, true)],
  "<i8": [8, (v, i) => Number(v.getBigInt64(i, true))],
  "<u2": [2, (v, i) => v.getUint16(i, true)],
};

function values(array: NpyArray, name: string): number[] | Float64Array {
  const reader = READERS[array.descr];
  if (!reader)
    throw new NpzError(`${name}: dtype ${array.descr} is not supported (${Object.keys(READERS).join(", ")})`);
  const [itemsize, read] = reader;
  const count = array.shape.reduce((a, b) => a * b, 1);
  if (array.data.length < count * itemsize)
    throw new NpzError(`${name}: truncated (${array.data.length} bytes for ${count} items)`);
  const view = new DataView(array.data.buffer, array.data.byteOffset, array.data.byteLength);
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) out[i] = read(view, i * itemsize);
  return out;
}

/** A Dataset from a .npz holding `x` (n items) and `y` (n integer labels). */
export function readNpz(path: string): Dataset {
  const files = unzip(new Uint8Array(readFileSync(path)));
  const x = files.get("x.npy");
  const y = files.get("y.npy");
  if (!x || !y) throw new NpzError(`${path}: needs arrays 'x' and 'y'; it holds ${[...files.keys()].join(", ")}`);
  const xs = parseNpy(x, "x");
  const ys = parseNpy(y, "y");
  const labels = values(ys, "y");
  if (!labels.every((v) => Number.isInteger(v) && v >= 0))
    throw new NpzError(`${path}: y must hold non-negative integer labels`);
  return checkDataset({
    size: xs.shape[0] ?? 0,
    itemShape: xs.shape.slice(1),
    x: Float32Array.from(values(xs, "x")),
    y: Int32Array.from(labels),
    integerPixels: !xs.descr.includes("f"),
  });
}
