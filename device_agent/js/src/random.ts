/**
 * Randomness the protocol needs: Idempotency-Keys and privacy noise from a cryptographic source
 * (`crypto.getRandomValues`: Node 20, browsers, React Native with react-native-get-random-values),
 * jitter from anything uniform.
 */

export type Uniform = () => number; // uniform in [0, 1)

function cryptoSource(): { getRandomValues<T extends ArrayBufferView>(array: T): T } {
  const source = (globalThis as { crypto?: { getRandomValues?: unknown } }).crypto;
  if (!source || typeof source.getRandomValues !== "function") {
    throw new Error(
      "no crypto.getRandomValues: privacy noise and Idempotency-Keys need a cryptographic random source " +
        "(React Native: import 'react-native-get-random-values' first)",
    );
  }
  return source as { getRandomValues<T extends ArrayBufferView>(array: T): T };
}

/** A uniform number in [0, 1) with 53 random bits from the cryptographic source. */
export const secureUniform: Uniform = () => {
  const words = cryptoSource().getRandomValues(new Uint32Array(2));
  return (words[0]! * 2 ** 21 + (words[1]! >>> 11)) / 2 ** 53;
};

/** 32 lowercase hex digits from the cryptographic source: an Idempotency-Key (docs/protocol.md). */
export function newIdempotencyKey(): string {
  const bytes = cryptoSource().getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** N(0, 1) samples by Box-Muller from a uniform source. */
export function gaussian(uniform: Uniform): () => number {
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const value = spare;
      spare = null;
      return value;
    }
    let u = 0;
    while (u === 0) u = uniform();
    const v = uniform();
    const radius = Math.sqrt(-2 * Math.log(u));
    spare = radius * Math.sin(2 * Math.PI * v);
    return radius * Math.cos(2 * Math.PI * v);
  };
}
