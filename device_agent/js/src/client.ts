/**
 * The device's side of the HTTP API over `fetch` (docs/protocol.md): every request has a timeout;
 * network failures and 5xx are retried with full-jitter back-off; 408, 429 and 503 are retried no
 * sooner than the server's Retry-After (plus jitter); any other 4xx is never retried (RejectedError);
 * uploads carry the caller's Idempotency-Key, and past the round's deadline are retried only when an
 * earlier attempt got no answer.
 */

import {
  type CheckinAnswer,
  ProtocolError,
  parseCheckinAnswer,
  parseUploadReceipt,
  type UploadReceipt,
} from "./messages.js";
import type { Uniform } from "./random.js";
import { backoff, DEFAULT_RETRY, PACED_STATUSES, paced, parseRetryAfter, type RetryPolicy } from "./retry.js";

export class CoordinatorError extends Error {
  override name = "CoordinatorError";
}

/** A 4xx (or a 3xx other than 304): the request itself is wrong; retrying would not help. */
export class RejectedError extends CoordinatorError {
  override name = "RejectedError";
  constructor(
    readonly status: number,
    readonly detail: string,
    readonly method: string,
    readonly path: string,
  ) {
    super(`${method} ${path} refused with ${status}: ${detail}`);
  }
}

/** Every try failed temporarily; `retryAfter` is the server's last asked wait (null if none). */
export class UnavailableError extends CoordinatorError {
  override name = "UnavailableError";
  constructor(
    message: string,
    readonly retryAfter: number | null,
  ) {
    super(message);
  }
}

/** An upload's next try would start after the round's deadline, and every earlier try was answered. */
export class DeadlinePassed extends CoordinatorError {
  override name = "DeadlinePassed";
}

export type Fetch = (url: string, init: RequestInit) => Promise<Response>;

export interface ClientOptions {
  token?: string | null;
  timeoutSeconds?: number; // per request, body included
  retry?: RetryPolicy;
  fetch?: Fetch;
  sleep?: (seconds: number) => Promise<void>;
  clock?: () => number; // unix seconds
  uniform?: Uniform; // jitter source
  userAgent?: string;
  log?: (message: string) => void;
}

interface Answer {
  status: number;
  headers: Headers;
  body: Uint8Array;
}

interface RequestOptions {
  ok: readonly number[];
  body?: Uint8Array | string;
  headers?: Record<string, string>;
  deadline?: number | null;
  outcomeUnknown?: boolean;
}

export const realSleep = (seconds: number): Promise<void> =>
  new Promise((resolve) => setTimeout(resolve, seconds * 1000));

const NOT_SENT = new Set(["ECONNREFUSED", "ENOTFOUND", "EAI_AGAIN", "ENETUNREACH", "EHOSTUNREACH"]);

function detailOf(answer: Answer): string {
  const text = new TextDecoder().decode(answer.body);
  try {
    const parsed = JSON.parse(text) as unknown;
    if (parsed && typeof parsed === "object" && "detail" in parsed)
      return String((parsed as { detail: unknown }).detail);
  } catch {
    // not JSON: the raw text says what it says
  }
  return text.slice(0, 200) || `HTTP ${answer.status}`;
}

export class CoordinatorClient {
  token: string | null;
  readonly base: string;
  private readonly options: Required<Omit<ClientOptions, "token">>;

  constructor(baseUrl: string, options: ClientOptions = {}) {
    this.base = baseUrl.replace(/\/+$/, "");
    this.token = options.token ?? null;
    this.options = {
      timeoutSeconds: options.timeoutSeconds ?? 30,
      retry: options.retry ?? DEFAULT_RETRY,
      fetch: options.fetch ?? ((url, init) => fetch(url, init)),
      sleep: options.sleep ?? realSleep,
      clock: options.clock ?? (() => Date.now() / 1000),
      uniform: options.uniform ?? Math.random,
      userAgent: options.userAgent ?? "pocketfed-agent-js/0.1",
      log: options.log ?? (() => undefined),
    };
  }

  /** How long to wait when told "come back in `seconds`" (jittered, never shorter). */
  pacedWait(seconds: number): number {
    return paced(seconds, this.options.uniform);
  }

  private async once(method: string, path: string, request: RequestOptions): Promise<Answer> {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.options.timeoutSeconds * 1000);
    const headers: Record<string, string> = { "User-Agent": this.options.userAgent, ...request.headers };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    try {
      const response = await this.options.fetch(this.base + path, {
        method,
        headers,
        body: request.body as BodyInit | undefined,
        redirect: "manual", // a redirect would hand our token to another host
        signal: controller.signal,
      });
      const body = new Uint8Array(await response.arrayBuffer());
      return { status: response.status, headers: response.headers, body };
    } finally {
      clearTimeout(timer);
    }
  }

  async request(method: string, path: string, request: RequestOptions): Promise<Answer> {
    const { retry, sleep, clock, uniform, log } = this.options;
    let problem = "";
    let serverWait: number | null = null;
    let unknown = request.outcomeUnknown ?? false;
    for (let attempt = 0; attempt < retry.attempts; attempt++) {
      if (attempt > 0) {
        const delay = serverWait !== null ? paced(serverWait, uniform) : backoff(retry, attempt - 1, uniform);
        if (request.deadline != null && !unknown && clock() + delay > request.deadline) {
          throw new DeadlinePassed(`${method} ${path}: the next try would be after the round's deadline (${problem})`);
        }
        log(`retrying ${method} ${path} in ${delay.toFixed(1)}s (${problem})`);
        await sleep(delay);
      }
      let answer: Answer;
      try {
        answer = await this.once(method, path, request);
      } catch (error) {
        const code = (error as { cause?: { code?: string } }).cause?.code;
        problem = `${(error as Error).name}: ${(error as Error).message}${code ? ` (${code})` : ""}`;
        serverWait = null;
        unknown ||= !(code && NOT_SENT.has(code));
        continue;
      }
      if (request.ok.includes(answer.status)) return answer;
      if (answer.status >= 500 || PACED_STATUSES.has(answer.status)) {
        serverWait = parseRetryAfter(answer.headers.get("Retry-After"), clock());
        problem = `HTTP ${answer.status}: ${detailOf(answer)}`;
        continue;
      }
      throw new RejectedError(answer.status, detailOf(answer), method, path);
    }
    throw new UnavailableError(
      `${method} ${path}: coordinator unavailable after ${retry.attempts} attempts; last problem: ${problem}`,
      serverWait,
    );
  }

  private static json(answer: Answer): unknown {
    try {
      return JSON.parse(new TextDecoder().decode(answer.body));
    } catch {
      throw new ProtocolError(`HTTP ${answer.status}: the answer is not JSON`);
    }
  }

  async enroll(enrollmentKey: string, name: string | null = null): Promise<{ deviceId: string; token: string }> {
    const answer = await this.request("POST", "/v1/devices", {
      ok: [200, 201],
      body: JSON.stringify({ enrollment_key: enrollmentKey, name }),
      headers: { "Content-Type": "application/json" },
    });
    const body = CoordinatorClient.json(answer) as { device_id?: unknown; token?: unknown };
    if (typeof body.device_id !== "string" || typeof body.token !== "string") {
      throw new ProtocolError("enrollment answer: device_id and token must be strings");
    }
    return { deviceId: body.device_id, token: body.token };
  }

  /** POST /v1/devices/{id}/token: a new token; the one presented stops working. */
  async rotateToken(deviceId: string): Promise<string> {
    const answer = await this.request("POST", `/v1/devices/${encodeURIComponent(deviceId)}/token`, { ok: [200] });
    const body = CoordinatorClient.json(answer) as { token?: unknown };
    if (typeof body.token !== "string") throw new ProtocolError("token rotation answer: token must be a string");
    return body.token;
  }

  async checkin(numSamples: number | null): Promise<CheckinAnswer> {
    const answer = await this.request("POST", "/v1/checkin", {
      ok: [200],
      body: JSON.stringify({ eligible: true, num_samples: numSamples }),
      headers: { "Content-Type": "application/json" },
    });
    return parseCheckinAnswer(CoordinatorClient.json(answer));
  }

  /** GET a versioned file; `data` is null when our copy with `etag` is current (304). */
  async download(path: string, etag: string | null): Promise<{ data: Uint8Array | null; etag: string | null }> {
    const answer = await this.request("GET", path, { ok: [200, 304], headers: etag ? { "If-None-Match": etag } : {} });
    if (answer.status === 304) return { data: null, etag: answer.headers.get("ETag") ?? etag };
    return { data: answer.body, etag: answer.headers.get("ETag") };
  }

  downloadModel(version: number, etag: string | null = null) {
    return this.download(`/v1/models/${version}`, etag);
  }

  downloadTrainingStep(version: number, etag: string | null = null) {
    return this.download(`/v1/models/${version}/training-step`, etag);
  }

  async upload(
    roundId: number,
    body: Uint8Array,
    idempotencyKey: string,
    options: { deadline?: number | null; outcomeUnknown?: boolean } = {},
  ): Promise<UploadReceipt> {
    const answer = await this.request("POST", `/v1/rounds/${roundId}/updates`, {
      ok: [200, 201, 202],
      body,
      headers: { "Content-Type": "application/octet-stream", "Idempotency-Key": idempotencyKey },
      deadline: options.deadline ?? null,
      outcomeUnknown: options.outcomeUnknown ?? false,
    });
    return parseUploadReceipt(CoordinatorClient.json(answer));
  }
}
