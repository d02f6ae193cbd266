import assert from "node:assert/strict";
import { mkdtemp, readdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { ServerResponse } from "node:http";
import { test } from "node:test";

import { Agent, type AgentConfig } from "../src/agent.js";
import { CoordinatorClient } from "../src/client.js";
import { loads, toFloat32 } from "../src/container.js";
import { FileStorage } from "../src/node/fileStorage.js";
import { sha256Hex } from "../src/sha256.js";
import { AgentState } from "../src/state.js";
import { MemoryStorage, type Storage } from "../src/storage.js";
import { decodeUpdate } from "../src/update.js";
import { fakeRuntime, STEP_BYTES, tinyData, tinyModel } from "./fakes.js";
import { json, type Seen, serve } from "./server.js";

const MODEL = tinyModel();
const etag = (data: Uint8Array) => `"${sha256Hex(data)}"`;

function task(roundId: number, extra: Record<string, unknown> = {}) {
  return {
    round_id: roundId,
    base_version: 5,
    epochs: 3,
    batch_size: 8,
    lr: 0.5,
    momentum: 0,
    deadline: Date.now() / 1000 + 600,
    encoding: "float32",
    ...extra,
  };
}

type Script = (seen: Seen, res: ServerResponse) => boolean; // true: answered

/** A coordinator that offers `tasks` in order and serves the tiny model and the test step. */
async function coordinator(tasks: object[], script: Script = () => false, model: Uint8Array = MODEL) {
  const uploads: Seen[] = [];
  const server = await serve((seen, res) => {
    if (script(seen, res)) return;
    if (seen.path === "/v1/devices") return json(res, 201, { device_id: "dev", token: "tok" });
    if (seen.headers.authorization !== "Bearer tok") return json(res, 401, { detail: "token" });
    if (seen.path === "/v1/checkin")
      return tasks.length
        ? json(res, 200, { status: "task", task: tasks[0] })
        : json(res, 200, { status: "retry", retry_after: 600 }, { "Retry-After": "600" });
    const file = seen.path === "/v1/models/5" ? model : seen.path === "/v1/models/5/training-step" ? STEP_BYTES : null;
    if (file) {
      const tag = file === model ? etag(MODEL) : etag(STEP_BYTES);
      if (seen.headers["if-none-match"] === tag) {
        res.writeHead(304, { ETag: tag });
        return res.end();
      }
      res.writeHead(200, { ETag: tag, "Content-Type": "application/octet-stream" });
      return res.end(Buffer.from(file));
    }
    if (/^\/v1\/rounds\/\d+\/updates$/.test(seen.path)) {
      uploads.push(seen);
      tasks.shift();
      return json(res, 202, { accepted: true, round_id: Number(seen.path.split("/")[3]), received: 1, goal: 1 });
    }
    json(res, 404, { detail: seen.path });
  });
  return { ...server, uploads };
}

function agent(
  url: string,
  storage: Storage,
  config: Partial<AgentConfig> = {},
  sleeps: number[] = [],
  clock?: () => number,
) {
  const client = new CoordinatorClient(url, {
    retry: { attempts: 2, baseDelay: 0.01, maxDelay: 0.01 },
    sleep: async (s) => void sleeps.push(s),
    uniform: () => 0,
  });
  return new Agent(
    { coordinator: url, enrollmentKey: "k", maxWait: 30, ...config },
    {
      client,
      state: new AgentState(storage),
      data: tinyData(),
      runtime: fakeRuntime(),
      sleep: async (s) => void sleeps.push(s),
      ...(clock ? { clock } : {}),
    },
  );
}

test("a round: enroll, check in, download and verify, train, upload a delta that decodes", async () => {
  const server = await coordinator([task(1), task(2, { encoding: "int8" })]);
  const storage = new MemoryStorage();
  try {
    const records = await agent(server.url, storage, { rounds: 2 }).run();
    assert.deepEqual(
      records.map((r) => r.round),
      [1, 2],
    );
    assert.equal(server.seen.filter((s) => s.path === "/v1/models/5").length, 1); // the second round uses the cache
    const [first, second] = server.uploads.map((u) => decodeUpdate(u.body));
    assert.equal(first!.metadata.sample_count, 24);
    assert.equal(second!.metadata.encoding, "int8");
    const base = toFloat32(loads(MODEL).tensors.get("fc.weight")!);
    const delta = first!.delta.get("fc.weight")!;
    assert.ok(delta.some((v) => v !== 0) && delta.some((v, i) => Math.abs(v) < Math.abs(base[i]!))); // a delta, not weights
    assert.ok((records[0]!.loss_after as number) < (records[0]!.loss_before as number));
    assert.notEqual(server.uploads[0]!.headers["idempotency-key"], server.uploads[1]!.headers["idempotency-key"]);
    assert.equal(await new AgentState(storage).lastRound(), 2);
    assert.equal(await new AgentState(storage).pending(), null);
  } finally {
    await server.close();
  }
});

test("a 429 on check-in is waited out (Retry-After in full, not --max-wait) and the agent carries on", async () => {
  let refusals = 3; // outlasts the client's 2 attempts
  const server = await coordinator([task(1)], (seen, res) => {
    if (seen.path !== "/v1/checkin" || refusals === 0) return false;
    refusals -= 1;
    json(res, 429, { detail: "slow down" }, { "Retry-After": "45" });
    return true;
  });
  const sleeps: number[] = [];
  try {
    const records = await agent(server.url, new MemoryStorage(), { once: true }, sleeps).run();
    assert.equal(records.length, 1);
    assert.deepEqual(sleeps, [45, 45, 45]); // client retry, runner wait, client retry (jitter source fixed at 0)
  } finally {
    await server.close();
  }
});

test("pace steering: a check-in 'retry' of 600 s is waited in full", async () => {
  const server = await coordinator([]);
  const sleeps: number[] = [];
  try {
    const a = agent(server.url, new MemoryStorage(), {}, sleeps);
    await a.ensureEnrolled();
    assert.equal(await a.oneRound(), null);
    assert.deepEqual(sleeps, [600]);
  } finally {
    await server.close();
  }
});

test("a corrupted model is never trained on, cached or uploaded for; the round is not taken again", async () => {
  const tampered = tinyModel(2); // a valid file, but not the one the ETag names
  const server = await coordinator([task(1)], () => false, tampered);
  const storage = new MemoryStorage();
  try {
    const a = agent(server.url, storage);
    await a.ensureEnrolled();
    assert.equal(await a.oneRound(), null);
    assert.equal(await a.oneRound(), null); // offered again: not downloaded again
    assert.equal(server.uploads.length, 0);
    assert.equal(server.seen.filter((s) => s.path === "/v1/models/5").length, 2); // two tries, then dropped
    assert.equal(await new AgentState(storage).cached("model"), null);
    assert.equal(await new AgentState(storage).lastRound(), 1);
  } finally {
    await server.close();
  }
});

test("409 and 422 on upload are not retried: the round is dropped and the agent goes on", async () => {
  const refusals = new Map([
    ["/v1/rounds/1/updates", 409],
    ["/v1/rounds/2/updates", 422],
  ]);
  const tasks = [task(1), task(2), task(3)];
  const server = await coordinator(tasks, (seen, res) => {
    const status = refusals.get(seen.path);
    if (!status) return false;
    tasks.shift();
    json(res, status, { detail: "refused" });
    return true;
  });
  try {
    const records = await agent(server.url, new MemoryStorage(), { once: true }).run();
    assert.deepEqual(
      records.map((r) => r.round),
      [3],
    );
    for (const path of refusals.keys()) assert.equal(server.seen.filter((s) => s.path === path).length, 1);
  } finally {
    await server.close();
  }
});

test("the deadline passing during training drops the round without an upload", async () => {
  const deadline = Date.now() / 1000 + 600;
  const server = await coordinator([task(1, { deadline, epochs: 50 })]);
  let calls = 0;
  const clock = () => (++calls > 5 ? deadline + 1 : deadline - 100); // the deadline passes a few steps in
  const storage = new MemoryStorage();
  try {
    const a = agent(server.url, storage, {}, [], clock);
    await a.ensureEnrolled();
    assert.equal(await a.oneRound(), null);
    assert.equal(server.uploads.length, 0);
    assert.equal(await new AgentState(storage).pending(), null);
    assert.equal(await new AgentState(storage).lastRound(), 1);
  } finally {
    await server.close();
  }
});

test("killed after the upload left: the restarted agent re-sends the same key and bytes (on disk)", async () => {
  let lose = true;
  const server = await coordinator([task(1)], (seen, res) => {
    if (!lose || !seen.path.endsWith("/updates")) return false;
    res.socket?.destroy(); // the server got it; the device never hears back
    return true;
  });
  const dir = await mkdtemp(join(tmpdir(), "pf-agent-js-"));
  try {
    const first = agent(server.url, new FileStorage(dir), { once: true });
    await first.ensureEnrolled();
    await assert.rejects(first.oneRound(), /unavailable after 2 attempts/); // as good as killed
    const pending = await new AgentState(new FileStorage(dir)).pending();
    assert.ok(pending && pending.info.attempted);
    lose = false;
    const records = await agent(server.url, new FileStorage(dir), { once: true }).run(); // a new process
    assert.equal(records[0]!.resumed, true);
    const tries = server.seen.filter((s) => s.path.endsWith("/updates"));
    assert.equal(tries.length, 3);
    assert.equal(new Set(tries.map((t) => t.headers["idempotency-key"])).size, 1);
    assert.equal(new Set(tries.map((t) => sha256Hex(t.body))).size, 1);
    assert.equal(await new AgentState(new FileStorage(dir)).pending(), null);
    assert.deepEqual(
      (await readdir(dir)).filter((f) => f.endsWith(".tmp")),
      [],
    ); // atomic writes leave nothing behind
  } finally {
    await server.close();
  }
});

test("a FedDyn or secure-aggregation task is dropped before any download, never trained as plain FedAvg", async () => {
  for (const extra of [{ feddyn_alpha: 0.01 }, { secure_aggregation: true }]) {
    const server = await coordinator([task(7, extra)]);
    const storage = new MemoryStorage();
    try {
      const a = agent(server.url, storage);
      await a.ensureEnrolled();
      assert.equal(await a.oneRound(), null);
      assert.equal(server.seen.filter((s) => s.path.startsWith("/v1/models")).length, 0);
      assert.equal(server.uploads.length, 0);
      assert.equal(await new AgentState(storage).lastRound(), 7); // not offered to itself again
    } finally {
      await server.close();
    }
  }
});
