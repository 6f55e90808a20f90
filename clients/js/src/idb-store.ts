// Browser storage: IndexedDB. record() resolves after the transaction that holds the entry
// (and the next record number) has committed with durability "strict" (Chromium flushes it
// to disk before completing). Concurrent record() calls share one transaction. One tab at a
// time: the store holds the Web Lock `pos-hub-client:<name>` from load() to close() (the
// browser drops it when the tab closes or reloads), so two tabs never share an outbox.
import { HubClientError, StorageFullError } from "./common.js";
import { CursorWriter, Entry, Loaded, Store, randomInstance } from "./store.js";

function req<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function idbError(e: unknown, what: string): HubClientError {
  const name = (e as DOMException)?.name;
  if (name === "QuotaExceededError") {
    return new StorageFullError(`the browser's storage quota for this site is used up (${what}); nothing was recorded. Free space (or grant persistent storage) and retry`);
  }
  return new HubClientError("storage_error", `${what}: ${(e as Error)?.message ?? String(e)}`);
}

export class IdbStore implements Store {
  private db: IDBDatabase | null = null;
  private queue: { entries: Entry[]; resolve: () => void; reject: (e: unknown) => void }[] = [];
  private writing = false;
  private next = 1;
  private meta: Record<string, unknown> = {};
  private cursor = new CursorWriter((c) => this.put({ cursor: c }));

  private release: (() => void) | null = null;

  constructor(private name: string, private lockWait = 2000, private allowUnlocked = false) {}

  /** Takes the Web Lock of this storage name, waiting at most lockWait ms for another tab to let go. */
  private async lock(): Promise<void> {
    const locks = (globalThis.navigator as { locks?: LockManager } | undefined)?.locks;
    if (!locks) {
      if (this.allowUnlocked) return;
      throw new HubClientError("storage_unguarded", "this page has no Web Locks API (navigator.locks: only in secure contexts, https or localhost), so two tabs could share this outbox and reuse its event ids; serve the page over https, or pass storage: {allowUnlocked: true} if you make sure only one tab opens it");
    }
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const ac = new AbortController();
    const timer = Number.isFinite(this.lockWait) ? setTimeout(() => ac.abort(), this.lockWait) : null;
    const got = await new Promise<boolean>((resolve, reject) => {
      locks.request(`pos-hub-client:${this.name}`, { signal: ac.signal }, () => { resolve(true); return held; })
        .catch((e: unknown) => ((e as DOMException)?.name === "AbortError" ? resolve(false) : reject(idbError(e, "taking the tab lock"))));
    });
    if (timer) clearTimeout(timer);
    if (!got) {
      throw new HubClientError("storage_locked", `the outbox "${this.name}" is open in another tab or window of this browser (waited ${this.lockWait} ms); close it, or wait for it (storage: {lockWait: Infinity})`);
    }
    this.release = release;
  }

  private unlock() {
    this.release?.();
    this.release = null;
  }

  async load(): Promise<Loaded> {
    if (typeof indexedDB === "undefined") throw new HubClientError("storage_error", "IndexedDB is not available here; pass storage: {dir} in Node");
    await this.lock();
    try {
      return await this.open();
    } catch (e) {
      this.db?.close();
      this.db = null;
      this.unlock();
      throw e;
    }
  }

  private async open(): Promise<Loaded> {
    const open = indexedDB.open(`pos-hub-client:${this.name}`, 1);
    open.onupgradeneeded = () => {
      const db = open.result;
      db.createObjectStore("entries", { keyPath: "n" });
      db.createObjectStore("meta");
    };
    try { this.db = await req(open); } catch (e) { throw idbError(e, "opening the outbox database"); }
    const tx = this.db.transaction(["entries", "meta"], "readonly");
    const entries = (await req(tx.objectStore("entries").getAll())) as Entry[];
    const metaStore = tx.objectStore("meta");
    const keys = (await req(metaStore.getAllKeys())) as string[];
    const vals = await req(metaStore.getAll());
    keys.forEach((k, i) => (this.meta[k] = vals[i]));
    let instance = this.meta.instance as string | undefined;
    this.next = Math.max(Number(this.meta.next) || 1, ...entries.map((e) => e.n + 1));
    this.cursor.loaded(Number(this.meta.cursor) || 0);
    if (!instance) {
      instance = randomInstance();
      await this.put({ instance });
    }
    const user = { ...this.meta };
    delete user.instance; delete user.next; delete user.cursor;
    return { instance, next: this.next, cursor: this.cursor.value, entries: entries.sort((a, b) => a.n - b.n), meta: user };
  }

  private tx(stores: string[]): IDBTransaction {
    if (!this.db) throw new HubClientError("storage_error", "the outbox is closed");
    // durability "strict": the commit is flushed before complete fires (Chromium >= 83).
    return (this.db.transaction as any)(stores, "readwrite", { durability: "strict" });
  }

  private done(tx: IDBTransaction): Promise<void> {
    return new Promise((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error("transaction aborted"));
    });
  }

  private async put(kv: Record<string, unknown>) {
    const tx = this.tx(["meta"]);
    for (const [k, v] of Object.entries(kv)) tx.objectStore("meta").put(v, k);
    await this.done(tx);
    Object.assign(this.meta, kv);
  }

  add(entries: Entry[]): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ entries, resolve, reject });
      if (!this.writing) void this.flush();
    });
  }

  private async flush() {
    this.writing = true;
    while (this.queue.length) {
      const batch = this.queue.splice(0);
      try {
        const tx = this.tx(["entries", "meta"]);
        const os = tx.objectStore("entries");
        let next = this.next;
        for (const b of batch) for (const e of b.entries) { os.put(e); next = Math.max(next, e.n + 1); }
        tx.objectStore("meta").put(next, "next");
        await this.done(tx);
        this.next = next;
        for (const b of batch) b.resolve();
      } catch (e) {
        const err = e instanceof HubClientError ? e : idbError(e, "writing the outbox");
        for (const b of batch) b.reject(err);
      }
    }
    this.writing = false;
  }

  private async update(ns: number[], fn: (os: IDBObjectStore, n: number) => Promise<void> | void) {
    if (!ns.length || !this.db) return;
    const tx = this.tx(["entries"]);
    const os = tx.objectStore("entries");
    for (const n of ns) await fn(os, n);
    await this.done(tx);
  }

  acked(ns: number[]) {
    return this.update(ns, (os, n) => { os.delete(n); }).catch(() => {});
  }
  dismiss(ns: number[]) {
    return this.update(ns, (os, n) => { os.delete(n); });
  }
  cloudAcked(ns: number[]) {
    return this.update(ns, async (os, n) => {
      const e = (await req(os.get(n))) as Entry | undefined;
      if (e && e.state === "pending") os.put({ ...e, state: "cloud" });
    }).catch(() => {});
  }
  rejected(n: number, code: string, message: string) {
    return this.update([n], async (os) => {
      const e = (await req(os.get(n))) as Entry | undefined;
      if (e) os.put({ ...e, state: "rejected", code, message });
    }).catch(() => {});
  }

  saveCursor(cursor: number): Promise<void> {
    return this.cursor.save(cursor);
  }

  resetCursor(cursor: number): Promise<void> {
    return this.cursor.reset(cursor);
  }

  setMeta(key: string, value: unknown) {
    return this.put({ [key]: value }).catch(() => {});
  }

  async close() {
    while (this.writing || this.queue.length) await new Promise((r) => setTimeout(r, 5));
    await this.cursor.idle();
    this.db?.close();
    this.db = null;
    this.unlock();
  }
}
