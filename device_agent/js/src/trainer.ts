/**
 * Local training with the served training step (docs/protocol.md, "Training-step download"): one ONNX
 * graph computes one step. Inputs: the model's inputs, `label`, every model tensor the step reads (by its
 * model name), the optimizer state `state/<weight>/<slot>`, `prox_anchor/<weight>` (FedProx: the base
 * weights) and `lr`. Outputs: `loss`, `new/<name>` for every tensor the step changes, and
 * `new_state/<weight>/<slot>`. The trainer feeds a batch with the current tensors and state and keeps what
 * comes out, batch after batch.
 */

import type { Dataset } from "./data.js";
import { seeded, shuffled } from "./data.js";
import type { ModelFile } from "./model.js";
import { onnxMetadata } from "./onnxMetadata.js";
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
  shuffle?: boolean; // default true; false keeps the data order (parity tests)
  shouldStop?: () => boolean;
  onStep?: (loss: number) => void;
}

export interface FitResult {
  weights: Map<string, Float32Array>; // every tensor the step changed, after the last step
  firstLoss: number;
  meanLoss: number;
  lastEpochLoss: number;
  steps: number;
}

const size = (dims: readonly number[]): number => dims.reduce((a, b) => a * b, 1);
const ANCHOR = "prox_anchor/";
const STATE = "state/";

function floats(tensor: TensorLike | undefined, name: string): Float32Array {
  if (!tensor || !(tensor.data instanceof Float32Array)) {
    throw new TrainingStepError(`output ${name} is missing or not float32`);
  }
  return tensor.data;
}

/** How each input of the step graph is fed. */
interface Plan {
  carried: string[]; // model tensors the step changes: fed, then replaced by new/<name>
  constant: Map<string, string>; // input -> model tensor fed unchanged (read-only tensors, FedProx anchors)
  state: Map<string, number[]>; // state/<weight>/<slot> -> static shape, zeros at the start
  masks: Map<string, { p: number; shape: (number | "N")[] }>; // dropout_mask/<k>: drop probability, shape
  labelType: "int64" | "int32";
}

/** The dropout probabilities the step's metadata lists (docs/training-step.md, "Metadata"). */
function dropoutProbabilities(stepBytes: Uint8Array): Map<string, number> {
  const found = new Map<string, number>();
  try {
    const text = onnxMetadata(stepBytes).get("pocketfed.training_step");
    const masks = text ? (JSON.parse(text) as { dropout_masks?: { name?: unknown; p?: unknown }[] }).dropout_masks : [];
    for (const mask of masks ?? []) {
      if (typeof mask.name === "string" && typeof mask.p === "number") found.set(mask.name, mask.p);
    }
  } catch {
    // unreadable metadata: a step that needs masks is refused below, naming the mask
  }
  return found;
}

function plan(session: SessionLike, model: ModelFile, dropout: Map<string, number>): Plan {
  const inputs = new Set(session.inputNames);
  const outputs = new Set(session.outputNames);
  const dataInputs = model.inputs.map((i) => i.name);
  const missing = [...dataInputs, "label", "lr", ...model.trainable].filter((n) => !inputs.has(n));
  missing.push(...["loss", ...model.trainable.map((n) => `new/${n}`)].filter((n) => !outputs.has(n)));
  if (missing.length) {
    throw new TrainingStepError(`the training step does not fit the model: missing ${missing.join(", ")}`);
  }
  const metadata = new Map((session.inputMetadata ?? []).map((m) => [m.name, m]));
  const result: Plan = {
    carried: [],
    constant: new Map(),
    state: new Map(),
    masks: new Map(),
    labelType: metadata.get("label")?.type === "int32" ? "int32" : "int64",
  };
  const labelType = metadata.get("label")?.type;
  if (labelType !== undefined && labelType !== "int64" && labelType !== "int32") {
    throw new TrainingStepError(
      `label of type ${labelType}: only class labels (int64) are supported, not regression targets`,
    );
  }
  for (const name of session.inputNames) {
    if (dataInputs.includes(name) || name === "label" || name === "lr") continue;
    if (model.weights.has(name)) {
      if (outputs.has(`new/${name}`)) result.carried.push(name);
      else result.constant.set(name, name);
    } else if (name.startsWith(ANCHOR) && model.weights.has(name.slice(ANCHOR.length))) {
      result.constant.set(name, name.slice(ANCHOR.length));
    } else if (name.startsWith(STATE)) {
      const shape = metadata.get(name)?.shape;
      if (!shape || !shape.every((d) => typeof d === "number")) {
        throw new TrainingStepError(`optimizer state ${name}: its shape is not static (${JSON.stringify(shape)})`);
      }
      if (!outputs.has(`new_${name}`)) throw new TrainingStepError(`optimizer state ${name} has no output new_${name}`);
      result.state.set(name, shape as number[]);
    } else if (name.startsWith("dropout_mask/")) {
      const p = dropout.get(name);
      const shape = metadata.get(name)?.shape;
      if (p === undefined || !(p >= 0 && p < 1)) {
        throw new TrainingStepError(`dropout mask ${name}: the step's metadata gives no probability p in [0, 1)`);
      }
      if (!shape || !shape.every((d, i) => typeof d === "number" || (i === 0 && d === "N"))) {
        throw new TrainingStepError(`dropout mask ${name}: shape ${JSON.stringify(shape)} is not [N, static sizes]`);
      }
      result.masks.set(name, { p, shape: shape as (number | "N")[] });
    } else {
      throw new TrainingStepError(`the training step reads ${name}, which this agent does not know how to feed`);
    }
  }
  return result;
}

export class StepTrainer {
  private constructor(
    private readonly runtime: Runtime,
    private readonly session: SessionLike,
    private readonly model: ModelFile,
    private readonly plan: Plan,
  ) {}

  /** Load the step graph and check it fits the model: every name the interface promises must be there. */
  static async create(runtime: Runtime, stepBytes: Uint8Array, model: ModelFile): Promise<StepTrainer> {
    let session: SessionLike;
    try {
      session = await runtime.createSession(stepBytes);
    } catch (error) {
      throw new TrainingStepError(`the training step does not load: ${(error as Error).message}`);
    }
    try {
      return new StepTrainer(runtime, session, model, plan(session, model, dropoutProbabilities(stepBytes)));
    } catch (error) {
      await session.release?.();
      throw error;
    }
  }

  /** Whether the step has a FedProx proximal term (it reads `prox_anchor/<weight>` inputs). */
  get proximal(): boolean {
    return [...this.plan.constant.keys()].some((name) => name.startsWith(ANCHOR));
  }

  private labels(picked: Int32Array, data: Dataset): TensorLike {
    const n = [picked.length];
    if (this.plan.labelType === "int32") {
      return this.runtime.tensor(
        "int32",
        Int32Array.from(picked, (i) => data.y[i]!),
        n,
      );
    }
    return this.runtime.tensor(
      "int64",
      BigInt64Array.from(picked, (i) => BigInt(data.y[i]!)),
      n,
    );
  }

  /** Train from the model's weights for `epochs` over `data`; the state starts at zeros (a fresh optimizer). */
  async fit(data: Dataset, options: FitOptions): Promise<FitResult> {
    const { runtime, model } = this;
    const input = model.inputs[0]!;
    const expected = input.shape.slice(1);
    if (expected.length !== data.itemShape.length || expected.some((d, i) => d !== null && d !== data.itemShape[i])) {
      throw new TrainingStepError(
        `data items have shape [${data.itemShape}], the model's input ${input.name} expects [${expected}]`,
      );
    }
    const tensor = (name: string, values: Float32Array) => runtime.tensor("float32", values, model.shapes.get(name)!);
    const weights = new Map<string, Float32Array>(this.plan.carried.map((n) => [n, model.weights.get(n)!.slice()]));
    const state = new Map<string, Float32Array>(
      [...this.plan.state].map(([n, dims]) => [n, new Float32Array(size(dims))]),
    );
    const constants: Record<string, TensorLike> = {
      lr: runtime.tensor("float32", Float32Array.of(options.lr), []),
    };
    for (const [name, source] of this.plan.constant) constants[name] = tensor(source, model.weights.get(source)!);
    const item = size(data.itemShape);
    const batch = Math.max(1, Math.min(options.batchSize, data.size));
    const random = seeded(options.seed);
    let steps = 0;
    let total = 0;
    let firstLoss = Number.NaN;
    let epochLoss = 0;
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      const order =
        options.shuffle === false ? Int32Array.from({ length: data.size }, (_, i) => i) : shuffled(data.size, random);
      let epochTotal = 0;
      let epochSteps = 0;
      for (let start = 0; start < data.size; start += batch) {
        if (options.shouldStop?.()) throw new Interrupted(`stopped after ${steps} steps`);
        const picked = order.subarray(start, start + batch);
        const x = new Float32Array(picked.length * item);
        picked.forEach((idx, row) => x.set(data.x.subarray(idx * item, (idx + 1) * item), row * item));
        const feeds: Record<string, TensorLike> = { ...constants, label: this.labels(picked, data) };
        feeds[input.name] = runtime.tensor("float32", x, [picked.length, ...data.itemShape]);
        for (const [name, values] of weights) feeds[name] = tensor(name, values);
        for (const [name, values] of state) feeds[name] = runtime.tensor("float32", values, this.plan.state.get(name)!);
        for (const [name, { p, shape }] of this.plan.masks) {
          const dims = shape.map((d) => (d === "N" ? picked.length : d));
          const keep = Float32Array.from({ length: size(dims) }, () => (random() >= p ? 1 : 0)); // Bernoulli(1 - p)
          feeds[name] = runtime.tensor("float32", keep, dims);
        }
        const out = await this.session.run(feeds);
        const loss = floats(out.loss, "loss")[0]!;
        if (!Number.isFinite(loss)) throw new TrainingStepError(`training diverged: loss ${loss} at step ${steps}`);
        // each run returns fresh output buffers: keep them as the next step's inputs, no copies
        for (const name of weights.keys()) weights.set(name, floats(out[`new/${name}`], `new/${name}`));
        for (const name of state.keys()) state.set(name, floats(out[`new_${name}`], `new_${name}`));
        options.onStep?.(loss);
        if (steps === 0) firstLoss = loss;
        total += loss;
        epochTotal += loss;
        steps += 1;
        epochSteps += 1;
      }
      epochLoss = epochTotal / Math.max(1, epochSteps);
    }
    return { weights, firstLoss, meanLoss: total / Math.max(1, steps), lastEpochLoss: epochLoss, steps };
  }

  async release(): Promise<void> {
    await this.session.release?.();
  }
}
