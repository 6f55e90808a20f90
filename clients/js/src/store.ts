// The interface between the client and its durable local storage (files in Node,
// IndexedDB in browsers): the outbox, the receive cursor and a few settings.

/** One recorded event in the outbox. `payload` is its JSON text. */
export interface Entry {
  /** Local record number: strictly increasing, never reused on this storage. */
  n: number;
  id: string;
  type: string;
  payload: string;
  ts: number | string;
  /** pending: not acknowledged by anyone; cloud: acknowledged by the cloud only; rejected: refused. */
  state: "pending" | "cloud" | "rejected";
  code?: string;
  message?: string;
}

export interface Loaded {
  /** Random id of this storage, the prefix of generated event ids. */
  instance: string;
  /** The next local record number. */
  next: number;
  cursor: number;
  /** Unacknowledged entries (pending, cloud and rejected), in record order. */
  entries: Entry[];
  meta: Record<string, unknown>;
}

export interface Store {
  load(): Promise<Loaded>;
  /** Resolves once the entries are durable (fsync / committed transaction). */
  add(entries: Entry[]): Promise<void>;
  /** The hub acknowledged them: forget them (need not be durable: a resend is a duplicate). */
  acked(ns: number[]): Promise<void>;
  cloudAcked(ns: number[]): Promise<void>;
  rejected(n: number, code: string, message: string): Promise<void>;
  /** Drops rejected entries the app has dealt with. */
  dismiss(ns: number[]): Promise<void>;
  /** Persists the receive cursor (coalesced; resolves when durable). */
  saveCursor(cursor: number): Promise<void>;
  /** Sets the cursor to `cursor`, even below the saved one (a new log); resolves when durable. */
  resetCursor(cursor: number): Promise<void>;
  setMeta(key: string, value: unknown): Promise<void>;
  close(): Promise<void>;
}

/**
 * Persists the receive cursor, coalesced: one write in flight at a time, a call while it
 * runs raises the target, and the promise resolves once the highest value asked for is
 * written. It never goes down.
 */
export class CursorWriter {
  private want = 0;
  private saved = 0;
  private writing: Promise<void> | null = null;
  constructor(private write: (cursor: number) => Promise<void>) {}

  /** The cursor read at load (nothing is written). */
  loaded(cursor: number) {
    this.want = this.saved = cursor;
  }

  get value() {
    return this.saved;
  }

  save(cursor: number): Promise<void> {
    this.want = Math.max(this.want, cursor);
    if (!this.writing) {
      this.writing = (async () => {
        try {
          while (this.saved < this.want) {
            const c = this.want;
            await this.write(c);
            this.saved = c;
          }
        } finally {
          this.writing = null;
        }
      })();
    }
    return this.writing;
  }

  /** Writes `cursor` even if lower (the device follows a new log); resolves when durable. */
  async reset(cursor: number): Promise<void> {
    await this.idle();
    await this.write(cursor);
    this.want = this.saved = cursor;
  }

  /** Resolves when no write is in flight (errors are the save() caller's). */
  async idle() {
    await this.writing?.catch(() => {});
  }
}

export function randomInstance(): string {
  const b = new Uint8Array(8);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
