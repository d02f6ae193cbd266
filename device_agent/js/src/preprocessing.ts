/**
 * The input preprocessing a model records in its metadata (engine/data/preprocessing.py, key
 * "preprocessing"): pixels scaled to [0, 1] (integer pixels, e.g. a uint8 .npz, are divided by 255;
 * float pixels are taken as already in [0, 1]), minus a per-channel mean, over a per-channel std,
 * zero-padded by `pad` pixels on each side, then reshaped to the model's input (a (1, 28, 28) image
 * as 28 steps of 28 features). Local data stays raw; the agent applies the model's own record, so
 * every device feeds a version what it was trained on. Arithmetic in float32, as numpy does.
 */

import type { Dataset } from "./data.js";

export interface Preprocessing {
  mean: number[]; // empty: no normalization
  std: number[];
  pad: number;
}

export const NONE: Preprocessing = { mean: [], std: [], pad: 0 };
export const MNIST: Preprocessing = { mean: [0.1307], std: [0.3081], pad: 0 }; // engine/data/mnist.py
const MAX_PAD = 64;
const MAX_CHANNELS = 64;

export class PreprocessingError extends Error {
  override name = "PreprocessingError";
}

/** A model's record; without one, `none` for an imported ONNX model and `mnist` for a pocketfed file
 * from before models recorded it (engine.data.preprocessing_for). A malformed record is an error. */
export function preprocessingOf(metadata: Record<string, unknown>): Preprocessing {
  const record = metadata.preprocessing;
  if (record === undefined) return metadata.source === "onnx" ? NONE : MNIST;
  const r = record as { input?: unknown; mean?: unknown; std?: unknown; pad?: unknown };
  const numbers = (v: unknown): v is number[] => Array.isArray(v) && v.every((n) => typeof n === "number");
  const pad = r.pad ?? 0;
  if (
    typeof record !== "object" ||
    record === null ||
    r.input !== "pixels/255" ||
    !numbers(r.mean) ||
    !numbers(r.std) ||
    r.mean.length !== r.std.length ||
    r.mean.length > MAX_CHANNELS ||
    !r.mean.every(Number.isFinite) ||
    !r.std.every((s) => Number.isFinite(s) && s > 0) ||
    typeof pad !== "number" ||
    !Number.isInteger(pad) ||
    pad < 0 ||
    pad > MAX_PAD
  ) {
    throw new PreprocessingError(`model metadata: preprocessing record ${JSON.stringify(record)} is not understood`);
  }
  return { mean: r.mean, std: r.std, pad };
}

/** `data` as the model's float32 input of shape `inputShape` ([batch, ...item]). */
export function preprocess(data: Dataset, prep: Preprocessing, inputShape: (number | null)[]): Dataset {
  const shape = data.itemShape;
  const item = shape.reduce((a, b) => a * b, 1);
  const channels = shape.length === 3 ? shape[0]! : 1;
  if (prep.mean.length > 1 && (shape.length !== 3 || prep.mean.length !== channels)) {
    throw new PreprocessingError(`preprocessing: ${prep.mean.length} channel means for items of shape [${shape}]`);
  }
  if (prep.pad && shape.length < 2) throw new PreprocessingError(`preprocessing: cannot pad items of shape [${shape}]`);
  const mean = prep.mean.map(Math.fround);
  const std = prep.std.map(Math.fround);
  const plane = shape.length === 3 ? item / channels : item;
  const [h, w] = shape.length >= 2 ? shape.slice(-2) : [1, item];
  const p = prep.pad;
  const outShape = p ? [...shape.slice(0, -2), h! + 2 * p, w! + 2 * p] : shape;
  const outItem = outShape.reduce((a, b) => a * b, 1);
  const x = new Float32Array(data.size * outItem);
  const scale = Math.fround(255);
  for (let n = 0; n < data.size; n++) {
    for (let i = 0; i < item; i++) {
      let v = data.x[n * item + i]!;
      if (data.integerPixels) v = Math.fround(v / scale);
      if (mean.length) {
        const c = mean.length === 1 ? 0 : Math.floor(i / plane);
        v = Math.fround(Math.fround(v - mean[c]!) / std[c]!);
      }
      if (!p) {
        x[n * outItem + i] = v;
        continue;
      }
      const lead = Math.floor(i / (h! * w!));
      const row = Math.floor(i / w!) % h!;
      const col = i % w!;
      x[n * outItem + lead * (h! + 2 * p) * (w! + 2 * p) + (row + p) * (w! + 2 * p) + col + p] = v;
    }
  }
  const expected = inputShape.slice(1);
  let itemShape = outShape;
  if (expected.length !== outShape.length || expected.some((d, i) => d !== null && d !== outShape[i])) {
    if (expected.some((d) => d === null) || expected.reduce<number>((a, b) => a * b!, 1) !== outItem) {
      throw new PreprocessingError(`data items of shape [${outShape}] do not fit the model's input [${expected}]`);
    }
    itemShape = expected as number[];
  }
  return { size: data.size, itemShape, x, y: data.y };
}
