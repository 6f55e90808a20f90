// Node storage: an append-only journal (`outbox.log`, one JSON line per operation,
// group-committed with one fdatasync per batch of concurrent record() calls), an atomically
// replaced `cursor.json` and `meta.json` (write a temporary file, fsync, rename, fsync the
// directory), and a `lock` file so that two processes never share one outbox.
// A torn last line (a kill during a write) is cut off at load; the journal is compacted
// (rewritten with only the live entries, atomically) once it passes COMPACT_BYTES.
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import { HubClientError, StorageFullError } from "./common.js";
import { CursorWriter, Entry, Loaded, Store, randomInstance } from "./store.js";

const COMPACT_BYTES = 4 * 1024 * 1024;

function storageError(e: unknown, what: string): HubClientError {
  const err = e as NodeJS.ErrnoException;
  if (err?.code === "ENOSPC" || err?.code === "EDQUOT") {
    return new StorageFullError(`the disk holding the outbox is full (${what}: ${err.code}); nothing was recorded. Free space and retry`);
  }
  return new HubClientError("storage_error", `${what}: ${err?.message ?? String(e)}`);
}

async function fsyncDir(dir: string) {
  const fh = await fsp.open(dir, "r");
  try { await fh.sync(); } finally { await fh.close(); }
}

async function writeAtomic(file: string, text: string) {
  const tmp = `${file}.tmp`;
  const fh = await fsp.open(tmp, "w", 0o600);
  try {
    await fh.writeFile(text);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, file);
  await fsyncDir(path.dirname(file));
}

interface Live { add: string; state?: string }
interface Pending { line: string; sync: boolean; resolve: () => void; reject: (e: unknown) => void }

export class FileStore implements Store {
  private journal: string;
  private fh: fsp.FileHandle | null = null;
  private size = 0;
  /** Compact when the journal passes this: at least compactBytes, and twice what is live. */
  private compactAt = 0;
  private queue: Pending[] = [];
  private writing = false;
  private live = new Map<number, Live>();
  private instance = "";
  private next = 1;
  private meta: Record<string, unknown> = {};
  private cursor = new CursorWriter((c) => writeAtomic(path.join(this.dir, "cursor.json"), JSON.stringify({ cursor: c })));
  private metaChain: Promise<void> = Promise.resolve();

  constructor(private dir: string, private compactBytes = COMPACT_BYTES) {
    this.journal = path.join(dir, "outbox.log");
  }

  async load(): Promise<Loaded> {
    try {
      await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
      await this.lock();
      await fsp.rm(`${this.journal}.tmp`, { force: true });
    } catch (e) {
      if (e instanceof HubClientError) throw e;
      throw storageError(e, `opening ${this.dir}`);
    }
    let text = "";
    try { text = await fsp.readFile(this.journal, "utf8"); } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw storageError(e, `reading ${this.journal}`);
    }
    const entries = new Map<number, Entry>();
    let good = 0;
    let maxN = 0;
    let pos = 0;
    while (pos < text.length) {
      const nl = text.indexOf("\n", pos);
      if (nl < 0) break; // torn last line: cut off below
      const line = text.slice(pos, nl);
      pos = nl + 1;
      let op: any;
      try { op = JSON.parse(line); } catch { continue; }
      good = pos;
      if (op.meta) {
        this.instance = op.meta.inst;
        this.next = Math.max(this.next, op.meta.next);
      } else if (typeof op.a === "number") {
        entries.set(op.a, { n: op.a, id: op.i, type: op.t, payload: JSON.stringify(op.p), ts: op.s, state: "pending" });
        this.live.set(op.a, { add: line + "\n" });
        maxN = Math.max(maxN, op.a);
      } else if (op.k || op.d) {
        for (const n of op.k ?? op.d) { entries.delete(n); this.live.delete(n); }
      } else if (op.c) {
        for (const n of op.c) {
          const e = entries.get(n);
          if (e && e.state === "pending") { e.state = "cloud"; this.live.get(n)!.state = JSON.stringify({ c: [n] }) + "\n"; }
        }
      } else if (typeof op.r === "number") {
        const e = entries.get(op.r);
        if (e) { e.state = "rejected"; e.code = op.code; e.message = op.msg; this.live.get(op.r)!.state = line + "\n"; }
      }
    }
    this.next = Math.max(this.next, maxN + 1);
    let fresh = false;
    if (!this.instance) { this.instance = randomInstance(); fresh = true; }
    try {
      // Byte length, not string length: the journal may hold non-ASCII payloads.
      const goodBytes = Buffer.byteLength(text.slice(0, good));
      if (fresh) {
        await this.rewrite();
      } else {
        this.fh = await fsp.open(this.journal, "r+");
        await this.fh.truncate(goodBytes);
        this.size = goodBytes;
        this.compactAt = this.compactBytes;
        if (this.size > this.compactAt) await this.rewrite();
      }
    } catch (e) {
      throw storageError(e, `opening ${this.journal}`);
    }
    try {
      const c = JSON.parse(await fsp.readFile(path.join(this.dir, "cursor.json"), "utf8"));
      this.cursor.loaded(Number(c.cursor) || 0);
    } catch {}
    try { this.meta = JSON.parse(await fsp.readFile(path.join(this.dir, "meta.json"), "utf8")); } catch {}
    return { instance: this.instance, next: this.next, cursor: this.cursor.value, entries: [...entries.values()].sort((a, b) => a.n - b.n), meta: { ...this.meta } };
  }

  private async lock() {
    const file = path.join(this.dir, "lock");
    for (let i = 0; i < 2; i++) {
      try {
        const fh = await fsp.open(file, "wx", 0o600);
        await fh.writeFile(String(process.pid));
        await fh.close();
        return;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
        const pid = Number(await fsp.readFile(file, "utf8").catch(() => ""));
        let alive = false;
        if (pid === process.pid) alive = true; // another client in this process
        else if (pid) { try { process.kill(pid, 0); alive = true; } catch {} }
        if (alive) throw new HubClientError("storage_locked", `${this.dir} is in use by process ${pid}; one HubClient per storage directory`);
        await fsp.rm(file, { force: true });
      }
    }
  }

  /** Writes a compacted journal (meta + live entries) beside the old one and renames it over. */
  private async rewrite() {
    const parts = [JSON.stringify({ meta: { inst: this.instance, next: this.next } }) + "\n"];
    for (const l of [...this.live.entries()].sort((a, b) => a[0] - b[0]).map((x) => x[1])) parts.push(l.add, l.state ?? "");
    const text = parts.join("");
    await writeAtomic(this.journal, text);
    await this.fh?.close();
    this.fh = await fsp.open(this.journal, "r+");
    this.size = Buffer.byteLength(text);
    this.compactAt = Math.max(this.compactBytes, 2 * this.size);
  }

  private write(line: string, sync: boolean): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ line, sync, resolve, reject });
      if (!this.writing) void this.flush();
    });
  }

  private async flush() {
    this.writing = true;
    while (this.queue.length) {
      const batch = this.queue.splice(0);
      const buf = Buffer.from(batch.map((b) => b.line).join(""));
      const at = this.size;
      try {
        if (!this.fh) throw new HubClientError("storage_error", "the outbox is closed");
        let off = 0;
        while (off < buf.length) off += (await this.fh.write(buf, off, buf.length - off, at + off)).bytesWritten;
        if (batch.some((b) => b.sync)) await this.fh.datasync();
        this.size = at + buf.length;
        for (const b of batch) b.resolve();
      } catch (e) {
        // Leave no half-written line behind for the next write to follow.
        try { await this.fh?.truncate(at); } catch {}
        const err = e instanceof HubClientError ? e : storageError(e, `writing ${this.journal}`);
        for (const b of batch) b.reject(err);
      }
      if (this.size > this.compactAt && this.fh) {
        try { await this.rewrite(); } catch {}
      }
    }
    this.writing = false;
  }

  async add(entries: Entry[]): Promise<void> {
    const lines: string[] = [];
    for (const e of entries) {
      const line = `{"a":${e.n},"i":${JSON.stringify(e.id)},"t":${JSON.stringify(e.type)},"p":${e.payload},"s":${JSON.stringify(e.ts)}}\n`;
      lines.push(line);
    }
    await this.write(lines.join(""), true);
    entries.forEach((e, i) => this.live.set(e.n, { add: lines[i] }));
    this.next = Math.max(this.next, ...entries.map((e) => e.n + 1));
  }

  async acked(ns: number[]) {
    if (!ns.length) return;
    for (const n of ns) this.live.delete(n);
    await this.write(JSON.stringify({ k: ns }) + "\n", false).catch(() => {});
  }

  async cloudAcked(ns: number[]) {
    if (!ns.length) return;
    for (const n of ns) { const l = this.live.get(n); if (l) l.state = JSON.stringify({ c: [n] }) + "\n"; }
    await this.write(JSON.stringify({ c: ns }) + "\n", true).catch(() => {});
  }

  async rejected(n: number, code: string, message: string) {
    const line = JSON.stringify({ r: n, code, msg: message }) + "\n";
    const l = this.live.get(n);
    if (l) l.state = line;
    await this.write(line, true).catch(() => {});
  }

  async dismiss(ns: number[]) {
    for (const n of ns) this.live.delete(n);
    await this.write(JSON.stringify({ d: ns }) + "\n", true);
  }

  saveCursor(cursor: number): Promise<void> {
    return this.cursor.save(cursor);
  }

  resetCursor(cursor: number): Promise<void> {
    return this.cursor.reset(cursor);
  }

  setMeta(key: string, value: unknown): Promise<void> {
    this.meta[key] = value;
    const text = JSON.stringify(this.meta);
    this.metaChain = this.metaChain.then(() => writeAtomic(path.join(this.dir, "meta.json"), text)).catch(() => {});
    return this.metaChain;
  }

  async close() {
    while (this.writing || this.queue.length) await new Promise((r) => setTimeout(r, 5));
    await this.cursor.idle();
    await this.metaChain;
    await this.fh?.close();
    this.fh = null;
    await fsp.rm(path.join(this.dir, "lock"), { force: true }).catch(() => {});
  }
}

/** Exposed for the tests: whether a directory holds an outbox. */
export const hasJournal = (dir: string) => fs.existsSync(path.join(dir, "outbox.log"));
