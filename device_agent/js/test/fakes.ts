/**
 * Test doubles for the agent loop: a tiny model file (softmax regression) and a runtime whose "session"
 * runs one real SGD step of that model in plain TypeScript, with the training-step interface of
 * docs/protocol.md (inputs x, label, lr, weights, state/<w>/<slot>; outputs loss, new/<w>, new_state/<w>/<slot>).
 * They exist only to test the loop; the agent itself trains with the ONNX step the coordinator serves.
 */

import { bytesOf, dumps } from "../src/container.js";
import type { Dataset } from "../src/data.js";
import type { Runtime, SessionLike, TensorData, TensorLike, TensorType } from "../src/runtime.js";

export const FEATURES = 4;
export const CLASSES = 3;

export function tinyModel(seed = 1): Uint8Array {
  const w = Float32Array.from({ length: FEATURES * CLASSES }, (_, i) => Math.fround(Math.sin(seed + i) * 0.1));
  const b = new Float32Array(CLASSES);
  return dumps(
    [
      ["fc.weight", { dtype: "float32", shape: [FEATURES, CLASSES], bytes: bytesOf(w) }],
      ["fc.bias", { dtype: "float32", shape: [CLASSES], bytes: bytesOf(b) }],
    ],
    {
      format: "pocketfed-model",
      format_version: 1,
      trainable: ["fc.weight", "fc.bias"],
      inputs: [{ name: "x", shape: [null, FEATURES], dtype: "float32" }],
    },
    "model",
  );
}

export function tinyData(n = 24): Dataset {
  const x = new Float32Array(n * FEATURES);
  const y = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    y[i] = i % CLASSES;
    for (let f = 0; f < FEATURES; f++) x[i * FEATURES + f] = (f === y[i] ? 1 : 0) + 0.1 * Math.cos(i + f);
  }
  return { size: n, itemShape: [FEATURES], x, y };
}

export const STEP_BYTES = new TextEncoder().encode("softmax-regression step (test double)");

class SoftmaxStep implements SessionLike {
  readonly inputNames = [
    "x",
    "label",
    "lr",
    "fc.weight",
    "fc.bias",
    "state/fc.weight/velocity",
    "state/fc.bias/velocity",
  ];
  readonly outputNames = [
    "loss",
    "new/fc.weight",
    "new/fc.bias",
    "new_state/fc.weight/velocity",
    "new_state/fc.bias/velocity",
  ];
  readonly inputMetadata = this.inputNames.map((name) => ({
    name,
    isTensor: true,
    type: name === "label" ? "int64" : "float32",
    shape: name.includes("fc.weight") ? [FEATURES, CLASSES] : name.includes("fc.bias") ? [CLASSES] : ["batch"],
  }));
  runs = 0;

  constructor(readonly momentum: number) {}

  async run(feeds: Record<string, TensorLike>): Promise<Record<string, TensorLike>> {
    this.runs += 1;
    const x = feeds.x!.data as Float32Array;
    const label = feeds.label!.data as BigInt64Array;
    const lr = (feeds.lr!.data as Float32Array)[0]!;
    const w = feeds["fc.weight"]!.data as Float32Array;
    const b = feeds["fc.bias"]!.data as Float32Array;
    const vw = (feeds["state/fc.weight/velocity"]!.data as Float32Array).slice();
    const vb = (feeds["state/fc.bias/velocity"]!.data as Float32Array).slice();
    const n = label.length;
    const gw = new Float64Array(w.length);
    const gb = new Float64Array(b.length);
    let loss = 0;
    for (let i = 0; i < n; i++) {
      const logits = Array.from(
        { length: CLASSES },
        (_, c) =>
          b[c]! +
          Array.from({ length: FEATURES }, (_, f) => x[i * FEATURES + f]! * w[f * CLASSES + c]!).reduce(
            (s, v) => s + v,
            0,
          ),
      );
      const top = Math.max(...logits);
      const exp = logits.map((v) => Math.exp(v - top));
      const sum = exp.reduce((s, v) => s + v, 0);
      const target = Number(label[i]);
      loss -= Math.log(exp[target]! / sum) / n;
      for (let c = 0; c < CLASSES; c++) {
        const d = (exp[c]! / sum - (c === target ? 1 : 0)) / n;
        gb[c]! += d;
        for (let f = 0; f < FEATURES; f++) gw[f * CLASSES + c]! += x[i * FEATURES + f]! * d;
      }
    }
    const step = (weights: Float32Array, velocity: Float32Array, grad: Float64Array) => {
      velocity.forEach((v, i) => (velocity[i] = this.momentum * v + grad[i]!));
      return weights.map((v, i) => v - lr * velocity[i]!);
    };
    const tensor = (data: Float32Array, dims: number[]): TensorLike => ({ data, dims, type: "float32" });
    return {
      loss: tensor(Float32Array.of(loss), []),
      "new/fc.weight": tensor(step(w, vw, gw), [FEATURES, CLASSES]),
      "new/fc.bias": tensor(step(b, vb, gb), [CLASSES]),
      "new_state/fc.weight/velocity": tensor(vw, [FEATURES, CLASSES]),
      "new_state/fc.bias/velocity": tensor(vb, [CLASSES]),
    };
  }
}

export function fakeRuntime(momentum = 0): Runtime & { sessions: SoftmaxStep[] } {
  const sessions: SoftmaxStep[] = [];
  return {
    sessions,
    async createSession(model: Uint8Array) {
      if (new TextDecoder().decode(model) !== new TextDecoder().decode(STEP_BYTES))
        throw new Error("not the test step");
      const session = new SoftmaxStep(momentum);
      sessions.push(session);
      return session;
    },
    tensor: (type: TensorType, data: TensorData, dims: readonly number[]): TensorLike => ({ type, data, dims }),
  };
}
