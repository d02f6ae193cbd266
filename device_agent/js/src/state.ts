/**
 * Everything the agent remembers between runs (docs/protocol.md, "What the device keeps"), over any
 * Storage. A large blob is written before the small JSON record that names its sha256, so a kill between
 * the two leaves a record that does not match and is ignored: never half of one version.
 *
 *   identity.json          {coordinator, deviceId, token, issuedAt}
 *   model.json, model.pfm  the cached base model file: {version, etag, sha256} + bytes
 *   step.json, step.onnx   the cached training step of that version
 *   pending.json, .bin     an update not yet acknowledged: {roundId, idempotencyKey, sha256, deadline, attempted, record}
 *   pending-residual.pft   the top-k residual to adopt once it is acknowledged
 *   residual.pft           the adopted top-k residual (container kind "residual")
 *   progress.json          {lastRound}: the last round finished (uploaded, refused or dropped)
 */

import { dumps, loads, type RawTensor, toFloat32, bytesOf } from "./container.js";
import type { Delta } from "./deltas.js";
import { newIdempotencyKey } from "./random.js";
import { sha256Hex } from "./sha256.js";
import type { Storage } from "./storage.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

export interface Identity {
  coordinator: string;
  deviceId: string;
  token: string;
  issuedAt?: number; // unix seconds the token was issued (absent: saved before tokens had an age)
}

export interface CachedFile {
  version: number;
  etag: string | null;
  data: Uint8Array;
}

export interface Pending {
  roundId: number;
  idempotencyKey: string;
  sha256: string;
  deadline: number | null;
  attempted: boolean;
  record: Record<string, unknown>;
}

export class AgentState {
  constructor(readonly storage: Storage) {}

  private async readJson<T>(key: string): Promise<T | null> {
    const bytes = await this.storage.read(key);
    if (!bytes) return null;
    try {
      return JSON.parse(decoder.decode(bytes)) as T;
    } catch {
      return null; // unreadable: treated as never written
    }
  }

  private writeJson(key: string, value: unknown): Promise<void> {
    return this.storage.write(key, encoder.encode(JSON.stringify(value)));
  }

  // ------------------------------------------------------------------ identity

  async identity(coordinator: string): Promise<Identity | null> {
    const found = await this.readJson<Identity>("identity.json");
    return found && found.coordinator === coordinator && found.token ? found : null;
  }

  saveIdentity(identity: Identity): Promise<void> {
    return this.writeJson("identity.json", identity);
  }

  forgetIdentity(): Promise<void> {
    return this.storage.remove("identity.json");
  }

  // ------------------------------------------------------------------ cached, verified files

  async cached(kind: "model" | "step"): Promise<CachedFile | null> {
    const info = await this.readJson<{ version: number; etag: string | null; sha256: string }>(`${kind}.json`);
    if (!info) return null;
    const data = await this.storage.read(kind === "model" ? "model.pfm" : "step.onnx");
    if (!data || sha256Hex(data) !== info.sha256) return null; // killed between the two writes
    return { version: info.version, etag: info.etag, data };
  }

  async saveCached(kind: "model" | "step", file: CachedFile): Promise<void> {
    await this.storage.write(kind === "model" ? "model.pfm" : "step.onnx", file.data);
    await this.writeJson(`${kind}.json`, { version: file.version, etag: file.etag, sha256: sha256Hex(file.data) });
  }

  // ------------------------------------------------------------------ the pending upload

  /** Persist an update before its first attempt; returns its Idempotency-Key (new, random). */
  async savePending(
    roundId: number,
    body: Uint8Array,
    residual: Delta | null,
    shapes: Map<string, number[]>,
    deadline: number | null,
    record: Record<string, unknown>,
  ): Promise<string> {
    const key = newIdempotencyKey();
    if (residual) await this.storage.write("pending-residual.pft", encodeTensors(residual, shapes, "residual"));
    else await this.storage.remove("pending-residual.pft");
    await this.storage.write("pending.bin", body);
    const info: Pending = { roundId, idempotencyKey: key, sha256: sha256Hex(body), deadline, attempted: false, record };
    await this.writeJson("pending.json", info);
    return key;
  }

  async pending(): Promise<{ info: Pending; body: Uint8Array } | null> {
    const info = await this.readJson<Pending>("pending.json");
    if (!info) return null;
    const body = await this.storage.read("pending.bin");
    if (!body || sha256Hex(body) !== info.sha256) return null;
    return { info, body };
  }

  /** Record, before the first send, that the server may hold this update from now on. */
  async markPendingAttempted(): Promise<void> {
    const info = await this.readJson<Pending>("pending.json");
    if (info && !info.attempted) await this.writeJson("pending.json", { ...info, attempted: true });
  }

  /** Acknowledged: adopt the staged residual. Either way the round is finished and the pending update gone. */
  async finishPending(acknowledged: boolean): Promise<void> {
    const staged = await this.storage.read("pending-residual.pft");
    if (acknowledged && staged) await this.storage.write("residual.pft", staged);
    await this.storage.remove("pending-residual.pft");
    const info = await this.readJson<Pending>("pending.json");
    if (info) await this.setLastRound(info.roundId); // first: a kill after this line loses nothing
    await this.storage.remove("pending.json");
    await this.storage.remove("pending.bin");
  }

  // ------------------------------------------------------------------ progress and residual

  async lastRound(): Promise<number | null> {
    const progress = await this.readJson<{ lastRound?: number }>("progress.json");
    return typeof progress?.lastRound === "number" ? progress.lastRound : null;
  }

  setLastRound(roundId: number): Promise<void> {
    return this.writeJson("progress.json", { lastRound: roundId });
  }

  async residual(): Promise<Delta> {
    const bytes = await this.storage.read("residual.pft");
    if (!bytes) return new Map();
    try {
      const container = loads(bytes, "residual");
      return new Map([...container.tensors].map(([name, tensor]) => [name, toFloat32(tensor)]));
    } catch {
      return new Map();
    }
  }
}

function encodeTensors(delta: Delta, shapes: Map<string, number[]>, kind: string): Uint8Array {
  const tensors: [string, RawTensor][] = [...delta].map(([name, values]) => [
    name,
    { dtype: "float32", shape: shapes.get(name) ?? [values.length], bytes: bytesOf(values) },
  ]);
  return dumps(tensors, {}, kind);
}
