import assert from "node:assert/strict";
import { test } from "node:test";

import { CoordinatorClient, DeadlinePassed, RejectedError, UnavailableError } from "../src/client.js";
import { json, serve } from "./server.js";

const RECEIPT = { accepted: true, round_id: 3, received: 1, goal: 2 };

function client(
  url: string,
  sleeps: number[],
  extra: Partial<ConstructorParameters<typeof CoordinatorClient>[1]> = {},
) {
  return new CoordinatorClient(url, {
    token: "tok",
    retry: { attempts: 4, baseDelay: 0.5, maxDelay: 4 },
    sleep: async (s) => {
      sleeps.push(s);
    },
    uniform: () => 0.5,
    ...extra,
  });
}

for (const status of [408, 429, 503]) {
  test(`${status} with Retry-After is retried no sooner than asked (no cap of ours)`, async () => {
    const server = await serve((seen, res, n) =>
      n < 3
        ? json(res, status, { detail: "slow down" }, { "Retry-After": "120" })
        : json(res, 200, { status: "retry", retry_after: 5 }),
    );
    const sleeps: number[] = [];
    try {
      const answer = await client(server.url, sleeps).checkin(10);
      assert.deepEqual(answer, { status: "retry", retryAfter: 5, reason: null });
      assert.equal(server.seen.length, 3);
      assert.deepEqual(sleeps, [126, 126]); // 120 + 0.5 * max(1, 120 / 10)
    } finally {
      await server.close();
    }
  });
}

test("a real wait: the retry after a 503 with Retry-After: 1 arrives at least a second later", async () => {
  const server = await serve((seen, res, n) =>
    n === 1 ? json(res, 503, { detail: "busy" }, { "Retry-After": "1" }) : json(res, 202, RECEIPT),
  );
  try {
    const c = new CoordinatorClient(server.url, { token: "tok" });
    await c.upload(3, Uint8Array.of(1, 2, 3), "key-1");
    assert.equal(server.seen.length, 2);
    assert.ok(server.seen[1]!.at - server.seen[0]!.at >= 1000, `${server.seen[1]!.at - server.seen[0]!.at} ms`);
  } finally {
    await server.close();
  }
});

test("an HTTP-date Retry-After is honoured", async () => {
  const now = 1_800_000_000;
  const server = await serve((seen, res, n) =>
    n === 1
      ? json(res, 429, {}, { "Retry-After": new Date((now + 90) * 1000).toUTCString() })
      : json(res, 200, { status: "retry", retry_after: 1 }),
  );
  const sleeps: number[] = [];
  try {
    await client(server.url, sleeps, { clock: () => now }).checkin(1);
    assert.deepEqual(sleeps, [94.5]);
  } finally {
    await server.close();
  }
});

for (const status of [400, 401, 403, 404, 409, 413, 422, 302]) {
  test(`${status} is never retried and names the reason`, async () => {
    const server = await serve((seen, res) =>
      json(res, status, { detail: "round 7 is closed" }, { Location: "http://elsewhere.test/", "Retry-After": "1" }),
    );
    const sleeps: number[] = [];
    try {
      await assert.rejects(client(server.url, sleeps).upload(7, Uint8Array.of(1), "k"), (error: unknown) => {
        assert.ok(error instanceof RejectedError);
        assert.equal(error.status, status);
        assert.match(error.message, /refused with \d+: round 7 is closed/);
        return true;
      });
      assert.equal(server.seen.length, 1);
      assert.deepEqual(sleeps, []);
    } finally {
      await server.close();
    }
  });
}

test("5xx, timeouts and a hung-up connection are retried with the same key, token and bytes", async () => {
  const server = await serve((seen, res, n) => {
    if (n === 1) return json(res, 500, { detail: "oops" });
    if (n === 2) return void setTimeout(() => json(res, 202, RECEIPT), 1500); // slower than the client's timeout
    if (n === 3) return res.socket?.destroy(); // the answer is lost
    json(res, 202, RECEIPT);
  });
  const sleeps: number[] = [];
  try {
    const receipt = await client(server.url, sleeps, { timeoutSeconds: 0.5 }).upload(
      3,
      Uint8Array.of(9, 8, 7),
      "same-key",
    );
    assert.equal(receipt.received, 1);
    assert.equal(server.seen.length, 4);
    for (const seen of server.seen) {
      assert.equal(seen.headers["idempotency-key"], "same-key");
      assert.equal(seen.headers.authorization, "Bearer tok");
      assert.equal(seen.headers["content-type"], "application/octet-stream");
      assert.deepEqual(Array.from(seen.body), [9, 8, 7]);
    }
    sleeps.forEach((s, attempt) => assert.ok(s <= 0.5 * 2 ** attempt)); // full jitter under the exponential cap
  } finally {
    await server.close();
  }
});

test("exhausted retries report the server's last asked wait", async () => {
  const server = await serve((seen, res) => json(res, 503, { detail: "down" }, { "Retry-After": "300" }));
  try {
    await assert.rejects(
      client(server.url, []).checkin(1),
      (error: unknown) => error instanceof UnavailableError && error.retryAfter === 300,
    );
    assert.equal(server.seen.length, 4);
  } finally {
    await server.close();
  }
});

test("an upload retry past the deadline is dropped unless an earlier attempt went unanswered", async () => {
  const busy = await serve((seen, res) => json(res, 503, {}, { "Retry-After": "60" }));
  try {
    const c = client(busy.url, [], { clock: () => 1000 });
    await assert.rejects(c.upload(1, Uint8Array.of(1), "k", { deadline: 1030 }), DeadlinePassed);
    assert.equal(busy.seen.length, 1);
  } finally {
    await busy.close();
  }
  const lost = await serve((seen, res, n) => (n === 1 ? void res.socket?.destroy() : json(res, 202, RECEIPT)));
  try {
    const c = client(lost.url, [], { clock: () => 2000 }); // already past: only a replay can tell
    assert.equal((await c.upload(1, Uint8Array.of(1), "k", { deadline: 1030 })).accepted, true);
    assert.equal(lost.seen.length, 2);
  } finally {
    await lost.close();
  }
});

test("a conditional download gets 304 and keeps the ETag", async () => {
  const server = await serve((seen, res) => {
    if (seen.headers["if-none-match"] === '"abc"') {
      res.writeHead(304, { ETag: '"abc"' });
      return res.end();
    }
    res.writeHead(200, { ETag: '"abc"', "Content-Type": "application/octet-stream" });
    res.end(Buffer.from("model"));
  });
  try {
    const c = client(server.url, []);
    const first = await c.downloadModel(2);
    assert.equal(new TextDecoder().decode(first.data!), "model");
    assert.deepEqual(await c.downloadModel(2, first.etag), { data: null, etag: '"abc"' });
    assert.equal(server.seen[1]!.path, "/v1/models/2");
  } finally {
    await server.close();
  }
});
