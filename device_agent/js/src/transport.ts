/** Which coordinator URLs a device may talk to: its token and updates travel in the clear over
 * http://, so plain HTTP only to this machine unless the operator says the network is trusted. */

export class TransportError extends Error {}

function isLoopback(host: string): boolean {
  const bare = host.replace(/^\[|\]$/g, "").toLowerCase();
  if (bare === "localhost" || bare === "::1") return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(bare);
}

/** Throws TransportError naming the problem unless `url` is https://, or http:// to loopback (or `insecure`). */
export function checkTransport(url: string, insecure: boolean): void {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new TransportError(`--coordinator ${JSON.stringify(url)}: not a URL`);
  }
  if (parsed.protocol === "https:") return;
  if (parsed.protocol !== "http:") {
    throw new TransportError(`--coordinator ${JSON.stringify(url)}: expected an http:// or https:// URL`);
  }
  if (insecure || isLoopback(parsed.hostname)) return;
  throw new TransportError(
    `--coordinator ${JSON.stringify(url)}: plain http:// to another machine sends the device token and updates ` +
      "in the clear; use https:// (or --insecure on a trusted network)",
  );
}
