/** The core of the TypeScript agent: everything here runs in Node, a browser or React Native. */

export { Agent, type AgentConfig, type AgentDeps, etagProblem, type RoundRecord, type Verdict } from "./agent.js";
export { CoordinatorClient, CoordinatorError, DeadlinePassed, RejectedError, UnavailableError } from "./client.js";
export { type Container, ContainerError, dumps, loads } from "./container.js";
export { type Dataset, checkDataset } from "./data.js";
export * from "./deltas.js";
export { parseCheckinAnswer, parseTask, ProtocolError, type Task } from "./messages.js";
export { readModel, type ModelFile } from "./model.js";
export { MNIST, NONE, type Preprocessing, PreprocessingError, preprocess, preprocessingOf } from "./preprocessing.js";
export { newIdempotencyKey, secureUniform } from "./random.js";
export { DEFAULT_RETRY, paced, parseRetryAfter, type RetryPolicy } from "./retry.js";
export { ortRuntime, type OrtModule, type Runtime, type SessionLike } from "./runtime.js";
export { sha256, sha256Hex } from "./sha256.js";
export { AgentState } from "./state.js";
export { MemoryStorage, type Storage } from "./storage.js";
export { StepTrainer } from "./trainer.js";
export { checkTransport, TransportError } from "./transport.js";
export { decodeUpdate, encodeUpdate, type Encoding } from "./update.js";
