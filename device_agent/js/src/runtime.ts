/**
 * The ONNX runtime the trainer runs on, as a parameter: anything shaped like onnxruntime's
 * `InferenceSession` and `Tensor` (onnxruntime-node, onnxruntime-react-native, onnxruntime-web all are).
 * The core never imports a runtime itself; `ortRuntime(ort)` adapts the module an app already ships.
 */

export type TensorType = "float32" | "int64" | "int32";
export type TensorData = Float32Array | BigInt64Array | Int32Array;

export interface TensorLike {
  readonly data: unknown;
  readonly dims: readonly number[];
  readonly type: string;
}

export interface ValueMetadataLike {
  readonly name: string;
  readonly isTensor: boolean;
  readonly type?: string;
  readonly shape?: readonly (number | string)[];
}

export interface SessionLike {
  readonly inputNames: readonly string[];
  readonly outputNames: readonly string[];
  readonly inputMetadata?: readonly ValueMetadataLike[];
  run(feeds: Record<string, TensorLike>): Promise<Record<string, TensorLike>>;
  release?(): Promise<void>;
}

/** What the trainer needs from a runtime: load a graph, make tensors. */
export interface Runtime {
  createSession(model: Uint8Array): Promise<SessionLike>;
  tensor(type: TensorType, data: TensorData, dims: readonly number[]): TensorLike;
}

/** The subset of the `onnxruntime-*` module the adapter uses. */
export interface OrtModule {
  InferenceSession: { create(model: Uint8Array, options?: object): Promise<unknown> };
  Tensor: new (type: TensorType, data: TensorData, dims: readonly number[]) => unknown;
}

/** Adapt an onnxruntime module (`import * as ort from "onnxruntime-node"` or "onnxruntime-react-native"). */
export function ortRuntime(ort: OrtModule, sessionOptions: object = {}): Runtime {
  return {
    createSession: async (model) => (await ort.InferenceSession.create(model, sessionOptions)) as SessionLike,
    tensor: (type, data, dims) => new ort.Tensor(type, data, dims) as TensorLike,
  };
}
