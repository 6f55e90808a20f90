// The client itself, the same in Node and browsers: the outbox (record, pipelined sends,
// resend with the same id until acked), the receive side (cursor, seq dedupe, handlers in
// order), choosing a hub (known URLs, last working first, plus what the platform
// discovers), and the cloud fallback. Storage, CA handling and discovery come from a
// Platform (node.ts, browser.ts).
import { io, Socket } from "socket.io-client";
import {
  Claims, Emitter, Gap, HubClientError, HubClientOptions, HubEvent, LogChange, RecordOptions, RejectedEvent, Status,
  REJECT_CODES, TOKEN_CODES, decodeToken, validateEvent,
} from "./common.js";
import { Entry, Store } from "./store.js";

export interface Candidate { url: string; caFp?: string }

export interface Platform {
  openStore(opts: HubClientOptions): Store;
  /** Socket.IO options for this hub (Node: the CA, fetched, checked and pinned if need be). */
  prepare(c: Candidate, ctx: PlatformContext): Promise<Record<string, unknown>>;
  /** Hubs found on the LAN for the token's realm (Node mDNS). */
  discover?(claims: Claims, opts: HubClientOptions): Promise<Candidate[]>;
  /** After a transport failure: a more precise reason if there is one (browser: CA not trusted). */
  explain?(c: Candidate): Promise<HubClientError | null>;
}

export interface PlatformContext {
  opts: HubClientOptions;
  meta: Record<string, unknown>;
  setMeta(key: string, value: unknown): Promise<void>;
}

interface Item extends Entry { value: unknown; done: boolean }

const RETRY_CODES = new Set(["busy", "shutting_down", "storage_error"]);

export class HubClientCore extends Emitter {
  readonly claims: Claims;
  private opts: HubClientOptions;
  private platform: Platform;
  private store: Store | null = null;
  private instance = "";
  private next = 1;
  private items: Item[] = [];
  private sendPos = 0;
  private pending = 0;
  private cloudOnly = 0;
  private rejectedCount = 0;
  private cursor = 0;
  private meta: Record<string, unknown> = {};
  private socket: Socket | null = null;
  private conn = 0;
  private inflight = 0;
  private state: Status["state"] = "offline";
  private hub: string | null = null;
  private lastError: Status["lastError"] = null;
  private started = false;
  private stopped = false;
  private metaWrites = new Set<Promise<void>>();
  private offlineSince = Date.now();
  private wakers: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  /** Received, not yet handled: events in seq order, and gap markers in their place. */
  private rx: (HubEvent | { gap: Gap })[] = [];
  /** The highest seq queued in rx (or skipped by a gap): the `since` of the next handshake. */
  private rxTop = 0;
  private delivering = false;
  private statusTimer: ReturnType<typeof setTimeout> | null = null;
  private loops: Promise<void>[] = [];
  private discovered: Candidate[] = [];
  private cloudBatch = 100;

  constructor(opts: HubClientOptions, platform: Platform) {
    super();
    if (!opts || typeof opts.token !== "string") throw new HubClientError("missing_token", "HubClient needs {token}");
    this.opts = { ...opts };
    this.claims = decodeToken(opts.token);
    this.platform = platform;
    const bs = opts.batchSize ?? 100;
    if (!(bs >= 1 && bs <= 500)) throw new HubClientError("invalid_option", "batchSize must be 1-500");
  }

  /** Opens the local outbox and starts connecting; resolves once the outbox is loaded. */
  async start(): Promise<void> {
    if (this.started) return;
    this.store = this.platform.openStore(this.opts);
    const l = await this.store.load();
    this.instance = l.instance;
    this.next = l.next;
    this.cursor = l.cursor;
    this.meta = l.meta;
    for (const e of l.entries) {
      let value: unknown = null;
      try { value = JSON.parse(e.payload); } catch {}
      this.items.push({ ...e, value, done: false });
      if (e.state === "pending") this.pending++;
      else if (e.state === "cloud") this.cloudOnly++;
      else this.rejectedCount++;
    }
    this.started = true;
    this.offlineSince = Date.now();
    this.loops.push(this.hubLoop(), this.cloudLoop());
    this.emitStatus(true);
  }

  /** Records an event: resolves once it is durable locally, with its id. Never waits for the network. */
  async record(type: string, payload: unknown, opts: RecordOptions = {}): Promise<{ id: string }> {
    if (!this.started || this.stopped) throw new HubClientError("not_started", "call start() before record() (and not after stop())");
    const json = validateEvent(type, payload, opts);
    const n = this.next++;
    const id = opts.id ?? `${this.instance}.${n}`;
    const entry: Entry = { n, id, type, payload: json, ts: opts.ts ?? Date.now(), state: "pending" };
    await this.store!.add([entry]);
    const item: Item = { ...entry, value: JSON.parse(json), done: false };
    // Concurrent records resolve in order; insert by n all the same.
    let i = this.items.length;
    while (i > 0 && this.items[i - 1].n > n) i--;
    this.items.splice(i, 0, item);
    if (i < this.sendPos) this.sendPos = i;
    this.pending++;
    this.pump();
    this.emitStatus();
    return { id };
  }

  /** Resolves when nothing recorded is waiting to be acknowledged by the hub or the cloud. */
  drained(): Promise<void> {
    if (this.pending === 0) return Promise.resolve();
    return new Promise((r) => this.drainWaiters.push(r));
  }

  status(): Status {
    return {
      state: this.state, hub: this.hub, outbox: this.pending, rejected: this.rejectedCount, cloudOnly: this.cloudOnly,
      cursor: this.cursor, lastError: this.lastError,
    };
  }

  /** Events the hub or the cloud refused, kept until dismissed. */
  rejected(): RejectedEvent[] {
    return this.items.filter((i) => !i.done && i.state === "rejected")
      .map((i) => ({ id: i.id, type: i.type, payload: i.value, code: i.code ?? "", message: i.message ?? "" }));
  }

  /** Forgets rejected events (all, or those ids). */
  async dismissRejected(ids?: string[]): Promise<void> {
    const gone = this.items.filter((i) => !i.done && i.state === "rejected" && (!ids || ids.includes(i.id)));
    for (const i of gone) i.done = true;
    this.rejectedCount -= gone.length;
    this.compactHead();
    await this.store?.dismiss(gone.map((i) => i.n));
    this.emitStatus(true);
  }

  /** Replaces the token (e.g. a renewed one); the next connection uses it. */
  setToken(token: string) {
    const c = decodeToken(token);
    if (c.deviceId !== this.claims.deviceId || c.tenantId !== this.claims.tenantId || c.storeId !== this.claims.storeId) {
      throw new HubClientError("wrong_realm", "the new token is for another device or realm than this outbox");
    }
    this.opts.token = token;
    this.wake();
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.socket?.close();
    this.socket = null;
    this.wake();
    await Promise.allSettled(this.loops);
    while (this.delivering) await new Promise((r) => setTimeout(r, 5));
    if (this.statusTimer) clearTimeout(this.statusTimer);
    await Promise.allSettled([...this.metaWrites]);
    await this.store?.saveCursor(this.cursor).catch(() => {});
    await this.store?.close();
  }

  // ---- status and errors ----

  private fail(code: string, message: string, data?: unknown) {
    this.lastError = { code, message };
    this.emit("error", new HubClientError(code, message, data));
    this.emitStatus(true);
  }

  private emitStatus(now = false) {
    if (now) {
      if (this.statusTimer) { clearTimeout(this.statusTimer); this.statusTimer = null; }
      this.emit("status", this.status());
      return;
    }
    if (!this.statusTimer) {
      this.statusTimer = setTimeout(() => { this.statusTimer = null; this.emit("status", this.status()); }, 100);
    }
  }

  private setState(state: Status["state"], hub: string | null = this.hub) {
    if (state === this.state && hub === this.hub) return;
    if (this.state === "hub" && state !== "hub") this.offlineSince = Date.now();
    this.state = state;
    this.hub = hub;
    this.emitStatus(true);
  }

  private wake() {
    const w = this.wakers.splice(0);
    for (const f of w) f();
  }

  private nap(ms: number): Promise<void> {
    return new Promise((r) => {
      const t = setTimeout(done, ms);
      function done() { clearTimeout(t); r(); }
      this.wakers.push(done);
    });
  }

  // ---- the hub connection ----

  private candidates(): Candidate[] {
    const known = (Array.isArray(this.meta.hubs) ? this.meta.hubs : []) as string[];
    const urls = [...known, ...(this.opts.hubs ?? []), ...this.discovered.map((d) => d.url)];
    const seen = new Set<string>();
    const out: Candidate[] = [];
    for (const u of urls) {
      const url = u.replace(/\/+$/, "");
      if (seen.has(url)) continue;
      seen.add(url);
      out.push({ url, caFp: this.discovered.find((d) => d.url === url)?.caFp });
    }
    return out;
  }

  private async hubLoop() {
    let backoff = 250;
    const max = this.opts.backoffMax ?? 10000;
    let round = 0;
    while (!this.stopped) {
      if (this.opts.discovery && this.platform.discover && (round === 0 || this.discovered.length === 0 || round % 3 === 0)) {
        try {
          this.discovered = await this.platform.discover(this.claims, this.opts);
        } catch (e) {
          this.fail("discovery_failed", `mDNS discovery failed: ${(e as Error).message}`);
        }
      }
      round++;
      let served = false;
      for (const c of this.candidates()) {
        if (this.stopped) return;
        const t0 = Date.now();
        const r = await this.session(c);
        // A hub that closes at once is retried with backoff, not in a tight loop.
        if (r === "served" && Date.now() - t0 > 2000) { served = true; break; }
        if (r === "again") { served = true; break; }
        if (r === "served") break;
      }
      if (this.stopped) return;
      if (served) { backoff = 250; continue; }
      if (this.state === "hub") this.setState("offline");
      if (this.candidates().length === 0 && !this.lastError) {
        this.fail("no_hub", this.opts.discovery ? "no hub of this store found on the LAN (mDNS) and no hub URL known" : "no hub URL given (hubs: [...])");
      }
      await this.nap(backoff * (0.75 + Math.random() * 0.5));
      backoff = Math.min(backoff * 2, max);
    }
  }

  /**
   * One connection to one hub. "served": it connected and has now closed (reconnect at
   * once); "again": refused for a reason fixed already (retry at once); "failed".
   */
  private async session(c: Candidate): Promise<"served" | "again" | "failed"> {
    let extra: Record<string, unknown>;
    try {
      extra = await this.platform.prepare(c, { opts: this.opts, meta: this.meta, setMeta: (k, v) => this.setMeta(k, v) });
    } catch (e) {
      const err = e instanceof HubClientError ? e : new HubClientError("hub_unreachable", `${c.url}: ${(e as Error).message}`);
      this.hub = c.url;
      this.fail(err.code, err.message, err.data);
      return "failed";
    }
    const timeout = this.opts.timeout ?? 10000;
    let since = 0;
    let ahead: Status["lastError"] = null;
    // The log this device's cursor belongs to, as the hub said in an earlier `synced`.
    const knownLog = typeof this.meta.logId === "string" ? this.meta.logId : undefined;
    // Set when `synced` shows the hub keeps another log: this connection ends, the device
    // switches to that log (see switchLog) and connects again.
    let relog: { logId: string; hubSeq: number } | null = null;
    let connected = false;
    const s = io(c.url, {
      transports: ["websocket"], reconnection: false, forceNew: true, timeout,
      auth: (cb: (a: object) => void) => cb({ token: this.opts.token, since: (since = Math.max(this.cursor, this.rxTop)), logId: knownLog }),
      ...extra,
    });
    // Listen before the handshake completes: socket.io-client emits events that arrived with
    // the CONNECT packet before it emits "connect".
    let live = true;
    s.on("event", (e: HubEvent) => {
      if (!live || this.stopped) return;
      if (typeof e?.seq === "number" && e.seq > this.rxTop) this.rxTop = e.seq;
      this.queue(e);
    });
    s.on("synced", (m: { seq?: unknown; logId?: unknown }) => {
      if (live && typeof m?.logId === "string" && typeof m.seq === "number") {
        // A hub that names its log. Refused already if it is not the known one; without a
        // known one (a storage from before log ids), a log that ends before the cursor is
        // not the one the cursor counts in: switch to it. Otherwise it is this device's log.
        if ((knownLog !== undefined && m.logId !== knownLog) || (knownLog === undefined && m.seq < since)) {
          relog = { logId: m.logId, hubSeq: m.seq };
          live = false;
          if (connected) s.disconnect();
          return;
        }
        if (knownLog === undefined) void this.setMeta("logId", m.logId);
      }
      // A hub that does not name its log (an older one), whose log ends before the cursor:
      // not the log this device followed (reset or replaced): said, not repaired.
      if (live && typeof m?.seq === "number" && m.seq < since) {
        this.fail("cursor_ahead", `${c.url}'s log ends at seq ${m.seq}, before this device's cursor ${since}: it is not the log this device followed (the hub was reset or replaced); its events up to seq ${since} are not delivered here`, { cursor: since, hubSeq: m.seq });
        ahead = this.lastError;
      }
      this.emitStatus(true);
    });
    const outcome = await new Promise<"ok" | HubClientError>((resolve) => {
      const t = setTimeout(() => resolve(new HubClientError("hub_unreachable", `${c.url}: no answer within ${timeout} ms`)), timeout + 1000);
      s.once("connect", () => { clearTimeout(t); resolve("ok"); });
      s.once("connect_error", (err: Error & { data?: any }) => {
        clearTimeout(t);
        const code = err.message;
        if (TOKEN_CODES.has(code) || code === "cursor_expired" || code === "log_changed" || code === "invalid_since" || code === "shutting_down") {
          resolve(new HubClientError(code, `${c.url} refused the connection: ${code}`, err.data));
        } else {
          resolve(new HubClientError("hub_unreachable", `${c.url}: ${err.message}`));
        }
      });
    });
    if (outcome !== "ok") {
      live = false;
      s.close();
      this.hub = c.url;
      if (outcome.code === "log_changed") {
        const d = outcome.data as { logId?: unknown; lastSeq?: unknown } | undefined;
        if (typeof d?.logId === "string") {
          await this.switchLog(c.url, d.logId, typeof d.lastSeq === "number" ? d.lastSeq : null);
          return "again";
        }
      }
      if (outcome.code === "cursor_expired") {
        const oldest = Number((outcome.data as { oldestSeq?: unknown } | undefined)?.oldestSeq);
        const from = Math.max(this.cursor, this.rxTop) + 1;
        if (Number.isInteger(oldest) && oldest > from) {
          // The gap goes into the receive queue after what was received before it, and the
          // next handshake resumes after it; the cursor passes it once its handlers ran.
          const gap: Gap = { from, to: oldest - 1, oldestSeq: oldest };
          this.rxTop = gap.to;
          this.queue({ gap });
          this.fail("cursor_expired", `${c.url} no longer keeps events ${gap.from}-${gap.to} (deleted by its log retention): they are missing on this device; it continues from ${oldest}`, gap);
          return "again";
        }
      }
      if (outcome.code === "hub_unreachable" && this.platform.explain) {
        const better = await this.platform.explain(c).catch(() => null);
        if (better) { this.fail(better.code, better.message); return "failed"; }
      }
      if (TOKEN_CODES.has(outcome.code)) {
        this.fail(outcome.code, `${outcome.message}; the token is refused (get a new one, then setToken())`);
      } else {
        this.fail(outcome.code, outcome.message);
      }
      return "failed";
    }
    connected = true;
    if (relog) {
      // `synced` came with the CONNECT: nothing of this connection was delivered.
      s.close();
      this.hub = c.url;
      const r: { logId: string; hubSeq: number } = relog;
      await this.switchLog(c.url, r.logId, r.hubSeq);
      return "again";
    }
    // Connected.
    const conn = ++this.conn;
    this.socket = s;
    this.inflight = 0;
    this.sendPos = 0;
    this.lastError = ahead; // socket.io-client emits what came with the CONNECT (synced) first
    this.setState("hub", c.url);
    const known = (Array.isArray(this.meta.hubs) ? this.meta.hubs : []) as string[];
    if (known[0] !== c.url) void this.setMeta("hubs", [c.url, ...known.filter((u) => u !== c.url)].slice(0, 16));
    await new Promise<void>((resolve) => {
      s.on("disconnect", (reason: string) => {
        if (!this.stopped && reason !== "io client disconnect") this.lastError = { code: "disconnected", message: `${c.url}: ${reason}` };
        resolve();
      });
      if (this.stopped) resolve();
      this.pump();
    });
    live = false;
    if (this.socket === s) this.socket = null;
    s.close();
    if (!this.stopped) this.setState("offline");
    if (relog && !this.stopped) {
      const r: { logId: string; hubSeq: number } = relog;
      await this.switchLog(c.url, r.logId, r.hubSeq);
      return "again";
    }
    return "served";
  }

  /**
   * The hub keeps another log than the cursor's (reset or replaced): once every event of the
   * old log already received was handled, the `log_changed` handlers run (awaited), then the
   * cursor goes to 0 and the new log's id is stored, in that order, so a crash in between
   * tells the app again. The caller connects again at once, from seq 0 of the new log.
   */
  private async switchLog(url: string, logId: string, hubSeq: number | null) {
    while ((this.delivering || this.rx.length) && !this.stopped) await new Promise((r) => setTimeout(r, 20));
    if (this.stopped) return;
    const change: LogChange = {
      previousLogId: typeof this.meta.logId === "string" ? this.meta.logId : null,
      previousCursor: this.cursor, logId, hubSeq,
    };
    this.fail("log_changed", `${url} keeps another log (${logId}) than the one this device followed up to seq ${change.previousCursor}: the hub was reset or replaced; this device now follows its log from seq 1 (events may come again under new seqs)`, change);
    await this.handle("log_changed", change, `the change to log ${logId}`);
    this.cursor = 0;
    this.rxTop = 0;
    await this.store!.resetCursor(0).catch((err) => this.fail("storage_error", `resetting the cursor: ${err.message}`));
    await this.setMeta("logId", logId);
    this.emitStatus(true);
  }

  private setMeta(key: string, value: unknown) {
    this.meta[key] = value;
    if (!this.store) return Promise.resolve();
    // Kept until written, so stop() never closes the store under a pending write.
    const w = this.store.setMeta(key, value).finally(() => this.metaWrites.delete(w));
    this.metaWrites.add(w);
    return w;
  }

  /** Sends what is not acknowledged, oldest first, up to `window` messages in flight. */
  private pump() {
    const s = this.socket;
    if (!s || !s.connected) return;
    const window = this.opts.window ?? 4;
    const size = this.opts.batchSize ?? 100;
    const conn = this.conn;
    while (this.inflight < window) {
      const batch: Item[] = [];
      while (this.sendPos < this.items.length && batch.length < size) {
        const it = this.items[this.sendPos++];
        if (!it.done && it.state !== "rejected") batch.push(it);
      }
      if (!batch.length) return;
      this.inflight++;
      const msg = batch.map((i) => ({ id: i.id, type: i.type, payload: i.value, ts: i.ts }));
      s.timeout(this.opts.timeout ?? 10000).emit("events", msg, (err: Error | null, ack: any) => {
        if (conn === this.conn) this.inflight--;
        this.onAck(s, batch, err, ack);
      });
    }
  }

  private onAck(s: Socket, batch: Item[], err: Error | null, ack: any) {
    if (err || !ack || ack.ok !== true || !Array.isArray(ack.results)) {
      const code = ack?.error?.code;
      if (s === this.socket) {
        this.lastError = { code: code ?? "ack_timeout", message: code ? `hub refused a batch: ${code}` : `no ack within ${this.opts.timeout ?? 10000} ms; reconnecting` };
        s.disconnect(); // the next connection resends from the oldest unacknowledged event
      }
      return;
    }
    const acked: number[] = [];
    let retry = false;
    batch.forEach((it, i) => {
      const r = ack.results[i];
      if (it.done) return;
      if (r && r.ok === true) {
        it.done = true;
        acked.push(it.n);
        if (it.state === "pending") this.pending--;
        else if (it.state === "cloud") this.cloudOnly--;
      } else {
        const code: string = r?.error?.code ?? "invalid_event";
        if (REJECT_CODES.has(code)) this.reject(it, code, r?.error?.message ?? code);
        else retry = true;
      }
    });
    if (acked.length) void this.store!.acked(acked);
    this.compactHead();
    this.checkDrained();
    this.emitStatus();
    if (retry && s === this.socket) {
      this.lastError = { code: "busy", message: "the hub asked to retry; reconnecting to resend" };
      setTimeout(() => { if (s === this.socket) s.disconnect(); }, 200);
      return;
    }
    this.pump();
  }

  private reject(it: Item, code: string, message: string) {
    if (it.state === "pending") this.pending--;
    else if (it.state === "cloud") this.cloudOnly--;
    it.state = "rejected";
    it.code = code;
    it.message = message;
    this.rejectedCount++;
    void this.store!.rejected(it.n, code, message);
    this.fail(code, `event ${it.id} (${it.type}) was refused: ${message}; kept in rejected(), not resent`, { id: it.id });
    this.emit("rejected", { id: it.id, type: it.type, payload: it.value, code, message });
  }

  private checkDrained() {
    if (this.pending === 0 && this.drainWaiters.length) {
      const w = this.drainWaiters.splice(0);
      for (const f of w) f();
    }
  }

  private compactHead() {
    let k = 0;
    while (k < this.items.length && this.items[k].done) k++;
    if (k > 256 || k === this.items.length) {
      this.items.splice(0, k);
      this.sendPos = Math.max(0, this.sendPos - k);
    }
  }

  // ---- receiving ----

  private queue(item: HubEvent | { gap: Gap }) {
    this.rx.push(item);
    if (!this.delivering) void this.deliver();
  }

  /** Runs the `event` (or `gap`) handlers of one item, one after another, awaiting promises. */
  private async handle(name: "event" | "gap" | "log_changed", arg: HubEvent | Gap | LogChange, what: string) {
    for (const fn of this.listenerList(name)) {
      try {
        const r = fn(arg) as any;
        if (r && typeof r.then === "function") await r;
      } catch (err) {
        this.fail("handler_error", `${name === "event" ? "an event" : name === "gap" ? "a gap" : "a log_changed"} handler threw on ${what}: ${(err as Error)?.message ?? err}`, name === "event" ? { seq: (arg as HubEvent).seq } : arg);
      }
    }
  }

  private async deliver() {
    this.delivering = true;
    try {
      while (this.rx.length) {
        const item = this.rx.shift()!;
        let seq: number;
        if ("gap" in item) {
          seq = item.gap.to;
          if (seq <= this.cursor) continue;
          await this.handle("gap", item.gap, `the gap ${item.gap.from}-${item.gap.to}`);
        } else {
          seq = item.seq;
          if (typeof seq !== "number" || seq <= this.cursor) continue;
          if (item.deviceId !== this.claims.deviceId) await this.handle("event", item, `seq ${seq}`);
        }
        this.cursor = seq;
        void this.store!.saveCursor(seq).catch((err) => this.fail("storage_error", `saving the cursor: ${err.message}`));
      }
    } finally {
      this.delivering = false;
    }
  }

  // ---- the cloud fallback ----

  private async cloudLoop() {
    const cloud = this.opts.cloud;
    if (!cloud) return;
    const after = cloud.after ?? 15000;
    let backoff = 500;
    while (!this.stopped) {
      const waiting = this.items.some((i) => !i.done && i.state === "pending");
      if (this.state === "hub" || !waiting || Date.now() - this.offlineSince < after) {
        if (this.state === "cloud" && !waiting) { /* stays "cloud" until a hub answers */ }
        await this.nap(Math.max(100, Math.min(1000, after / 4)));
        continue;
      }
      const r = await this.cloudPush(cloud.url, cloud.token);
      if (r === "ok") { backoff = 500; continue; }
      await this.nap(typeof r === "number" ? r : backoff);
      backoff = Math.min(backoff * 2, 30000);
    }
  }

  private async cloudPush(base: string, token: string): Promise<"ok" | "fail" | number> {
    const batch = this.items.filter((i) => !i.done && i.state === "pending").slice(0, this.cloudBatch);
    if (!batch.length) return "ok";
    const url = /\/ingest\/?$/.test(base) ? base : `${base.replace(/\/+$/, "")}/v1/events/ingest`;
    const { tenantId, storeId, deviceId } = this.claims;
    const key = `${tenantId}:${storeId}:${deviceId}:${batch[0].id}+${batch.length}`;
    const body = JSON.stringify({
      tenantId, storeId,
      events: batch.map((i) => ({ id: i.id, type: i.type, payload: i.value, deviceId, ts: i.ts, hubTs: Date.now(), origin: "lan" })),
    });
    const ac = new AbortController();
    const t = setTimeout(() => ac.abort(), this.opts.timeout ?? 10000);
    let res: Response;
    let answer: any;
    try {
      res = await fetch(url, { method: "POST", body, signal: ac.signal, headers: { "content-type": "application/json", authorization: `Bearer ${token}`, "idempotency-key": key } });
      answer = await res.json().catch(() => null);
    } catch (e) {
      clearTimeout(t);
      if (this.state === "cloud") this.setState("offline");
      this.fail("cloud_unreachable", `cloud ${url}: ${(e as Error).message}`);
      return "fail";
    }
    clearTimeout(t);
    if (res.status === 413 && this.cloudBatch > 1) { this.cloudBatch = Math.max(1, this.cloudBatch >> 1); return "ok"; }
    if (res.status === 429 || res.status === 503) {
      const ra = Number(res.headers.get("retry-after"));
      this.fail("cloud_busy", `cloud answered ${res.status}; retrying`);
      return Number.isFinite(ra) && ra > 0 ? ra * 1000 : "fail";
    }
    if (res.status === 401 || res.status === 403) {
      this.fail("cloud_unauthorized", `cloud refused the token (${res.status}): check cloud.token`);
      return 30000;
    }
    if (res.status !== 200 || !Array.isArray(answer?.results)) {
      this.fail("cloud_error", `cloud answered ${res.status}: ${answer?.error ?? "no results"}`);
      return "fail";
    }
    if (this.state === "hub") return "ok"; // a hub came back meanwhile: it gets them anyway
    const ok: number[] = [];
    batch.forEach((it, i) => {
      const r = answer.results[i];
      if (it.done || it.state !== "pending") return;
      if (r?.status === "accepted" || r?.status === "duplicate") {
        it.state = "cloud";
        this.pending--;
        this.cloudOnly++;
        ok.push(it.n);
      } else if (r?.status === "rejected") {
        this.reject(it, "cloud_rejected", r.reason ?? "rejected by the cloud");
      }
    });
    await this.store!.cloudAcked(ok);
    this.lastError = null;
    this.setState("cloud", this.hub);
    this.checkDrained();
    this.emitStatus();
    return "ok";
  }
}
