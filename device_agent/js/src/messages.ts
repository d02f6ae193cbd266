/**
 * The JSON messages of the device protocol (docs/protocol.md; protocol/messages.py): strict about the
 * fields they know (types, ranges), silent about fields they do not, so a newer server can add fields.
 */

import { ENCODINGS, type Encoding } from "./update.js";

export class ProtocolError extends Error {
  override name = "ProtocolError";
}

export interface Task {
  roundId: number;
  baseVersion: number;
  epochs: number;
  batchSize: number;
  lr: number;
  momentum: number;
  deadline: number; // unix seconds, server clock
  fedproxMu: number;
  clipNorm: number | null;
  noiseMultiplier: number;
  encoding: Encoding;
  topkFraction: number | null;
  feddynAlpha: number; // FedDyn's local objective (0: off); this agent does not run it
  secureAggregation: boolean; // masked through /secagg; this agent does not run it
}

export type CheckinAnswer =
  { status: "task"; task: Task } | { status: "retry"; retryAfter: number; reason: string | null };

export interface UploadReceipt {
  accepted: true;
  roundId: number;
  received: number;
  goal: number;
}

type Json = Record<string, unknown>;

function object(value: unknown, what: string): Json {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new ProtocolError(`${what}: expected a JSON object, got ${value === null ? "null" : typeof value}`);
  }
  return value as Json;
}

function number(
  d: Json,
  name: string,
  opts: { optional?: boolean; integer?: boolean; min?: number } = {},
): number | null {
  const value = d[name];
  if (value === undefined || value === null) {
    if (opts.optional) return null;
    throw new ProtocolError(`${name}: missing`);
  }
  if (typeof value !== "number" || !Number.isFinite(value) || (opts.integer && !Number.isInteger(value))) {
    throw new ProtocolError(`${name}: ${JSON.stringify(value)} is not a finite ${opts.integer ? "integer" : "number"}`);
  }
  if (opts.min !== undefined && value < opts.min) throw new ProtocolError(`${name}: ${value} is below ${opts.min}`);
  return value;
}

const required = (d: Json, name: string, opts: { integer?: boolean; min?: number } = {}): number =>
  number(d, name, opts) as number;

export function parseTask(value: unknown): Task {
  const d = object(value, "task");
  const asked = d.encoding ?? "float32";
  if (typeof asked !== "string") {
    throw new ProtocolError(`encoding: ${JSON.stringify(asked)} is not a string`);
  }
  // an encoding this agent lacks (int4): send float32, as docs/protocol.md allows
  const encoding = ENCODINGS.includes(asked as Encoding) ? asked : "float32";
  const topk = number(d, "topk_fraction", { optional: true, min: 0 });
  if (topk !== null && !(topk > 0 && topk <= 1)) throw new ProtocolError(`topk_fraction: ${topk} is not in (0, 1]`);
  return {
    roundId: required(d, "round_id", { integer: true, min: 0 }),
    baseVersion: required(d, "base_version", { integer: true, min: 0 }),
    epochs: required(d, "epochs", { integer: true, min: 1 }),
    batchSize: required(d, "batch_size", { integer: true, min: 1 }),
    lr: required(d, "lr", { min: 0 }),
    momentum: number(d, "momentum", { optional: true, min: 0 }) ?? 0,
    deadline: required(d, "deadline"),
    fedproxMu: number(d, "fedprox_mu", { optional: true, min: 0 }) ?? 0,
    clipNorm: number(d, "clip_norm", { optional: true, min: 0 }) || null,
    noiseMultiplier: number(d, "noise_multiplier", { optional: true, min: 0 }) ?? 0,
    encoding: encoding as Encoding,
    topkFraction: topk,
    feddynAlpha: number(d, "feddyn_alpha", { optional: true, min: 0 }) ?? 0,
    secureAggregation: d.secure_aggregation === true,
  };
}

export function parseCheckinAnswer(value: unknown): CheckinAnswer {
  const d = object(value, "check-in answer");
  if (d.status === "task") return { status: "task", task: parseTask(d.task) };
  if (d.status === "retry") {
    return {
      status: "retry",
      retryAfter: required(d, "retry_after", { integer: true, min: 0 }),
      reason: typeof d.reason === "string" ? d.reason : null,
    };
  }
  throw new ProtocolError(`status: ${JSON.stringify(d.status)} is neither 'task' nor 'retry'`);
}

export function parseUploadReceipt(value: unknown): UploadReceipt {
  const d = object(value, "upload answer");
  if (d.accepted !== true) throw new ProtocolError(`accepted: ${JSON.stringify(d.accepted)} is not true`);
  return {
    accepted: true,
    roundId: required(d, "round_id", { integer: true, min: 0 }),
    received: required(d, "received", { integer: true, min: 0 }),
    goal: required(d, "goal", { integer: true, min: 0 }),
  };
}
