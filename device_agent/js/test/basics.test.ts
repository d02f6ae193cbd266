import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";

import { ContainerError, dumps, loads, toFloat32 } from "../src/container.js";
import { clipByL2, globalL2Norm, quantizeInt8, rint, topkCompress, topkCount } from "../src/deltas.js";
import { fromFloat16Bits, toFloat16Bits } from "../src/float16.js";
import { parseCheckinAnswer, parseTask, ProtocolError } from "../src/messages.js";
import { onnxMetadata } from "../src/onnxMetadata.js";
import { MNIST, NONE, PreprocessingError, preprocess, preprocessingOf } from "../src/preprocessing.js";
import { backoff, DEFAULT_RETRY, MAX_RETRY_AFTER, paced, parseRetryAfter } from "../src/retry.js";
import { sha256Hex } from "../src/sha256.js";
import { decodeUpdate, encodeUpdate } from "../src/update.js";

const bytes = (text: string) => new TextEncoder().encode(text);

test("sha256 matches node:crypto on lengths around every block boundary and in parts", () => {
  for (const n of [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, 100_003]) {
    const data = Uint8Array.from({ length: n }, (_, i) => (i * 31 + 7) & 0xff);
    const expected = createHash("sha256").update(data).digest("hex");
    assert.equal(sha256Hex(data), expected, `length ${n}`);
    const cut = Math.floor(n / 3);
    assert.equal(sha256Hex(data.subarray(0, cut), data.subarray(cut, 2 * cut), data.subarray(2 * cut)), expected);
  }
  assert.equal(sha256Hex(bytes("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
});

test("a container round-trips and its unaligned payload is copied out", () => {
  const values = Float32Array.of(1.5, -2.25, 3e-8);
  const data = dumps(
    [
      ["odd", { dtype: "int8", shape: [3], bytes: Uint8Array.of(1, 2, 3) }],
      ["w", { dtype: "float32", shape: [3, 1], bytes: new Uint8Array(values.buffer) }],
    ],
    { note: "x" },
    "tensors",
  );
  assert.equal(new TextDecoder().decode(data.subarray(0, 8)), "PFTENSOR");
  const back = loads(data, "tensors");
  assert.deepEqual(back.metadata, { note: "x" });
  assert.deepEqual(toFloat32(back.tensors.get("w")!), values); // at payload offset 3: not 4-aligned
  assert.throws(() => loads(data, "update"), /expected a "update" container/);
});

test("the container reader refuses corruption before allocating", () => {
  const good = dumps([["w", { dtype: "float32", shape: [2], bytes: new Uint8Array(8) }]], {}, "tensors");
  const flipped = good.slice();
  flipped[flipped.length - 1]! ^= 1;
  assert.throws(() => loads(flipped), /checksum mismatch/);
  assert.throws(() => loads(good.subarray(0, good.length - 3)), /checksum mismatch/);
  const magic = good.slice();
  magic[0] = 0x51;
  assert.throws(() => loads(magic), /wrong magic/);
  const huge = good.slice();
  new DataView(huge.buffer).setBigUint64(12, 1n << 40n, true);
  assert.throws(() => loads(huge), ContainerError);
  const lying = bytes(`PFTENSOR\x01\x00\x00\x00` + "\x00".repeat(8)); // header length 0: not JSON
  assert.throws(() => loads(lying), /not valid JSON/);
});

test("float16 rounds to nearest even like numpy", () => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [1, 0x3c00],
    [-2, 0xc000],
    [65504, 0x7bff],
    [65520, 0x7c00], // rounds up to infinity
    [0.1, 0x2e66],
    [1 / 3, 0x3555],
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // half of it: ties to even (zero)
    [3 * 2 ** -25, 0x0002], // 1.5 subnormal steps: ties to even (2)
    [1 + 2 ** -11, 0x3c00], // halfway between 1 and the next: even
    [1 + 3 * 2 ** -11, 0x3c02],
  ];
  for (const [value, bits] of cases) assert.equal(toFloat16Bits(value), bits, `${value}`);
  assert.equal(fromFloat16Bits(0x3555), 0.333251953125);
  assert.equal(fromFloat16Bits(0x0001), 2 ** -24);
});

test("int8 quantization rounds half to even and stays within scale / 2", () => {
  assert.deepEqual([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.4, -2.6].map(rint), [0, 2, 2, -0, -2, -2, 2, -3]);
  const x = Float32Array.from({ length: 1000 }, (_, i) => Math.fround(Math.sin(i) * 0.01));
  const { q, scale } = quantizeInt8(x);
  x.forEach((v, i) => assert.ok(Math.abs(v - q[i]! * scale) <= scale / 2 + 1e-12));
  assert.equal(Math.max(...Array.from(q, Math.abs)), 127);
  assert.deepEqual(quantizeInt8(new Float32Array(4)), { q: new Int8Array(4), scale: 0 });
});

test("clipping bounds the global norm; top-k keeps the largest and carries the rest", () => {
  const delta = new Map([
    ["a", Float32Array.of(3, 0)],
    ["b", Float32Array.of(0, 4)],
  ]);
  assert.equal(globalL2Norm(delta), 5);
  const { delta: clipped, norm } = clipByL2(delta, 1);
  assert.equal(norm, 5);
  assert.ok(Math.abs(globalL2Norm(clipped) - 1) < 1e-6);
  assert.equal(topkCount(10, 0.05), 1);
  const big = new Map([["w", Float32Array.of(0.1, -5, 0.2, 3)]]);
  const { sent, residual } = topkCompress(big, 0.5, new Map([["w", Float32Array.of(0, 0, 0, 0.5)]]));
  assert.deepEqual(Array.from(sent.get("w")!), [0, -5, 0, 3.5]);
  assert.deepEqual(Array.from(residual.get("w")!), [Math.fround(0.1), 0, Math.fround(0.2), 0]);
});

test("an update encodes and decodes in every encoding, dense and sparse", () => {
  const shapes = new Map([
    ["w", [2, 3]],
    ["b", [3]],
  ]);
  const delta = new Map([
    ["w", Float32Array.of(0.5, -0.25, 0.125, 1, -1, 0.75)],
    ["b", Float32Array.of(0.01, 0, -0.02)],
  ]);
  for (const encoding of ["float32", "float16", "int8"] as const) {
    for (const topkFraction of [null, 0.5]) {
      const { body, sent } = encodeUpdate(delta, shapes, {
        sampleCount: 7,
        roundId: 2,
        baseVersion: 1,
        encoding,
        topkFraction,
        metrics: { loss: 0.5 },
      });
      const back = decodeUpdate(body);
      assert.equal(back.metadata.sample_count, 7);
      assert.equal(back.metadata.sparse, topkFraction !== null);
      for (const [name, values] of back.delta)
        assert.deepEqual(values, sent.get(name), `${encoding} ${topkFraction} ${name}`);
    }
  }
  assert.throws(
    () =>
      encodeUpdate(new Map([["w", Float32Array.of(Number.NaN)]]), new Map([["w", [1]]]), {
        sampleCount: 1,
        roundId: 0,
        baseVersion: 0,
      }),
    /NaN/,
  );
  assert.throws(
    () =>
      encodeUpdate(new Map([["w", Float32Array.of(7e4)]]), new Map([["w", [1]]]), {
        sampleCount: 1,
        roundId: 0,
        baseVersion: 0,
        encoding: "float16",
      }),
    /float16 range/,
  );
});

test("messages: a task is parsed strictly, unknown fields are ignored", () => {
  const wire = {
    round_id: 4,
    base_version: 2,
    epochs: 1,
    batch_size: 16,
    lr: 0.05,
    momentum: 0,
    deadline: 1e9,
    encoding: "int8",
    future_field: [1],
  };
  const task = parseTask(wire);
  assert.equal(task.encoding, "int8");
  assert.equal(task.clipNorm, null);
  assert.throws(() => parseTask({ ...wire, epochs: 0 }), /epochs: 0 is below 1/);
  assert.throws(() => parseTask({ ...wire, round_id: 1.5 }), /round_id/);
  // an encoding this agent lacks is answered in float32 (docs/protocol.md); a non-string is malformed
  assert.equal(parseTask({ ...wire, encoding: "int4" }).encoding, "float32");
  assert.throws(() => parseTask({ ...wire, encoding: 4 }), ProtocolError);
  assert.throws(() => parseTask({ ...wire, topk_fraction: 2 }), /topk_fraction/);
  const { deadline: _, ...noDeadline } = wire;
  assert.throws(() => parseTask(noDeadline), /deadline: missing/);
  assert.deepEqual(parseCheckinAnswer({ status: "retry", retry_after: 30, reason: "full" }), {
    status: "retry",
    retryAfter: 30,
    reason: "full",
  });
  assert.throws(() => parseCheckinAnswer({ status: "maybe" }), /neither/);
});

test("Retry-After: seconds, HTTP-dates, garbage; paced waits never undercut it", () => {
  const now = 1_800_000_000;
  assert.equal(parseRetryAfter("120", now), 120);
  assert.equal(parseRetryAfter(new Date((now + 90) * 1000).toUTCString(), now), 90);
  assert.equal(parseRetryAfter(new Date((now - 90) * 1000).toUTCString(), now), 0);
  assert.equal(parseRetryAfter("99999999", now), MAX_RETRY_AFTER);
  for (const garbage of [null, "", "soon", "-5", "1.5", "Mon, 99 Foo"])
    assert.equal(parseRetryAfter(garbage, now), null, String(garbage));
  for (const r of [0, 2, 45, 600, 86400]) {
    for (const u of [0, 0.5, 0.999]) {
      const wait = paced(r, () => u);
      assert.ok(wait >= r && wait <= r + Math.max(1, r / 10), `${r} ${u} ${wait}`);
    }
  }
  for (let attempt = 0; attempt < 10; attempt++)
    assert.ok(backoff(DEFAULT_RETRY, attempt, () => 0.999) <= Math.min(30, 0.5 * 2 ** attempt));
});

test("ONNX metadata_props are read from the protobuf bytes, other fields skipped", () => {
  const text = (s: string) => Array.from(new TextEncoder().encode(s));
  const lengthDelimited = (field: number, body: number[]) => [(field << 3) | 2, ...varint(body.length), ...body];
  const varint = (n: number) => {
    const out: number[] = [];
    while (n >= 0x80) {
      out.push((n & 0x7f) | 0x80);
      n = Math.floor(n / 128);
    }
    return [...out, n];
  };
  const entry = (key: string, value: string) => [...lengthDelimited(1, text(key)), ...lengthDelimited(2, text(value))];
  const model = Uint8Array.from([
    ...[1 << 3, ...varint(8)], // ir_version: a varint field
    ...lengthDelimited(7, new Array(300).fill(7)), // a "graph" longer than one length byte
    ...lengthDelimited(14, entry("pocketfed.training_step", '{"dropout_masks": []}')),
    ...[(9 << 3) | 5, 1, 2, 3, 4], // a fixed32 field
    ...lengthDelimited(14, entry("other", "x")),
  ]);
  assert.deepEqual(
    [...onnxMetadata(model)],
    [
      ["pocketfed.training_step", '{"dropout_masks": []}'],
      ["other", "x"],
    ],
  );
  assert.throws(() => onnxMetadata(model.subarray(0, 20)), RangeError);
});

test("preprocessing: the model's record, mnist by default, none for imported ONNX, malformed refused", () => {
  assert.deepEqual(preprocessingOf({}), MNIST);
  assert.deepEqual(preprocessingOf({ source: "onnx" }), NONE);
  const record = { input: "pixels/255", mean: [0.5], std: [0.25], pad: 1 };
  assert.deepEqual(preprocessingOf({ preprocessing: record }), { mean: [0.5], std: [0.25], pad: 1 });
  for (const bad of [
    { ...record, input: "pixels" },
    { ...record, std: [0] },
    { ...record, mean: [0.5, 0.5] },
    { ...record, pad: 65 },
    { ...record, pad: 1.5 },
    "mnist",
  ]) {
    assert.throws(() => preprocessingOf({ preprocessing: bad }), PreprocessingError, JSON.stringify(bad));
  }
  // two 2x2 uint8 images, normalized and padded by 1 -> 4x4, then fed as the model's [4, 4] input
  const data = {
    size: 2,
    itemShape: [1, 2, 2],
    x: Float32Array.of(0, 255, 51, 102, 255, 255, 0, 0),
    y: Int32Array.of(0, 1),
    integerPixels: true,
  };
  const fed = preprocess(data, { mean: [0.5], std: [0.25], pad: 1 }, [null, 4, 4]);
  assert.deepEqual(fed.itemShape, [4, 4]);
  const f = (v: number) => Math.fround(Math.fround(Math.fround(v / 255) - 0.5) / 0.25); // numpy's float32 steps
  const [a, b, c, d] = [f(0), f(255), f(51), f(102)];
  assert.deepEqual(Array.from(fed.x.subarray(0, 16)), [0, 0, 0, 0, 0, a, b, 0, 0, c, d, 0, 0, 0, 0, 0]);
  assert.equal(d, Math.fround(-0.39999998)); // not -0.4: float32 arithmetic, as the Python side computes it
  assert.throws(() => preprocess(data, NONE, [null, 3, 3]), /do not fit the model's input/);
  assert.throws(() => preprocess(data, { mean: [0, 0], std: [1, 1], pad: 0 }, [null, 1, 2, 2]), /2 channel means/);
});
