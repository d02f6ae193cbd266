/**
 * Where the agent keeps its state: a small key -> bytes store whose writes are atomic (a reader sees
 * the old bytes or the new ones, never a mix). The Node CLI uses `FileStorage` (src/node/); an app
 * passes its own (React Native: a file system module, write to a temporary file then move it).
 */

export interface Storage {
  read(key: string): Promise<Uint8Array | null>;
  /** Replace the value atomically; durable once the promise resolves. */
  write(key: string, data: Uint8Array): Promise<void>;
  remove(key: string): Promise<void>;
}

/** In memory: for tests and for agents that keep nothing between runs. */
export class MemoryStorage implements Storage {
  readonly items = new Map<string, Uint8Array>();

  async read(key: string): Promise<Uint8Array | null> {
    const value = this.items.get(key);
    return value ? value.slice() : null;
  }

  async write(key: string, data: Uint8Array): Promise<void> {
    this.items.set(key, data.slice());
  }

  async remove(key: string): Promise<void> {
    this.items.delete(key);
  }
}
