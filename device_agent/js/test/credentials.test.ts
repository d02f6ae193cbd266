import assert from "node:assert/strict";
import { mkdtemp, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { Agent } from "../src/agent.js";
import { CoordinatorClient } from "../src/client.js";
import { EnrollmentKeyError, resolveEnrollmentKey } from "../src/node/enrollmentKey.js";
import { AgentState } from "../src/state.js";
import { MemoryStorage } from "../src/storage.js";
import { checkTransport, TransportError } from "../src/transport.js";
import { fakeRuntime, tinyData } from "./fakes.js";
import { json, serve } from "./server.js";

const DAY = 86400;

test("plain http:// only to this machine unless --insecure; https:// anywhere", () => {
  for (const url of ["http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "https://fl.example.com"])
    checkTransport(url, false);
  assert.throws(() => checkTransport("http://10.0.0.5:8000", false), TransportError);
  assert.throws(() => checkTransport("http://fl.example.com", false), /in the clear/);
  checkTransport("http://10.0.0.5:8000", true);
  assert.throws(() => checkTransport("ftp://127.0.0.1", true), /http:\/\/ or https:\/\//);
  assert.throws(() => checkTransport("not a url", true), /not a URL/);
});

test("the enrollment key comes from the flag, then the file, then PF_ENROLLMENT_KEY", async () => {
  const dir = await mkdtemp(join(tmpdir(), "pf-key-"));
  const file = join(dir, "key");
  await writeFile(file, "from-file\n");
  assert.equal(resolveEnrollmentKey("from-flag", file, { PF_ENROLLMENT_KEY: "env" }), "from-flag");
  assert.equal(resolveEnrollmentKey(undefined, file, { PF_ENROLLMENT_KEY: "env" }), "from-file");
  assert.equal(resolveEnrollmentKey(undefined, undefined, { PF_ENROLLMENT_KEY: " env " }), "env");
  assert.throws(() => resolveEnrollmentKey(undefined, undefined, {}), EnrollmentKeyError);
  await writeFile(file, "  \n");
  assert.throws(() => resolveEnrollmentKey(undefined, file, {}), /the file is empty/);
  assert.throws(() => resolveEnrollmentKey(undefined, join(dir, "missing"), {}), /--enrollment-key-file/);
});

async function rotatingCoordinator() {
  let current = "tok";
  const server = await serve((seen, res) => {
    if (seen.path === "/v1/devices") return json(res, 201, { device_id: "dev", token: "tok" });
    if (seen.headers.authorization !== `Bearer ${current}`) return json(res, 401, { detail: "token" });
    if (seen.method === "POST" && seen.path === "/v1/devices/dev/token") {
      current = `${current}+`;
      return json(res, 200, { device_id: "dev", token: current });
    }
    json(res, 200, { status: "retry", retry_after: 1 }, { "Retry-After": "1" });
  });
  return server;
}

function agentAt(url: string, storage: MemoryStorage, now: () => number, rotateTokenDays?: number) {
  const client = new CoordinatorClient(url, { retry: { attempts: 1, baseDelay: 0, maxDelay: 0 } });
  const config = {
    coordinator: url,
    enrollmentKey: "k",
    ...(rotateTokenDays === undefined ? {} : { rotateTokenDays }),
  };
  const agent = new Agent(config, {
    client,
    state: new AgentState(storage),
    data: tinyData(),
    runtime: fakeRuntime(),
    clock: now,
  });
  return { agent, client };
}

test("a token 30 days old is traded for a new one, presenting the old one, and the new one is saved", async () => {
  const server = await rotatingCoordinator();
  const storage = new MemoryStorage();
  let now = 1000;
  try {
    const { agent, client } = agentAt(server.url, storage, () => now);
    await agent.ensureEnrolled();
    assert.deepEqual(await new AgentState(storage).identity(server.url), {
      coordinator: server.url,
      deviceId: "dev",
      token: "tok",
      issuedAt: 1000,
    });
    now += 29 * DAY;
    await agent.ensureEnrolled(); // not due yet
    assert.equal(server.seen.filter((s) => s.path.endsWith("/token")).length, 0);
    now += DAY;
    await agent.ensureEnrolled();
    const rotations = server.seen.filter((s) => s.path === "/v1/devices/dev/token");
    assert.equal(rotations.length, 1);
    assert.equal(rotations[0]!.headers.authorization, "Bearer tok"); // presented the old token to get the new
    assert.equal(client.token, "tok+");
    const saved = await new AgentState(storage).identity(server.url);
    assert.equal(saved!.token, "tok+");
    assert.equal(saved!.issuedAt, 1000 + 30 * DAY);
  } finally {
    await server.close();
  }
});

test("rotateTokenDays 0 never rotates; an identity without an age starts its clock", async () => {
  const server = await rotatingCoordinator();
  const storage = new MemoryStorage();
  try {
    await new AgentState(storage).saveIdentity({ coordinator: server.url, deviceId: "dev", token: "tok" });
    const { agent } = agentAt(server.url, storage, () => 5000 * DAY, 0);
    await agent.ensureEnrolled();
    assert.equal((await new AgentState(storage).identity(server.url))!.issuedAt, 5000 * DAY);
    const later = agentAt(server.url, storage, () => 9000 * DAY, 0).agent;
    await later.ensureEnrolled();
    assert.equal(server.seen.length, 0); // neither enrolled again nor rotated
  } finally {
    await server.close();
  }
});
