/** Storage in a directory: write a temporary file, fsync, rename over the old one, fsync the directory. */

import { randomBytes } from "node:crypto";
import { mkdir, open, readFile, rename, rm } from "node:fs/promises";
import { join } from "node:path";

import type { Storage } from "../storage.js";

export class FileStorage implements Storage {
  constructor(readonly dir: string) {}

  private path(key: string): string {
    if (!/^[A-Za-z0-9._-]+$/.test(key) || key.startsWith("."))
      throw new Error(`storage key ${JSON.stringify(key)} is not a plain file name`);
    return join(this.dir, key);
  }

  async read(key: string): Promise<Uint8Array | null> {
    try {
      return new Uint8Array(await readFile(this.path(key)));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw error;
    }
  }

  async write(key: string, data: Uint8Array): Promise<void> {
    const target = this.path(key);
    await mkdir(this.dir, { recursive: true });
    const temporary = join(this.dir, `.${key}.${randomBytes(6).toString("hex")}.tmp`);
    try {
      const handle = await open(temporary, "w", 0o600);
      try {
        await handle.writeFile(data);
        await handle.sync();
      } finally {
        await handle.close();
      }
      await rename(temporary, target);
    } catch (error) {
      await rm(temporary, { force: true });
      throw error;
    }
    const directory = await open(this.dir, "r");
    try {
      await directory.sync();
    } finally {
      await directory.close();
    }
  }

  async remove(key: string): Promise<void> {
    await rm(this.path(key), { force: true });
  }
}
