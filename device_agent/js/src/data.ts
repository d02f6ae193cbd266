/** Local training data as the core sees it: n items of one shape, float32, with integer labels. */

export interface Dataset {
  size: number;
  itemShape: number[];
  x: Float32Array; // size * prod(itemShape), row-major
  y: Int32Array; // class indices
  integerPixels?: boolean; // x holds integer pixels in [0, 255] (a uint8 file): preprocessing divides by 255
}

export function checkDataset(data: Dataset): Dataset {
  const item = data.itemShape.reduce((a, b) => a * b, 1);
  if (data.size < 1) throw new RangeError("the dataset is empty");
  if (data.x.length !== data.size * item) {
    throw new RangeError(
      `x has ${data.x.length} values; ${data.size} items of shape [${data.itemShape}] need ${data.size * item}`,
    );
  }
  if (data.y.length !== data.size) throw new RangeError(`y has ${data.y.length} labels for ${data.size} items`);
  if (!data.x.every(Number.isFinite)) throw new RangeError("x contains NaN or Inf");
  return data;
}

/** A small seeded generator (mulberry32) for the data order: reproducible per round, not for secrets. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

export function shuffled(n: number, random: () => number): Int32Array {
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order;
}
