// The older design's hub, for `pos-hub-bench --reference node` only (never shipped, not part
// of CI): socket.io 4 + better-sqlite3 with group commit, speaking exactly the subset of
// pos-hub's protocol that pos-hub-bench uses, so the bench can measure both in the same run.
//
//   node server.mjs --data-dir DIR --port N      (env: TLS=off for plain ws, BIND, ALG)
//
// What it does, like pos-hub `serve --dev`:
// * a dev realm t-dev:s-dev with a key pair in DIR/dev/cluster-key.pem (Ed25519 like the hub's
//   dev key; ALG=ES256 makes a P-256 one); handshake `auth: {token, since?}`, the JWT checked
//   with the algorithm of the key (never the token's), claims tenantId/storeId/deviceId/role/exp;
// * `event {id, type, payload, ts?}` and `events [...]` (1-500): validated, queued, and every
//   event that arrived in the same tick written in ONE transaction (WAL, synchronous=FULL,
//   scheduled with setImmediate), acked {ok, seq, duplicate} only after the commit; the same id
//   again answers its original seq with duplicate: true;
// * every stored event sent as `event {seq, id, type, payload, deviceId, ts, hubTs, origin}` to
//   every other connected device, in seq order;
// * `since: N`: every event after N in order, then `synced {seq}`, then live (no gap: replay,
//   `synced` and joining the live set happen in one tick, between two group commits);
// * TLS on by default: a CA and a P-256 leaf for localhost/127.0.0.1 made with openssl in
//   DIR/tls, HTTPS/WSS on the port, and on the same port plain HTTP for GET /healthz and
//   GET /ca.crt only (as pos-hub does).
// Not implemented (the bench does not use them): `sync`, cursor_expired, retention, /status,
// /metrics, the polling transport's limits, the cloud bridge.
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { Server } from "socket.io";
import Database from "better-sqlite3";

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : dflt;
}
const dataDir = arg("--data-dir");
const port = Number(arg("--port", "4001"));
if (!dataDir || !Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node server.mjs --data-dir DIR --port N   (env TLS=off, BIND, ALG=EdDSA|ES256)");
  process.exit(2);
}
const tlsOn = (process.env.TLS ?? "on") !== "off";
const bind = process.env.BIND ?? "127.0.0.1";
const TENANT = "t-dev";
const STORE = "s-dev";

// ------------------------------------------------------------------ the dev key
fs.mkdirSync(path.join(dataDir, "dev"), { recursive: true });
const keyFile = path.join(dataDir, "dev/cluster-key.pem");
const pubFile = path.join(dataDir, "dev/cluster-key.pub.pem");
if (!fs.existsSync(keyFile) || !fs.existsSync(pubFile)) {
  const es = (process.env.ALG ?? "EdDSA") === "ES256";
  const { privateKey, publicKey } = es
    ? crypto.generateKeyPairSync("ec", { namedCurve: "P-256" })
    : crypto.generateKeyPairSync("ed25519");
  fs.writeFileSync(keyFile, privateKey.export({ type: "pkcs8", format: "pem" }), { mode: 0o600 });
  fs.writeFileSync(pubFile, publicKey.export({ type: "spki", format: "pem" }));
}
const publicKey = crypto.createPublicKey(fs.readFileSync(pubFile));
const keyAlg = publicKey.asymmetricKeyType === "ed25519" ? "EdDSA" : "ES256";

function b64json(s) {
  return JSON.parse(Buffer.from(s, "base64url").toString("utf8"));
}

/** The claims of a valid token, or throws an Error whose message is pos-hub's code. */
function verifyToken(token) {
  const fail = (code) => { throw new Error(code); };
  if (typeof token !== "string" || token === "") fail("missing_token");
  const parts = token.split(".");
  if (parts.length !== 3) fail("malformed_token");
  let header, claims;
  try { header = b64json(parts[0]); claims = b64json(parts[1]); } catch { fail("malformed_token"); }
  if (header.alg !== keyAlg) fail("bad_signature");
  const data = Buffer.from(`${parts[0]}.${parts[1]}`);
  const sig = Buffer.from(parts[2], "base64url");
  const ok = keyAlg === "EdDSA"
    ? crypto.verify(null, data, publicKey, sig)
    : crypto.verify("sha256", data, { key: publicKey, dsaEncoding: "ieee-p1363" }, sig);
  if (!ok) fail("bad_signature");
  for (const c of ["tenantId", "storeId", "deviceId", "role", "exp"]) if (claims[c] === undefined) fail("missing_claims");
  const now = Date.now() / 1000;
  if (claims.exp < now) fail("expired");
  if (claims.nbf !== undefined && claims.nbf > now) fail("not_yet_valid");
  if (claims.tenantId !== TENANT || claims.storeId !== STORE) fail("wrong_realm");
  return claims;
}

// ------------------------------------------------------------------ the log
fs.mkdirSync(path.join(dataDir, "realms", TENANT), { recursive: true });
const db = new Database(path.join(dataDir, "realms", TENANT, `${STORE}.db`));
db.pragma("journal_mode = WAL");
db.pragma("synchronous = FULL");
db.exec(`CREATE TABLE IF NOT EXISTS events (
  seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, payload TEXT NOT NULL,
  device_id TEXT NOT NULL, ts TEXT, hub_ts INTEGER NOT NULL, origin TEXT NOT NULL)`);
const insert = db.prepare("INSERT INTO events (seq, id, type, payload, device_id, ts, hub_ts, origin) VALUES (?, ?, ?, ?, ?, ?, ?, 'lan')");
const byId = db.prepare("SELECT seq FROM events WHERE id = ?").pluck();
const after = db.prepare("SELECT seq, id, type, payload, device_id, ts, hub_ts, origin FROM events WHERE seq > ? ORDER BY seq");
let lastSeq = db.prepare("SELECT COALESCE(MAX(seq), 0) FROM events").pluck().get();

const ID = /^[A-Za-z0-9._:-]{1,64}$/;
const refuse = (code, message) => ({ ok: false, error: { code, message } });

/** A checked event ready to store, or a refusal ack. */
function check(e) {
  if (e === null || typeof e !== "object" || Array.isArray(e)) return refuse("invalid_event", "an event is an object {id, type, payload, ts?}");
  if (typeof e.id !== "string" || !ID.test(e.id)) return refuse("invalid_id", "id: 1-64 chars of [A-Za-z0-9._:-]");
  if (typeof e.type !== "string" || e.type.length < 1 || e.type.length > 64) return refuse("invalid_type", "type: 1-64 chars");
  if (e.payload === undefined) return refuse("invalid_payload", "payload is required");
  const payload = JSON.stringify(e.payload);
  if (Buffer.byteLength(payload) > 65536) return refuse("payload_too_large", "payload: at most 64 KiB");
  if (e.ts !== undefined && typeof e.ts !== "number" && typeof e.ts !== "string") return refuse("invalid_ts", "ts: a number or a string");
  return { id: e.id, type: e.type, payload, value: e.payload, ts: e.ts };
}

// Group commit: everything queued in one tick goes into one transaction.
let pending = []; // {ev, deviceId, sid, done(ack)}
let scheduled = false;
function enqueue(item) {
  pending.push(item);
  if (!scheduled) { scheduled = true; setImmediate(flush); }
}
const writeBatch = db.transaction((batch, acks, stored) => {
  const inBatch = new Map();
  let seq = lastSeq;
  for (let i = 0; i < batch.length; i++) {
    const { ev, deviceId } = batch[i];
    const dup = inBatch.get(ev.id) ?? byId.get(ev.id);
    if (dup !== undefined) { acks[i] = { ok: true, seq: dup, duplicate: true }; continue; }
    seq += 1;
    const hubTs = Date.now();
    insert.run(seq, ev.id, ev.type, ev.payload, deviceId, ev.ts === undefined ? null : JSON.stringify(ev.ts), hubTs);
    inBatch.set(ev.id, seq);
    acks[i] = { ok: true, seq, duplicate: false };
    stored.push({ i, out: { seq, id: ev.id, type: ev.type, payload: ev.value, deviceId, ts: ev.ts, hubTs, origin: "lan" } });
  }
  return seq;
});
function flush() {
  scheduled = false;
  const batch = pending;
  pending = [];
  const acks = new Array(batch.length);
  const stored = [];
  try {
    lastSeq = writeBatch(batch, acks, stored);
  } catch (e) {
    console.error(`node-ref: commit failed: ${e.message}`);
    for (const it of batch) it.done(refuse("storage_error", "the event log could not be written; retry"));
    return;
  }
  // Durable now (synchronous=FULL): ack, then fan out to everyone else, in seq order.
  for (let i = 0; i < batch.length; i++) batch[i].done(acks[i]);
  for (const { i, out } of stored) io.except(batch[i].sid).emit("event", out);
}

// ------------------------------------------------------------------ HTTP, TLS, Socket.IO
let caPem = "";
let tlsOpts = null;
if (tlsOn) {
  const dir = path.join(dataDir, "tls");
  fs.mkdirSync(dir, { recursive: true });
  const f = (n) => path.join(dir, n);
  if (!fs.existsSync(f("leaf.crt"))) {
    const ossl = (...a) => execFileSync("openssl", a, { stdio: ["ignore", "ignore", "pipe"] });
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f("ca.key"), "-out", f("ca.crt"),
      "-days", "30", "-subj", "/CN=pos-hub node-ref store CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign");
    ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f("leaf.key"), "-out", f("leaf.csr"), "-subj", "/CN=localhost");
    fs.writeFileSync(f("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n");
    ossl("x509", "-req", "-in", f("leaf.csr"), "-CA", f("ca.crt"), "-CAkey", f("ca.key"), "-CAcreateserial", "-out", f("leaf.crt"), "-days", "30", "-extfile", f("leaf.ext"));
  }
  caPem = fs.readFileSync(f("ca.crt"), "utf8");
  tlsOpts = { key: fs.readFileSync(f("leaf.key")), cert: fs.readFileSync(f("leaf.crt")) };
}

function basic(req, res) {
  if (req.method === "GET" && req.url === "/healthz") { res.writeHead(200, { "content-type": "text/plain" }); res.end("ok\n"); return true; }
  if (req.method === "GET" && req.url === "/ca.crt" && tlsOn) { res.writeHead(200, { "content-type": "application/x-pem-file" }); res.end(caPem); return true; }
  return false;
}
const notFound = (req, res) => { if (!basic(req, res)) { res.writeHead(404); res.end(); } };
const plain = http.createServer(notFound);
const secure = tlsOn ? https.createServer(tlsOpts, notFound) : null;
const io = new Server(secure ?? plain, {
  serveClient: false,
  perMessageDeflate: false,
  maxHttpBufferSize: 8 * 1024 * 1024,
  pingInterval: 25000,
  pingTimeout: 20000,
  connectTimeout: 10000,
});

io.use((socket, next) => {
  const auth = socket.handshake.auth ?? {};
  try {
    const claims = verifyToken(auth.token);
    if (auth.since !== undefined && (!Number.isSafeInteger(auth.since) || auth.since < 0)) throw new Error("invalid_since");
    socket.data.deviceId = claims.deviceId;
    socket.data.since = auth.since;
    next();
  } catch (e) {
    next(new Error(e.message));
  }
});

io.on("connection", (socket) => {
  const { deviceId, since } = socket.data;
  // Replay, `synced` and live membership in one tick: no commit can fall between them.
  if (since !== undefined) {
    for (const r of after.iterate(since)) {
      socket.emit("event", {
        seq: r.seq, id: r.id, type: r.type, payload: JSON.parse(r.payload), deviceId: r.device_id,
        ts: r.ts === null ? undefined : JSON.parse(r.ts), hubTs: r.hub_ts, origin: r.origin,
      });
    }
  }
  socket.emit("synced", { seq: lastSeq });
  socket.on("event", (e, ack) => {
    if (typeof ack !== "function") return;
    const ev = check(e);
    if (ev.ok === false) return ack(ev);
    enqueue({ ev, deviceId, sid: socket.id, done: ack });
  });
  socket.on("events", (list, ack) => {
    if (typeof ack !== "function") return;
    if (!Array.isArray(list) || list.length < 1 || list.length > 500) return ack(refuse("too_many_events", "events: 1-500 events"));
    const results = new Array(list.length);
    let due = list.length;
    const settle = (i) => (a) => { results[i] = a; if (--due === 0) ack({ ok: true, results }); };
    list.forEach((e, i) => {
      const ev = check(e);
      if (ev.ok === false) settle(i)(ev);
      else enqueue({ ev, deviceId, sid: socket.id, done: settle(i) });
    });
  });
});

// One port: TLS records (first byte 0x16) go to HTTPS/WSS, anything else to plain HTTP.
const front = tlsOn
  ? net.createServer((sock) => {
      sock.once("data", (head) => {
        sock.pause();
        sock.unshift(head);
        (head[0] === 0x16 ? secure : plain).emit("connection", sock);
        process.nextTick(() => sock.resume());
      });
    })
  : plain;
front.listen(port, bind, () => console.error(`node-ref: listening on ${bind}:${port} (${tlsOn ? "TLS and plain HTTP on one port" : "plain HTTP and WS"}), key ${keyAlg}, last seq ${lastSeq}`));

function stop() {
  io.close();
  front.close();
  try { db.close(); } catch {}
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
