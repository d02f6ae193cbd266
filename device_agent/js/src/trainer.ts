/**
 * Local training with the served training step (docs/protocol.md, "Training-step download"): one ONNX
 * graph computes a step, inputs = the model's inputs, `label`, every trainable weight by name, the
 * optimizer state and `lr`; outputs = `loss`, `new/<name>`, `new_state/<name>`. The trainer feeds a
 * batch with the current weights and state and keeps what comes out, batch after batch.
 */

import type { Dataset } from "./data.js";
import { seeded, shuffled } from "./data.js";
import type { ModelFile } from "./model.js";
import type { Runtime, SessionLike, TensorLike } from "./runtime.js";

export class TrainingStepError extends Error {
  override name = "TrainingStepError";
}

export class Interrupted extends Error {
  override name = "Interrupted";
}

export interface FitOptions {
  epochs: number;
  batchSize: number;
  lr: number;
  seed: number;
  shouldStop?: () => boolean;
}

export interface FitResult {
  weights: Map<string, Float32Array>;
  firstLoss: number;
  meanLoss: number;
  lastEpochLoss: number;
  steps: number;
}

const size = (dims: readonly number[]): number => dims.reduce((a, b) => a * b, 1);

function floats(tensor: TensorLike | undefined, name: string): Float32Array {
  if (!tensor || !(tensor.data instanceof Float32Array))
    throw new TrainingStepError(`output ${name} is missing or not float32`);
  return tensor.data;
}

export class StepTrainer {
  private constructor(
    private readonly runtime: Runtime,
    private readonly session: SessionLike,
    private readonly model: ModelFile,
    private readonly stateShapes: Map<string, number[]>,
    private readonly labelType: "int64" | "int32",
  ) {}

  /** Load the step graph and check it fits the model: every name the interface promises must be there. */
  static async create(runtime: Runtime, stepBytes: Uint8Array, model: ModelFile): Promise<StepTrainer> {
    const session = await runtime.createSession(stepBytes);
    const inputs = new Set(session.inputNames);
    const outputs = new Set(session.outputNames);
    const dataInputs = model.inputs.map((i) => i.name);
    const missing = [...dataInputs, "label", "lr", ...model.trainable].filter((n) => !inputs.has(n));
    missing.push(...["loss", ...model.trainable.map((n) => `new/${n}`)].filter((n) => !outputs.has(n)));
    if (missing.length)
      throw new TrainingStepError(`the training step does not fit the model: missing ${missing.join(", ")}`);
    const known = new Set([...dataInputs, "label", "lr", ...model.weights.keys()]);
    const metadata = new Map((session.inputMetadata ?? []).map((m) => [m.name, m]));
    const stateShapes = new Map<string, number[]>();
    for (const name of session.inputNames.filter((n) => !known.has(n))) {
      const shape = metadata.get(name)?.shape;
      if (!shape || !shape.every((d) => typeof d === "number")) {
        throw new TrainingStepError(
          `optimizer state input ${name}: its shape is not static (${JSON.stringify(shape)})`,
        );
      }
      if (!outputs.has(`new_state/${name}`))
        throw new TrainingStepError(`optimizer state ${name} has no output new_state/${name}`);
      stateShapes.set(name, shape as number[]);
    }
    const labelType = metadata.get("label")?.type === "int32" ? "int32" : "int64";
    return new StepTrainer(runtime, session, model, stateShapes, labelType);
  }

  /** Train from the model's weights for `epochs` over `data`; state starts at zeros (a fresh optimizer). */
  async fit(data: Dataset, options: FitOptions): Promise<FitResult> {
    const { runtime, model } = this;
    const input = model.inputs[0]!;
    const expected = input.shape.slice(1);
    if (expected.length !== data.itemShape.length || expected.some((d, i) => d !== null && d !== data.itemShape[i])) {
      throw new TrainingStepError(
        `data items have shape [${data.itemShape}], the model's input ${input.name} expects [${expected}]`,
      );
    }
    const weights = new Map(model.trainable.map((n) => [n, model.weights.get(n)!.slice()]));
    const state = new Map([...this.stateShapes].map(([n, dims]) => [n, new Float32Array(size(dims))]));
    const constants: Record<string, TensorLike> = {};
    for (const name of this.session.inputNames) {
      if (!weights.has(name) && model.weights.has(name))
        constants[name] = runtime.tensor("float32", model.weights.get(name)!, model.shapes.get(name)!);
    }
    const lr = runtime.tensor("float32", Float32Array.of(options.lr), []);
    const item = size(data.itemShape);
    const batch = Math.max(1, Math.min(options.batchSize, data.size));
    const random = seeded(options.seed);
    let steps = 0;
    let total = 0;
    let firstLoss = Number.NaN;
    let epochLoss = 0;
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      const order = shuffled(data.size, random);
      epochLoss = 0;
      let epochSteps = 0;
      for (let start = 0; start < data.size; start += batch) {
        if (options.shouldStop?.()) throw new Interrupted(`stopped after ${steps} steps`);
        const picked = order.subarray(start, start + batch);
        const x = new Float32Array(picked.length * item);
        picked.forEach((idx, row) => x.set(data.x.subarray(idx * item, (idx + 1) * item), row * item));
        const feeds: Record<string, TensorLike> = { ...constants, lr };
        feeds[input.name] = runtime.tensor("float32", x, [picked.length, ...data.itemShape]);
        feeds.label =
          this.labelType === "int64"
            ? runtime.tensor(
                "int64",
                BigInt64Array.from(picked, (i) => BigInt(data.y[i]!)),
                [picked.length],
              )
            : runtime.tensor(
                "int32",
                Int32Array.from(picked, (i) => data.y[i]!),
                [picked.length],
              );
        for (const [name, values] of weights) feeds[name] = runtime.tensor("float32", values, model.shapes.get(name)!);
        for (const [name, values] of state)
          feeds[name] = runtime.tensor("float32", values, this.stateShapes.get(name)!);
        const out = await this.session.run(feeds);
        const loss = floats(out.loss, "loss")[0]!;
        if (!Number.isFinite(loss)) throw new TrainingStepError(`training diverged: loss ${loss} at step ${steps}`);
        for (const name of weights.keys()) weights.set(name, floats(out[`new/${name}`], `new/${name}`).slice());
        for (const name of state.keys()) state.set(name, floats(out[`new_state/${name}`], `new_state/${name}`).slice());
        if (steps === 0) firstLoss = loss;
        total += loss;
        epochLoss += loss;
        steps += 1;
        epochSteps += 1;
      }
      epochLoss /= Math.max(1, epochSteps);
    }
    return { weights, firstLoss, meanLoss: total / Math.max(1, steps), lastEpochLoss: epochLoss, steps };
  }

  async release(): Promise<void> {
    await this.session.release?.();
  }
}
