/**
 * When to try again (docs/protocol.md, "Retries and back-off"): which outcomes are temporary, how long
 * a Retry-After asks for (seconds or an HTTP-date), and the jitter on top.
 */

import type { Uniform } from "./random.js";

export const PACED_STATUSES: ReadonlySet<number> = new Set([408, 429, 503]);
export const MAX_RETRY_AFTER = 24 * 3600; // seconds: an absolute ceiling against a garbled header

/** Seconds asked for by a Retry-After header; null when absent or unparseable. */
export function parseRetryAfter(value: string | null | undefined, nowSeconds: number): number | null {
  if (value === null || value === undefined) return null;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Math.min(Number(text), MAX_RETRY_AFTER);
  if (!/^[A-Za-z]{3}.* \d{2}:\d{2}:\d{2}( GMT| \d{4})$/.test(text)) return null; // IMF-fixdate, RFC 850, asctime
  const when = Date.parse(/GMT$/.test(text) ? text : `${text} GMT`);
  if (Number.isNaN(when)) return null;
  return Math.min(Math.max(0, when / 1000 - nowSeconds), MAX_RETRY_AFTER);
}

export interface RetryPolicy {
  attempts: number; // tries per request
  baseDelay: number; // seconds before the first retry
  maxDelay: number; // cap of the exponential back-off
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 6, baseDelay: 0.5, maxDelay: 30 };

/** Exponential back-off with full jitter: uniform in [0, min(max, base * 2^attempt)]. */
export function backoff(policy: RetryPolicy, attempt: number, uniform: Uniform): number {
  return uniform() * Math.min(policy.maxDelay, policy.baseDelay * 2 ** attempt);
}

/** A server-asked wait R plus jitter in [0, max(1, R/10)]: never sooner than asked, never in lockstep. */
export function paced(seconds: number, uniform: Uniform): number {
  const r = Math.min(Math.max(0, seconds), MAX_RETRY_AFTER);
  return r + uniform() * Math.max(1, r / 10);
}
