/**
 * The agent's loop (docs/protocol.md, "Overview"), the same as the Python agent's:
 *
 *   resume an unacknowledged upload (same Idempotency-Key and bytes: it counts once)
 *   loop:
 *     eligible?            else wait our own idle interval
 *     POST /v1/checkin     -> a task, or "come back in R s" (waited in full, plus jitter)
 *     model + step files   cached per version; verified against their ETag (sha256)
 *     train                the served ONNX training step; stop at the deadline
 *     delta -> clip -> noise -> top-k -> encode; persist; upload
 *
 * Temporary refusals never end the loop; only a refused enrollment or check-in (4xx) does.
 */

import { CoordinatorClient, DeadlinePassed, RejectedError, UnavailableError } from "./client.js";
import { ContainerError } from "./container.js";
import type { Dataset } from "./data.js";
import { PreprocessingError, preprocess } from "./preprocessing.js";
import { addGaussianNoise, clipByL2, type Delta, topkCompress } from "./deltas.js";
import { ProtocolError, type Task } from "./messages.js";
import { readModel } from "./model.js";
import { secureUniform, type Uniform } from "./random.js";
import type { Runtime } from "./runtime.js";
import { sha256Hex } from "./sha256.js";
import type { AgentState } from "./state.js";
import { Interrupted, StepTrainer, TrainingStepError } from "./trainer.js";
import { encodeUpdate, UpdateError } from "./update.js";

export interface AgentConfig {
  coordinator: string;
  enrollmentKey: string;
  name?: string | null;
  rounds?: number | null; // null: until stopped
  once?: boolean;
  maxWait?: number; // our own idle interval (s), used only when the server named no wait
  seed?: number;
  rotateTokenDays?: number; // trade the token for a new one this often (0: never)
}

const DAY = 86400;

export interface Verdict {
  ok: boolean;
  reason: string;
}

export type RoundRecord = Record<string, unknown>;

export interface AgentDeps {
  client: CoordinatorClient;
  state: AgentState;
  data: Dataset;
  runtime: Runtime;
  eligible?: () => Promise<Verdict>; // charging, idle, unmetered: the app knows
  sleep?: (seconds: number) => Promise<void>;
  clock?: () => number; // unix seconds
  noise?: Uniform; // the cryptographic source for privacy noise
  log?: (message: string) => void;
  emit?: (record: RoundRecord) => void;
}

class Dropped extends Error {}

/** Why `data` is not the file its ETag names (null when it is). */
export function etagProblem(data: Uint8Array, etag: string | null): string | null {
  const digest = sha256Hex(data);
  const claimed = (etag ?? "").trim().replace(/^W\//, "").replace(/"/g, "").toLowerCase();
  return claimed === digest ? null : `sha256 ${digest.slice(0, 16)}... does not match the ETag ${JSON.stringify(etag)}`;
}

export class Agent {
  private readonly config: Required<AgentConfig>;
  private readonly deps: Required<AgentDeps>;

  constructor(config: AgentConfig, deps: AgentDeps) {
    this.config = { name: null, rounds: null, once: false, maxWait: 30, seed: 0, rotateTokenDays: 30, ...config };
    this.deps = {
      eligible: async () => ({ ok: true, reason: "conditions not checked" }),
      sleep: (s) => new Promise((resolve) => setTimeout(resolve, s * 1000)),
      clock: () => Date.now() / 1000,
      noise: secureUniform,
      log: () => undefined,
      emit: () => undefined,
      ...deps,
    };
  }

  private get client(): CoordinatorClient {
    return this.deps.client;
  }

  private async wait(seconds: number, why: string): Promise<void> {
    const delay = this.client.pacedWait(seconds);
    this.deps.log(`${why}; waiting ${delay.toFixed(1)}s`);
    await this.deps.sleep(delay);
  }

  /** Run rounds until `rounds` tasks were done (one with `once`); returns their records. */
  async run(): Promise<RoundRecord[]> {
    const records: RoundRecord[] = [];
    const target = this.config.once ? 1 : this.config.rounds;
    let reenrolled = false;
    while (target === null || records.length < target) {
      let record: RoundRecord | null;
      try {
        await this.ensureEnrolled();
        record = await this.resumePending();
        if (record === null) record = await this.oneRound();
      } catch (error) {
        if (error instanceof UnavailableError) {
          await this.wait(error.retryAfter ?? this.config.maxWait, error.message);
          continue;
        }
        if (error instanceof ProtocolError) {
          await this.wait(this.config.maxWait, `the coordinator's answer breaks the protocol (${error.message})`);
          continue;
        }
        if (error instanceof RejectedError && error.status === 401 && error.path !== "/v1/devices" && !reenrolled) {
          this.deps.log(`token refused (${error.detail}); enrolling again`);
          await this.deps.state.forgetIdentity();
          this.client.token = null;
          reenrolled = true;
          continue;
        }
        throw error;
      }
      if (record !== null) {
        reenrolled = false;
        records.push(record);
        this.deps.emit(record);
      }
    }
    return records;
  }

  /** A valid token for the client: the saved one, a rotated one when it is `rotateTokenDays` old, or a
   * fresh enrollment. A lost rotation answer ends in a 401 and one new enrollment (run()), never a
   * device locked out for good. */
  async ensureEnrolled(): Promise<void> {
    const now = this.deps.clock();
    const { coordinator, rotateTokenDays } = this.config;
    let identity = await this.deps.state.identity(coordinator);
    if (!identity) {
      const { deviceId, token } = await this.client.enroll(this.config.enrollmentKey, this.config.name);
      identity = { coordinator, deviceId, token, issuedAt: now };
      await this.deps.state.saveIdentity(identity);
      this.deps.log(`enrolled as device ${deviceId}`);
    } else if (typeof identity.issuedAt !== "number") {
      identity = { ...identity, issuedAt: now }; // saved before tokens had an age: its clock starts now
      await this.deps.state.saveIdentity(identity);
    } else if (rotateTokenDays > 0 && now - identity.issuedAt >= rotateTokenDays * DAY) {
      const days = (now - identity.issuedAt) / DAY;
      this.client.token = identity.token;
      const token = await this.client.rotateToken(identity.deviceId);
      identity = { ...identity, token, issuedAt: now };
      await this.deps.state.saveIdentity(identity);
      this.deps.log(`token rotated after ${days.toFixed(0)} days`);
    }
    this.client.token = identity.token;
  }

  /** Check in and, given a task, do it. null: nothing done, look again later. */
  async oneRound(): Promise<RoundRecord | null> {
    const verdict = await this.deps.eligible();
    if (!verdict.ok) {
      await this.wait(this.config.maxWait, `not eligible: ${verdict.reason}`);
      return null;
    }
    const answer = await this.client.checkin(this.deps.data.size);
    if (answer.status === "retry") {
      await this.wait(answer.retryAfter, `no task for us now (${answer.reason ?? "no reason given"})`);
      return null;
    }
    if (answer.task.roundId === (await this.deps.state.lastRound())) {
      await this.wait(this.config.maxWait, `round ${answer.task.roundId} is already done here`);
      return null;
    }
    try {
      return await this.doTask(answer.task);
    } catch (error) {
      if (error instanceof Dropped) return null;
      throw error;
    }
  }

  private async drop(roundId: number, why: string): Promise<never> {
    this.deps.log(`round ${roundId}: ${why}; dropping the round`);
    await this.deps.state.setLastRound(roundId);
    throw new Dropped(why);
  }

  /** A versioned file (model or training step) from the cache, or downloaded and verified. */
  private async file(kind: "model" | "step", task: Task): Promise<Uint8Array> {
    const cached = await this.deps.state.cached(kind);
    if (cached && cached.version === task.baseVersion) return cached.data;
    let etag = cached?.etag ?? null;
    let problem = "not downloaded";
    for (let attempt = 0; attempt < 2; attempt++) {
      let got;
      try {
        got =
          kind === "model"
            ? await this.client.downloadModel(task.baseVersion, etag)
            : await this.client.downloadTrainingStep(task.baseVersion, etag);
        if (got.data === null)
          got =
            kind === "model"
              ? await this.client.downloadModel(task.baseVersion)
              : await this.client.downloadTrainingStep(task.baseVersion);
      } catch (error) {
        if (error instanceof RejectedError)
          return this.drop(task.roundId, `the ${kind} download was refused (${error.message})`);
        throw error;
      }
      const data = got.data ?? new Uint8Array();
      const why = etagProblem(data, got.etag);
      if (why === null) {
        await this.deps.state.saveCached(kind, { version: task.baseVersion, etag: got.etag, data });
        this.deps.log(`downloaded the ${kind} of version ${task.baseVersion} (${data.length} bytes)`);
        return data;
      }
      problem = why;
      this.deps.log(`the ${kind} of version ${task.baseVersion} is corrupted (${why}); discarding it`);
      etag = null;
    }
    return this.drop(task.roundId, `the ${kind} of version ${task.baseVersion} is corrupted: ${problem}`);
  }

  async doTask(task: Task): Promise<RoundRecord | null> {
    const { clock, data, state, log } = this.deps;
    if (task.feddynAlpha > 0) return this.drop(task.roundId, "FedDyn tasks are not implemented in this agent");
    if (task.secureAggregation) return this.drop(task.roundId, "secure aggregation is not implemented in this agent");
    log(`round ${task.roundId}: training on ${data.size} samples from model version ${task.baseVersion}`);
    const modelBytes = await this.file("model", task);
    const stepBytes = await this.file("step", task);
    let model;
    let local: Dataset; // the raw local data as this version is fed (its recorded preprocessing)
    let trainer;
    try {
      model = readModel(modelBytes);
      local = preprocess(data, model.preprocessing, model.inputs[0]!.shape);
      trainer = await StepTrainer.create(this.deps.runtime, stepBytes, model);
    } catch (error) {
      if (error instanceof ContainerError || error instanceof TrainingStepError || error instanceof PreprocessingError)
        return this.drop(task.roundId, error.message);
      throw error;
    }
    if (task.fedproxMu > 0 && !trainer.proximal) {
      log(`round ${task.roundId}: fedprox_mu ${task.fedproxMu} asked, but the served step has no proximal term`);
    }
    let fit;
    try {
      fit = await trainer.fit(local, {
        epochs: task.epochs,
        batchSize: task.batchSize,
        lr: task.lr,
        seed: this.config.seed + task.roundId,
        shouldStop: () => clock() > task.deadline,
      });
    } catch (error) {
      if (error instanceof Interrupted) return this.drop(task.roundId, "the deadline passed during training");
      if (error instanceof TrainingStepError) return this.drop(task.roundId, error.message);
      throw error;
    } finally {
      await trainer.release();
    }
    if (clock() > task.deadline) return this.drop(task.roundId, "the deadline passed before the update was ready");
    let delta: Delta = new Map(
      model.trainable.map((n) => [n, fit.weights.get(n)!.map((v, i) => v - model.weights.get(n)![i]!)]),
    );
    const metrics: Record<string, number> = {
      loss_before: fit.firstLoss,
      train_loss: fit.meanLoss,
      loss_after: fit.lastEpochLoss,
      steps: fit.steps,
    };
    if (task.clipNorm) {
      const clipped = clipByL2(delta, task.clipNorm);
      delta = clipped.delta;
      metrics.delta_norm = clipped.norm;
    }
    if (task.noiseMultiplier > 0)
      delta = addGaussianNoise(delta, task.noiseMultiplier * (task.clipNorm ?? 1), this.deps.noise);
    let residual: Delta | null = null;
    if (task.topkFraction) ({ sent: delta, residual } = topkCompress(delta, task.topkFraction, await state.residual()));
    let encoded;
    try {
      encoded = encodeUpdate(delta, model.shapes, {
        sampleCount: data.size,
        roundId: task.roundId,
        baseVersion: task.baseVersion,
        metrics,
        encoding: task.encoding,
        topkFraction: task.topkFraction,
      });
    } catch (error) {
      if (error instanceof UpdateError) return this.drop(task.roundId, error.message);
      throw error;
    }
    if (residual)
      for (const [name, left] of residual)
        residual.set(
          name,
          left.map((v, i) => v + delta.get(name)![i]! - encoded.sent.get(name)![i]!),
        );
    const rawBytes = 4 * model.trainable.reduce((sum, n) => sum + model.weights.get(n)!.length, 0);
    const record: RoundRecord = {
      round: task.roundId,
      version: task.baseVersion,
      samples: data.size,
      loss_before: fit.firstLoss,
      loss_after: fit.lastEpochLoss,
      steps: fit.steps,
      bytes_sent: encoded.body.length,
      bytes_raw_float32: rawBytes,
      encoding: task.encoding,
      topk_fraction: task.topkFraction,
    };
    await state.savePending(task.roundId, encoded.body, residual, model.shapes, task.deadline, record);
    return this.sendPending();
  }

  /** Upload the persisted update: its record once acknowledged; null when refused (the round is dropped). */
  async sendPending(): Promise<RoundRecord | null> {
    const { state, clock, log } = this.deps;
    const pending = await state.pending();
    if (!pending) return null;
    const { info, body } = pending;
    const unknown = info.attempted; // an earlier run may have sent it: only a replay tells
    if (info.deadline !== null && clock() > info.deadline && !unknown) {
      log(`round ${info.roundId}: the deadline passed before the upload; dropping the round`);
      await state.finishPending(false);
      return null;
    }
    if (!unknown) await state.markPendingAttempted();
    let receipt;
    try {
      receipt = await this.client.upload(info.roundId, body, info.idempotencyKey, {
        deadline: info.deadline,
        outcomeUnknown: unknown,
      });
    } catch (error) {
      if (error instanceof RejectedError || error instanceof DeadlinePassed) {
        log(`round ${info.roundId}: upload refused (${error.message}); dropping the round`);
        await state.finishPending(false);
        return null;
      }
      throw error;
    }
    await state.finishPending(true);
    log(`round ${info.roundId}: update accepted (${receipt.received} of ${receipt.goal} received)`);
    return { ...info.record };
  }

  async resumePending(): Promise<RoundRecord | null> {
    if (!(await this.deps.state.pending())) return null;
    this.deps.log("re-sending the update left pending by an earlier run");
    const record = await this.sendPending();
    return record === null ? null : { ...record, resumed: true };
  }
}
