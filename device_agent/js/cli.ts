#!/usr/bin/env node
/**
 * node dist/cli.js run --coordinator URL --data FILE.npz --state-dir DIR
 *                      [--enrollment-key-file FILE | --enrollment-key K | PF_ENROLLMENT_KEY=K] [--insecure]
 *                      [--once | --rounds N] [--name NAME] [--max-wait S] [--timeout S] [--retries N] [--seed S]
 *                      [--rotate-token-days D] [--json]
 *
 * The Node host of the core: onnxruntime-node as the runtime, a directory as the storage, a .npz file
 * as the data. Conditions (charging, idle, unmetered) are the host app's business; this CLI trains
 * whenever it is run (like pf-agent --ignore-conditions).
 */

import { parseArgs } from "node:util";

import { Agent } from "./src/agent.js";
import { CoordinatorClient, RejectedError } from "./src/client.js";
import { FileStorage } from "./src/node/fileStorage.js";
import { EnrollmentKeyError, resolveEnrollmentKey } from "./src/node/enrollmentKey.js";
import { NpzError, readNpz } from "./src/node/npz.js";
import { DEFAULT_RETRY } from "./src/retry.js";
import { ortRuntime, type OrtModule } from "./src/runtime.js";
import { AgentState } from "./src/state.js";
import { checkTransport, TransportError } from "./src/transport.js";

const USAGE = `usage: node dist/cli.js run --coordinator URL --data FILE.npz --state-dir DIR
       [--enrollment-key-file FILE | --enrollment-key KEY | PF_ENROLLMENT_KEY=KEY] [--insecure]
       [--once | --rounds N] [--name NAME] [--max-wait S] [--timeout S] [--retries N] [--seed S]
       [--rotate-token-days D] [--json]`;

function fail(message: string): never {
  process.stderr.write(`pf-agent-js: ${message}\n${USAGE}\n`);
  process.exit(2);
}

function log(message: string): void {
  process.stderr.write(`${new Date().toISOString()} pf-agent-js ${message}\n`);
}

function positive(value: string | undefined, name: string, fallback: number, integer = false): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (integer && !Number.isInteger(n)))
    fail(`--${name} must be a non-negative ${integer ? "integer" : "number"}`);
  return n;
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      coordinator: { type: "string" },
      data: { type: "string" },
      "state-dir": { type: "string" },
      "enrollment-key": { type: "string" },
      "enrollment-key-file": { type: "string" },
      insecure: { type: "boolean", default: false },
      "rotate-token-days": { type: "string" },
      name: { type: "string" },
      once: { type: "boolean", default: false },
      rounds: { type: "string" },
      "max-wait": { type: "string" },
      timeout: { type: "string" },
      retries: { type: "string" },
      seed: { type: "string" },
      json: { type: "boolean", default: false },
      "ignore-conditions": { type: "boolean", default: false },
    },
  });
  if (positionals[0] !== "run" || positionals.length !== 1) fail("the only command is 'run'");
  for (const required of ["coordinator", "data", "state-dir"] as const) {
    if (!values[required]) fail(`--${required} is required`);
  }
  let enrollmentKey: string;
  try {
    checkTransport(values.coordinator!, values.insecure);
    enrollmentKey = resolveEnrollmentKey(values["enrollment-key"], values["enrollment-key-file"], process.env);
  } catch (error) {
    if (error instanceof TransportError || error instanceof EnrollmentKeyError) fail(error.message);
    throw error;
  }
  let data;
  try {
    data = readNpz(values.data!);
  } catch (error) {
    if (
      error instanceof NpzError ||
      error instanceof RangeError ||
      (error as NodeJS.ErrnoException).code === "ENOENT"
    ) {
      fail(`cannot read --data: ${(error as Error).message}`);
    }
    throw error;
  }
  const rounds = values.rounds === undefined ? null : positive(values.rounds, "rounds", 1, true);
  if (rounds === 0) fail("--rounds must be >= 1");
  const ort = (await import("onnxruntime-node")).default as unknown as OrtModule;
  const client = new CoordinatorClient(values.coordinator!, {
    timeoutSeconds: positive(values.timeout, "timeout", 30),
    retry: {
      ...DEFAULT_RETRY,
      attempts: Math.max(1, positive(values.retries, "retries", DEFAULT_RETRY.attempts, true)),
    },
    log,
  });
  const agent = new Agent(
    {
      coordinator: values.coordinator!,
      enrollmentKey,
      name: values.name ?? null,
      once: values.once,
      rounds,
      maxWait: positive(values["max-wait"], "max-wait", 30),
      seed: positive(values.seed, "seed", 0, true),
      rotateTokenDays: positive(values["rotate-token-days"], "rotate-token-days", 30),
    },
    {
      client,
      state: new AgentState(new FileStorage(values["state-dir"]!)),
      data,
      runtime: ortRuntime(ort, { intraOpNumThreads: 1, interOpNumThreads: 1 }),
      log,
      emit: (record) => {
        if (values.json) process.stdout.write(`${JSON.stringify(record)}\n`);
        log(
          `round ${String(record.round)} done: ${String(record.bytes_sent)} bytes sent, loss ${String(record.loss_before)} -> ${String(record.loss_after)}`,
        );
      },
    },
  );
  try {
    await agent.run();
  } catch (error) {
    if (error instanceof RejectedError) {
      log(`ERROR ${error.message}`);
      return 2;
    }
    throw error;
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error: unknown) => {
    log(`ERROR ${(error as Error).stack ?? String(error)}`);
    process.exit(1);
  },
);
