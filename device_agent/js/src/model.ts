/**
 * What the agent needs from a pocketfed model file (docs/model-format.md): its trainable weight names,
 * their starting values and shapes, and its inputs. It never rebuilds the graph: training runs the
 * served ONNX training step, and the file's integrity is its sha256 (the ETag), checked on download.
 */

import { ContainerError, loads, type RawTensor, toFloat32 } from "./container.js";
import { type Preprocessing, PreprocessingError, preprocessingOf } from "./preprocessing.js";

export interface ModelInput {
  name: string;
  shape: (number | null)[];
  dtype: string;
}

export interface ModelFile {
  trainable: string[];
  weights: Map<string, Float32Array>; // every float32 tensor of the file, trainable or not
  shapes: Map<string, number[]>;
  inputs: ModelInput[];
  preprocessing: Preprocessing; // what the model is fed: applied to the raw local data
}

export function readModel(data: Uint8Array): ModelFile {
  const container = loads(data, "model");
  const meta = container.metadata;
  if (meta.format !== "pocketfed-model" || meta.format_version !== 1) {
    throw new ContainerError(
      `not a pocketfed model file of format version 1 (${String(meta.format)} ${String(meta.format_version)})`,
    );
  }
  const trainable = meta.trainable;
  if (!Array.isArray(trainable) || !trainable.every((n) => typeof n === "string" && container.tensors.has(n))) {
    throw new ContainerError("model metadata: 'trainable' must list tensors of the file");
  }
  const inputs = meta.inputs;
  if (!Array.isArray(inputs) || inputs.length === 0) throw new ContainerError("model metadata: 'inputs' is missing");
  const weights = new Map<string, Float32Array>();
  const shapes = new Map<string, number[]>();
  container.tensors.forEach((tensor: RawTensor, name: string) => {
    if (tensor.dtype !== "float32") return;
    weights.set(name, toFloat32(tensor));
    shapes.set(name, tensor.shape);
  });
  for (const name of trainable as string[]) {
    if (!weights.has(name)) throw new ContainerError(`trainable tensor ${name} is not float32`);
  }
  let preprocessing;
  try {
    preprocessing = preprocessingOf(meta);
  } catch (error) {
    if (error instanceof PreprocessingError) throw new ContainerError(error.message);
    throw error;
  }
  return { trainable: trainable as string[], weights, shapes, inputs: inputs as ModelInput[], preprocessing };
}
