/** Where the Node host finds the enrollment key: --enrollment-key, else the file, else PF_ENROLLMENT_KEY.
 * A key on the command line is visible to every local user in the process list; the other two are not. */

import { readFileSync } from "node:fs";

export class EnrollmentKeyError extends Error {}

export function resolveEnrollmentKey(
  flag: string | undefined,
  path: string | undefined,
  env: Record<string, string | undefined>,
): string {
  if (flag) return flag;
  if (path !== undefined) {
    let key: string;
    try {
      key = readFileSync(path, "utf8").trim();
    } catch (error) {
      throw new EnrollmentKeyError(`--enrollment-key-file: ${(error as Error).message}`);
    }
    if (!key) throw new EnrollmentKeyError(`--enrollment-key-file ${path}: the file is empty`);
    return key;
  }
  const key = (env.PF_ENROLLMENT_KEY ?? "").trim();
  if (!key) {
    throw new EnrollmentKeyError(
      "no enrollment key: give --enrollment-key-file, PF_ENROLLMENT_KEY or --enrollment-key",
    );
  }
  return key;
}
