// Types, errors, a small event emitter, token decoding and event validation shared by the
// Node and browser builds. Nothing here touches the network or the disk.

/** A refusal or failure, with a stable machine-readable `code`. */
export class HubClientError extends Error {
  readonly code: string;
  readonly data?: unknown;
  constructor(code: string, message: string, data?: unknown) {
    super(message);
    this.name = "HubClientError";
    this.code = code;
    this.data = data;
  }
}

/** The local disk (Node) or the origin's quota (browser) is full: nothing was recorded. */
export class StorageFullError extends HubClientError {
  constructor(message: string) {
    super("storage_full", message);
    this.name = "StorageFullError";
  }
}

/** An event as another device recorded it, delivered by the hub. */
export interface HubEvent {
  seq: number;
  id: string;
  type: string;
  payload: unknown;
  deviceId: string;
  ts: number | string | null;
  hubTs: number;
  origin: "lan" | "cloud";
}

/**
 * Events this device will never receive from the hub: its cursor was below the oldest event
 * the hub still keeps (`cursor_expired`; the hub's LOG_RETENTION deleted them). Delivered to
 * `gap` handlers in seq position: after every event before `from`, before `oldestSeq`.
 */
export interface Gap {
  /** The first missing seq (the cursor + 1). */
  from: number;
  /** The last missing seq (`oldestSeq - 1`); the cursor becomes this once the gap is handled. */
  to: number;
  /** The oldest seq the hub still keeps: the next event delivered. */
  oldestSeq: number;
}

/**
 * The hub keeps another log than the one this device's cursor belongs to (it was factory
 * reset, or replaced by a new box, and numbers its events from 1 again). Told to `log_changed`
 * handlers after every event of the old log was handled and before any of the new one; the
 * device then follows the new log from its start, so events may come again under new seqs.
 */
export interface LogChange {
  /** The log the cursor belonged to (null: not known, this storage predates log ids). */
  previousLogId: string | null;
  /** The cursor in that log. */
  previousCursor: number;
  /** The hub's log, followed from seq 1 from now on. */
  logId: string;
  /** The last seq of the hub's log when it said so (null: not said). */
  hubSeq: number | null;
}

export interface Status {
  /** hub: connected to a hub; cloud: no hub answered, the outbox goes to the cloud; offline: neither. */
  state: "hub" | "cloud" | "offline";
  /** URL of the hub connected to (or last tried). */
  hub: string | null;
  /** Events recorded and not yet acknowledged by the hub or the cloud. */
  outbox: number;
  /** Events the hub or the cloud refused (kept, reported, never resent). */
  rejected: number;
  /** Events the cloud acknowledged that the hub has not confirmed yet (sent to it when it is back). */
  cloudOnly: number;
  /** The highest seq handled by the `event` handlers (persisted; the `since` of the next connection). */
  cursor: number;
  /** The last error, or null. */
  lastError: { code: string; message: string } | null;
}

export interface RecordOptions {
  /** Your own id (1-64 chars of [A-Za-z0-9._:-]); default: a stable id the SDK generates. */
  id?: string;
  /** Echoed by the hub; default: Date.now(). */
  ts?: number | string;
}

export interface RejectedEvent {
  id: string;
  type: string;
  payload: unknown;
  code: string;
  message: string;
}

export interface CloudOptions {
  /** Base URL of the cloud API (`https://api.example.com`) or its `.../v1/events/ingest` URL. */
  url: string;
  /** Bearer token for the cloud API. */
  token: string;
  /** Fall back to the cloud when no hub has answered for this long, in ms (default 15000). */
  after?: number;
}

export interface HubClientOptions {
  /** The device's cluster token (JWT with tenantId, storeId, deviceId). */
  token: string;
  /** Known hub URLs, tried in turn; the one that last worked is tried first. */
  hubs?: string[];
  /** Node: the store CA (PEM) to trust. */
  ca?: string;
  /** Node: pin the CA fetched from `<hub>/ca.crt` if its SHA-256 fingerprint is this. */
  caFingerprint?: string;
  /**
   * Node: `{dir}` for the outbox files. Browsers: `{name}` of the IndexedDB database (default
   * "pos-hub"); one tab at a time holds it (Web Locks): start() waits `lockWait` ms (default
   * 2000; Infinity: until the other tab closes) and then refuses with `storage_locked`;
   * `allowUnlocked: true` opens it without the lock where the page has no Web Locks API.
   */
  storage?: { dir?: string; name?: string; lockWait?: number; allowUnlocked?: boolean };
  /** Fallback to the cloud API when no hub answers. */
  cloud?: CloudOptions;
  /** Node: browse mDNS `_poshub._tcp` for hubs of the token's tenantId/storeId (default false). */
  discovery?: boolean | { timeout?: number; interface?: string };
  /** Events per `events` message (default 100, at most 500). */
  batchSize?: number;
  /** Messages in flight at once (default 4). */
  window?: number;
  /** How long a connection attempt or an ack may take, in ms (default 10000). */
  timeout?: number;
  /** Longest wait between connection rounds, in ms (default 10000). */
  backoffMax?: number;
}

export interface Claims {
  tenantId: string;
  storeId: string;
  deviceId: string;
  role?: string;
  exp?: number;
}

/** Reads the claims of a JWT without verifying it (the hub verifies it). */
export function decodeToken(token: string): Claims {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) throw new HubClientError("malformed_token", "the token is not a JWT (header.claims.signature)");
  let claims: Record<string, unknown>;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    claims = JSON.parse(new TextDecoder().decode(bytes));
  } catch {
    throw new HubClientError("malformed_token", "the token's claims are not base64url JSON");
  }
  for (const k of ["tenantId", "storeId", "deviceId"]) {
    if (typeof claims[k] !== "string" || !claims[k]) throw new HubClientError("missing_claims", `the token has no ${k} claim`);
  }
  return claims as unknown as Claims;
}

export const ID_RE = /^[A-Za-z0-9._:-]{1,64}$/;
export const MAX_PAYLOAD = 64 * 1024;

/** Checks an event the way the hub will, so a bad one is refused at record() time. */
export function validateEvent(type: unknown, payload: unknown, opts: RecordOptions): string {
  if (typeof type !== "string" || type.length < 1 || type.length > 64) {
    throw new HubClientError("invalid_type", "type must be a string of 1-64 characters");
  }
  if (opts.id !== undefined && (typeof opts.id !== "string" || !ID_RE.test(opts.id))) {
    throw new HubClientError("invalid_id", "id must be 1-64 characters of [A-Za-z0-9._:-]");
  }
  if (opts.ts !== undefined && typeof opts.ts !== "number" && typeof opts.ts !== "string") {
    throw new HubClientError("invalid_ts", "ts must be a number or a string");
  }
  let json: string | undefined;
  try {
    json = JSON.stringify(payload === undefined ? null : payload);
  } catch (e) {
    throw new HubClientError("invalid_payload", `payload is not JSON-serializable: ${(e as Error).message}`);
  }
  if (json === undefined) throw new HubClientError("invalid_payload", "payload is not JSON-serializable");
  if (new TextEncoder().encode(json).length > MAX_PAYLOAD) {
    throw new HubClientError("payload_too_large", `payload is larger than ${MAX_PAYLOAD} bytes as JSON`);
  }
  return json;
}

/** Connection refusals the hub sends as `connect_error` messages that a retry will not fix. */
export const TOKEN_CODES = new Set([
  "missing_token", "malformed_token", "unknown_key", "bad_signature", "missing_claims", "expired",
  "not_yet_valid", "wrong_realm", "bad_issuer", "bad_audience",
]);
/** Per-event refusals: kept as rejected, never resent. */
export const REJECT_CODES = new Set([
  "invalid_event", "invalid_id", "invalid_type", "invalid_payload", "payload_too_large", "invalid_ts",
  "binary_not_supported",
]);

type Listener = (...args: any[]) => unknown;

/** A minimal emitter (works in browsers; `error` without a listener does not throw). */
export class Emitter {
  private listeners = new Map<string, Listener[]>();
  on(name: string, fn: Listener): this {
    this.listeners.set(name, [...(this.listeners.get(name) ?? []), fn]);
    return this;
  }
  off(name: string, fn: Listener): this {
    this.listeners.set(name, (this.listeners.get(name) ?? []).filter((f) => f !== fn));
    return this;
  }
  protected listenerList(name: string): Listener[] {
    return this.listeners.get(name) ?? [];
  }
  protected emit(name: string, ...args: unknown[]): void {
    for (const fn of this.listenerList(name)) {
      try {
        fn(...args);
      } catch (e) {
        if (name !== "error") queueMicrotask(() => this.emit("error", e));
      }
    }
  }
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Normalizes a SHA-256 fingerprint for comparison: upper-case hex without separators. */
export const normFp = (fp: string) => fp.replace(/[^0-9a-fA-F]/g, "").toUpperCase();
