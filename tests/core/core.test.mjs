// System tests of the hub core (issue 2): the real `pos-hub` binary driven by the official
// socket.io-client from npm. Each test starts its own hub on a free loopback port with its own
// data dir (MDNS=off, no NTP, TLS=off so plain ws:// is served); every wait is bounded.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { io } from "socket.io-client";
import WebSocket from "ws";
import { HUB, procs, tmp, httpGet, startHub, sleep, freePort } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const PLAIN = { TLS: "off" };

function mint(keyFile, { tenant = "t-dev", store = "s-dev", device = "till-1", role = "till", ttl = "1h", extra = [] } = {}) {
  return execFileSync(HUB, ["token", "mint", "--key", keyFile, "--tenant", tenant, "--store", store, "--device", device, "--role", role, `--ttl=${ttl}`, ...extra], { encoding: "utf8" }).trim();
}
const devKey = (hub) => path.join(hub.dataDir, "dev", "cluster-key.pem");

function genKey(dir, name, alg = "ed25519") {
  const priv = path.join(dir, `${name}.pem`), pub = path.join(dir, `${name}.pub.pem`);
  if (alg === "ed25519") execFileSync("openssl", ["genpkey", "-algorithm", "ed25519", "-out", priv]);
  else if (alg === "p256") execFileSync("openssl", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", priv]);
  else execFileSync("openssl", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", priv]);
  execFileSync("openssl", ["pkey", "-in", priv, "-pubout", "-out", pub]);
  return { priv, pub };
}

/** Connects and resolves once `synced` arrived; collects every `event` into `.got`. */
function connect(port, auth, opts = {}) {
  const s = io(`http://127.0.0.1:${port}`, { transports: ["websocket"], auth, reconnection: false, timeout: 5000, ...opts });
  s.got = [];
  s.on("event", (e) => s.got.push(e));
  s.ready = new Promise((res, rej) => {
    s.on("synced", (x) => res(x));
    s.on("connect_error", (e) => rej(e));
    setTimeout(() => rej(new Error("no synced within 10 s")), 10000);
  });
  return s;
}

/** Expects a refused connection; returns the connect_error message (the stable code). */
async function refused(port, auth) {
  const s = io(`http://127.0.0.1:${port}`, { transports: ["websocket"], auth, reconnection: false, timeout: 5000 });
  try {
    return await new Promise((res, rej) => {
      s.on("connect_error", (e) => res(e.message));
      s.on("connect", () => rej(new Error("connected but should have been refused")));
      setTimeout(() => rej(new Error("no answer")), 8000);
    });
  } finally { s.close(); }
}

async function until(pred, ms, what) {
  const end = Date.now() + ms;
  while (Date.now() < end) { if (await pred()) return; await sleep(20); }
  throw new Error(`timed out: ${what}`);
}

const ev = (id, extra = {}) => ({ id, type: "order.created", payload: { total: 12.5, id }, ...extra });

test("event + durable ack, fan-out to the other device (not echoed), duplicate ids", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const a = connect(hub.port, { token: mint(devKey(hub), { device: "till-a" }) });
    const b = connect(hub.port, { token: mint(devKey(hub), { device: "kds-b", role: "kds" }) });
    await Promise.all([a.ready, b.ready]);
    const ack = await a.timeout(5000).emitWithAck("event", ev("o-1", { ts: 1700000000000, deviceId: "forged" }));
    assert.deepEqual(ack, { ok: true, seq: 1, duplicate: false });
    await until(() => b.got.length === 1, 5000, "fan-out to b");
    const e = b.got[0];
    assert.equal(e.seq, 1); assert.equal(e.id, "o-1"); assert.equal(e.type, "order.created");
    assert.deepEqual(e.payload, { total: 12.5, id: "o-1" });
    assert.equal(e.deviceId, "till-a", "deviceId comes from the token, never from the event");
    assert.equal(e.origin, "lan"); assert.equal(e.ts, 1700000000000); assert.equal(typeof e.hubTs, "number");
    const dup = await a.timeout(5000).emitWithAck("event", ev("o-1"));
    assert.deepEqual(dup, { ok: true, seq: 1, duplicate: true });
    const next = await b.timeout(5000).emitWithAck("event", ev("o-2"));
    assert.deepEqual(next, { ok: true, seq: 2, duplicate: false });
    await until(() => a.got.length === 1, 5000, "fan-out to a");
    await sleep(200);
    assert.equal(a.got.length, 1, "a must not get its own event back"); assert.equal(b.got.length, 1, "no broadcast of a duplicate");
    // Batch form.
    const batch = await a.timeout(5000).emitWithAck("events", [ev("o-3"), { id: "bad id", type: "t", payload: 1 }, ev("o-1"), ev("o-4")]);
    assert.equal(batch.ok, true);
    assert.deepEqual(batch.results.map((r) => r.ok ? [r.seq, r.duplicate] : r.error.code), [[3, false], "invalid_id", [1, true], [4, false]]);
    await until(() => b.got.length === 3, 5000, "batch fan-out");
    assert.deepEqual(b.got.map((x) => x.seq), [1, 3, 4]);
    a.close(); b.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("malformed events are refused with a code; nobody is disconnected", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const a = connect(hub.port, { token: mint(devKey(hub)) });
    const b = connect(hub.port, { token: mint(devKey(hub), { device: "other" }) });
    await Promise.all([a.ready, b.ready]);
    const code = async (...args) => (await a.timeout(5000).emitWithAck(...args)).error?.code;
    assert.equal(await code("event", "a string"), "invalid_event");
    assert.equal(await code("event", { type: "t", payload: 1 }), "invalid_id");
    assert.equal(await code("event", { id: "x".repeat(65), type: "t", payload: 1 }), "invalid_id");
    assert.equal(await code("event", { id: "ok", type: "", payload: 1 }), "invalid_type");
    assert.equal(await code("event", { id: "ok", type: "t" }), "invalid_payload");
    assert.equal(await code("event", { id: "ok", type: "t", payload: "x".repeat(70 * 1024) }), "payload_too_large");
    assert.equal(await code("event", { id: "ok", type: "t", payload: 1, ts: { no: 1 } }), "invalid_ts");
    assert.equal(await code("event", { id: "bin", type: "t", payload: Buffer.from("abc") }), "binary_not_supported");
    assert.equal(await code("events", []), "too_many_events");
    assert.equal(await code("events", Array.from({ length: 501 }, (_, i) => ev(`m-${i}`))), "too_many_events");
    // An event without an ack callback is stored all the same.
    a.emit("event", ev("no-ack"));
    await until(() => b.got.some((e) => e.id === "no-ack"), 5000, "no-ack event fanned out");
    assert.ok(a.connected && b.connected);
    assert.deepEqual(await a.timeout(5000).emitWithAck("event", ev("after")), { ok: true, seq: 2, duplicate: false });
    a.close(); b.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("refused connections carry stable codes", async () => {
  const hub = await startHub({ env: PLAIN });
  const dir = tmp("keys");
  try {
    const key = devKey(hub);
    const other = genKey(dir, "other");
    assert.equal(await refused(hub.port, {}), "missing_token");
    assert.equal(await refused(hub.port, { token: "" }), "missing_token");
    assert.equal(await refused(hub.port, { token: "not-a-jwt" }), "malformed_token");
    assert.equal(await refused(hub.port, { token: mint(key, { ttl: "-2h" }) }), "expired");
    assert.equal(await refused(hub.port, { token: mint(key, { extra: ["--nbf-in", "1h"] }) }), "not_yet_valid");
    assert.equal(await refused(hub.port, { token: mint(key, { tenant: "t-other" }) }), "wrong_realm");
    assert.equal(await refused(hub.port, { token: mint(other.priv) }), "bad_signature");
    assert.equal(await refused(hub.port, { token: mint(key), since: -3 }), "invalid_since");
    // A tampered payload (claims another device) fails the signature.
    const [h, p, s] = mint(key).split(".");
    const claims = JSON.parse(Buffer.from(p, "base64url")); claims.deviceId = "root";
    assert.equal(await refused(hub.port, { token: [h, Buffer.from(JSON.stringify(claims)).toString("base64url"), s].join(".") }), "bad_signature");
    // alg=none with the right claims: not even a token the hub can read.
    const none = [Buffer.from('{"alg":"none","typ":"JWT"}').toString("base64url"), p, ""].join(".");
    assert.equal(await refused(hub.port, { token: none }), "malformed_token");
    // HS256 signed with the public key as the secret (the classic confusion attack).
    const crypto = await import("node:crypto");
    const pubPem = fs.readFileSync(path.join(hub.dataDir, "dev", "cluster-key.pub.pem"));
    const hsHead = Buffer.from('{"alg":"HS256","typ":"JWT"}').toString("base64url");
    const hsSig = crypto.createHmac("sha256", pubPem).update(`${hsHead}.${p}`).digest("base64url");
    assert.equal(await refused(hub.port, { token: `${hsHead}.${p}.${hsSig}` }), "bad_signature");
    const ok = connect(hub.port, { token: mint(key) });
    await ok.ready; ok.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("offline grace: an admitted device may reconnect with a recently expired token; others may not", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const key = devKey(hub);
    const a = connect(hub.port, { token: mint(key, { device: "till-grace" }) });
    await a.ready; a.close();
    const again = connect(hub.port, { token: mint(key, { device: "till-grace", ttl: "-3h" }) });
    await again.ready;
    const st = JSON.parse((await httpGet(hub.port, "/status")).body);
    assert.deepEqual(st.realms[0].devices.map((d) => [d.deviceId, d.inGrace]), [["till-grace", true]]);
    again.close();
    assert.equal(await refused(hub.port, { token: mint(key, { device: "till-new", ttl: "-3h" }) }), "expired");
    assert.equal(await refused(hub.port, { token: mint(key, { device: "till-grace", ttl: "-100h" }) }), "expired");
  } finally { assert.equal(await hub.stop(), 0); }
});

test("catch-up with since while another device keeps writing: no gap, no duplicate across synced", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const key = devKey(hub);
    const w = connect(hub.port, { token: mint(key, { device: "writer" }) });
    await w.ready;
    for (let i = 0; i < 300; i++) await w.timeout(5000).emitWithAck("event", ev(`pre-${i}`));
    let writing = true, n = 0;
    const writer = (async () => {
      while (writing && n < 5000) {
        const batch = Array.from({ length: 20 }, () => w.timeout(5000).emitWithAck("event", ev(`live-${n++}`)));
        await Promise.all(batch);
      }
    })();
    await sleep(100);
    const order = [];
    const c = io(`http://127.0.0.1:${hub.port}`, { transports: ["websocket"], auth: { token: mint(key, { device: "late" }), since: 120 }, reconnection: false });
    c.on("event", (e) => order.push(["e", e.seq]));
    c.on("synced", (s) => order.push(["synced", s.seq]));
    await until(() => order.some((o) => o[0] === "synced"), 10000, "synced");
    await sleep(300);
    writing = false;
    await writer;
    const last = (await w.timeout(5000).emitWithAck("event", ev("final"))).seq;
    await until(() => order.length && order[order.length - 1][1] === last, 10000, "the final event");
    const seqs = order.filter((o) => o[0] === "e").map((o) => o[1]);
    const syncedAt = order.findIndex((o) => o[0] === "synced");
    assert.deepEqual(seqs, Array.from({ length: last - 120 }, (_, i) => 121 + i), "every seq after since, once, in order");
    assert.equal(order[syncedAt][1], seqs[syncedAt - 1] ?? 120, "synced carries the last replayed seq");
    assert.ok(syncedAt < order.length - 1, "live events followed synced");
    // sync: a page on request.
    const page = await c.timeout(5000).emitWithAck("sync", { since: 10, limit: 5 });
    assert.equal(page.ok, true);
    assert.deepEqual(page.events.map((e) => e.seq), [11, 12, 13, 14, 15]);
    assert.equal(page.lastSeq, last);
    w.close(); c.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("one device's pipelined events are stored in the order it sent them", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const a = connect(hub.port, { token: mint(devKey(hub), { device: "fast-till" }) });
    const b = connect(hub.port, { token: mint(devKey(hub), { device: "watcher" }) });
    await Promise.all([a.ready, b.ready]);
    const acks = await Promise.all(Array.from({ length: 400 }, (_, i) => a.timeout(10000).emitWithAck("event", ev(`seq-${i}`))));
    const seqs = acks.map((x) => x.seq);
    assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "acked seqs increase in send order");
    await until(() => b.got.length === 400, 10000, "all fanned out");
    assert.deepEqual(b.got.map((e) => e.id), Array.from({ length: 400 }, (_, i) => `seq-${i}`));
    a.close(); b.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("garbage on the wire: the hub and other devices carry on", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const b = connect(hub.port, { token: mint(devKey(hub), { device: "bystander" }) });
    await b.ready;
    const junk = ["", "garbage", "4", "42", "42[", "42[\"event\"", "43abc", "40{", "4\u0000\u0001", "451-[\"event\",{\"_placeholder\":true,\"num\":0}]", "9999", "42[\"event\",{\"id\":\"x\",\"type\":\"t\",\"payload\":" + "[".repeat(5000) + "]}]"];
    for (const variant of ["before-auth", "after-auth"]) {
      const ws = new WebSocket(`ws://127.0.0.1:${hub.port}/socket.io/?EIO=4&transport=websocket`);
      await new Promise((r, j) => { ws.on("open", r); ws.on("error", j); });
      if (variant === "after-auth") ws.send(`40${JSON.stringify({ token: mint(devKey(hub), { device: "junk" }) })}`);
      await sleep(100);
      for (const j of junk) { try { ws.send(j); } catch {} }
      try { ws.send(Buffer.from([0xff, 0x00, 0x13, 0x37])); } catch {}
      await sleep(200);
      ws.terminate();
    }
    // Raw HTTP junk too.
    const net = await import("node:net");
    await new Promise((r) => { const s = net.connect(hub.port, "127.0.0.1", () => { s.write("\x00\x01GARBAGE\r\n\r\n"); setTimeout(() => { s.destroy(); r(); }, 200); }); s.on("error", r); });
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    assert.ok(b.connected, "a bystander keeps its connection");
    const a = connect(hub.port, { token: mint(devKey(hub), { device: "after-junk" }) });
    await a.ready;
    const ack = await a.timeout(5000).emitWithAck("event", ev("still-works"));
    assert.equal(ack.ok, true);
    await until(() => b.got.some((e) => e.id === "still-works"), 5000, "bystander receives");
    a.close(); b.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("two realms in one hub: separate logs, nothing crosses", async () => {
  const dir = tmp("realms");
  const k1 = genKey(dir, "k1", "p256"), k2 = genKey(dir, "k2", "rsa");
  const realms = path.join(dir, "realms.json");
  fs.writeFileSync(realms, JSON.stringify([
    { tenantId: "t-abc", storeId: "s-001", publicKeyFile: "k1.pub.pem" },
    { tenantId: "t-abc", storeId: "s-002", publicKeyBase64: Buffer.from(fs.readFileSync(k2.pub)).toString("base64") },
  ]));
  const dataDir = tmp("data");
  const port = await freePort();
  const hub = await startHub({ dataDir, port, env: PLAIN, args: ["serve", "--data-dir", dataDir, "--realms", realms, "--port", String(port)] });
  try {
    const t1 = (d) => mint(k1.priv, { tenant: "t-abc", store: "s-001", device: d });
    const t2 = (d) => mint(k2.priv, { tenant: "t-abc", store: "s-002", device: d });
    const a1 = connect(port, { token: t1("a1") }), b1 = connect(port, { token: t1("b1") });
    const a2 = connect(port, { token: t2("a2") }), b2 = connect(port, { token: t2("b2") });
    await Promise.all([a1.ready, b1.ready, a2.ready, b2.ready]);
    assert.deepEqual(await a1.timeout(5000).emitWithAck("event", ev("shared-id")), { ok: true, seq: 1, duplicate: false });
    assert.deepEqual(await a2.timeout(5000).emitWithAck("event", ev("shared-id")), { ok: true, seq: 1, duplicate: false }, "ids and seqs are per realm");
    await a2.timeout(5000).emitWithAck("event", ev("only-2"));
    await until(() => b1.got.length === 1 && b2.got.length === 2, 5000, "fan-out in each realm");
    await sleep(200);
    assert.deepEqual(b1.got.map((e) => e.id), ["shared-id"]);
    assert.deepEqual(b2.got.map((e) => e.id), ["shared-id", "only-2"]);
    // A realm's key does not open the other realm, whatever the token claims.
    assert.equal(await refused(port, { token: mint(k1.priv, { tenant: "t-abc", store: "s-002" }) }), "bad_signature");
    assert.equal(await refused(port, { token: mint(k1.priv, { tenant: "t-xyz", store: "s-001" }) }), "wrong_realm");
    const st = JSON.parse((await httpGet(port, "/status")).body);
    assert.deepEqual(st.realms.map((r) => [r.storeId, r.lastSeq, r.devices.length]), [["s-001", 1, 2], ["s-002", 2, 2]]);
    assert.ok(fs.existsSync(path.join(dataDir, "realms", "t-abc", "s-001.db")) && fs.existsSync(path.join(dataDir, "realms", "t-abc", "s-002.db")));
    for (const s of [a1, b1, a2, b2]) s.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("/healthz and /status: shapes, detail only for localhost or an admin token, never event contents", async () => {
  const hub = await startHub({ env: PLAIN });
  try {
    const a = connect(hub.port, { token: mint(devKey(hub), { device: "till-s" }) });
    await a.ready;
    await a.timeout(5000).emitWithAck("event", ev("secret-order", { payload: { card: "SECRET-PAYLOAD" } }));
    const h = await httpGet(hub.port, "/healthz");
    assert.equal(h.status, 200); assert.equal(h.body.trim(), "ok");
    const raw = (await httpGet(hub.port, "/status")).body;
    assert.doesNotMatch(raw, /SECRET-PAYLOAD|secret-order/);
    const st = JSON.parse(raw);
    assert.equal(typeof st.version, "string"); assert.equal(typeof st.uptimeSecs, "number");
    const r = st.realms[0];
    assert.equal(r.tenantId, "t-dev"); assert.equal(r.storeId, "s-dev"); assert.equal(r.lastSeq, 1);
    assert.equal(r.outboxDepth, 1, "all LAN events are in the outbox while no bridge pushes them");
    assert.equal(r.cloudCursor, null);
    assert.deepEqual(r.devices.map((d) => [d.deviceId, d.role, d.inGrace]), [["till-s", "till", false]]);
    assert.equal(typeof r.devices[0].connectedSince, "number");
    a.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("events survive a restart; SIGTERM exits 0 after acking what was sent", async () => {
  const hub = await startHub({ env: PLAIN });
  const a = connect(hub.port, { token: mint(devKey(hub), { device: "till-r" }) });
  await a.ready;
  // Pipeline events, then SIGTERM while some may be in flight: each one is acked either
  // ok (then it must be on disk) or with shutting_down.
  const pending = Array.from({ length: 300 }, (_, i) => a.timeout(8000).emitWithAck("event", ev(`r-${i}`)).catch((e) => ({ ok: false, error: { code: e.message } })));
  await sleep(5);
  hub.child.kill("SIGTERM");
  const acks = await Promise.all(pending);
  assert.equal(await hub.waitExit(10000), 0, hub.log());
  const ok = acks.filter((x) => x.ok).map((x) => x.seq);
  for (const x of acks.filter((x) => !x.ok)) assert.match(x.error.code, /shutting_down|disconnected|timeout|timed out/);
  assert.ok(ok.length > 0, "some events were acked before the shutdown");
  const again = await startHub({ dataDir: hub.dataDir, port: hub.port, env: PLAIN });
  try {
    const c = connect(again.port, { token: mint(devKey(again), { device: "reader" }), since: 0 });
    await c.ready;
    const seqs = c.got.map((e) => e.seq);
    for (const s of ok) assert.ok(seqs.includes(s), `acked seq ${s} is on disk`);
    assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => i + 1));
    c.close();
  } finally { assert.equal(await again.stop(), 0); }
});

test("each log has an id: synced carries it across restarts; a cursor of another log is refused with log_changed", async () => {
  const hub = await startHub({ env: PLAIN });
  const a = connect(hub.port, { token: mint(devKey(hub), { device: "till-l" }), since: 0 });
  const first = await a.ready;
  assert.match(first.logId, /^[0-9a-f]{32}$/);
  assert.equal((await a.timeout(5000).emitWithAck("event", ev("l-1"))).seq, 1);
  a.close();
  assert.equal(await hub.stop(), 0);
  const again = await startHub({ dataDir: hub.dataDir, port: hub.port, env: PLAIN });
  const other = await startHub({ env: PLAIN });
  try {
    const token = mint(devKey(again), { device: "till-l" });
    const b = connect(again.port, { token, since: 0, logId: first.logId });
    assert.deepEqual(await b.ready, { seq: 1, logId: first.logId }, "the same log after a restart");
    assert.deepEqual(b.got.map((e) => e.id), ["l-1"]);
    b.close();
    // A cursor of another log (a reset or replaced hub): refused, with this log's id and
    // last seq, before any event of this log is sent under the other log's numbers.
    const c = io(`http://127.0.0.1:${again.port}`, { transports: ["websocket"], auth: { token, since: 5, logId: "0".repeat(32) }, reconnection: false, timeout: 5000 });
    let events = 0;
    c.on("event", () => events++);
    const err = await new Promise((res, rej) => {
      c.on("connect_error", res);
      c.on("connect", () => rej(new Error("connected with another log's cursor")));
      setTimeout(() => rej(new Error("no answer")), 8000);
    });
    c.close();
    assert.equal(err.message, "log_changed");
    assert.deepEqual(err.data, { logId: first.logId, lastSeq: 1 });
    const st = JSON.parse((await httpGet(again.port, "/status")).body);
    assert.equal(st.realms[0].logId, first.logId, "/status names the log too");
    assert.equal(events, 0);
    assert.equal(await refused(again.port, { token, logId: 7 }), "invalid_log_id");
    // Another hub's log has another id.
    const d = connect(other.port, { token: mint(devKey(other), { device: "till-l" }), since: 0 });
    const theirs = await d.ready;
    d.close();
    assert.match(theirs.logId, /^[0-9a-f]{32}$/);
    assert.notEqual(theirs.logId, first.logId);
  } finally {
    assert.equal(await again.stop(), 0);
    assert.equal(await other.stop(), 0);
  }
});

test("a bad setting stops start-up with one message naming the key", async () => {
  const bad = [
    [{ PORT: "99999" }, /PORT/],
    [{ TENANT_ID: "t", STORE_ID: "s", CLUSTER_PUBLIC_KEY_BASE64: "!!!" }, /CLUSTER_PUBLIC_KEY_BASE64/],
    [{ TENANT_ID: "t", STORE_ID: "s" }, /CLUSTER_PUBLIC_KEY_BASE64/],
    [{ UPDATE_CHANNEL: "nightly!" }, /UPDATE_CHANNEL/],
  ];
  for (const [env, re] of bad) {
    const r = (await import("node:child_process")).spawnSync(HUB, ["serve", "--data-dir", tmp("bad")], { env: { ...process.env, MDNS: "off", NTP_SERVERS: "off", ...env }, encoding: "utf8", timeout: 10000 });
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, re);
    assert.match(r.stderr, /configuration error/);
  }
  const envFile = path.join(tmp("envf"), "hub.env");
  fs.writeFileSync(envFile, "TENANT_ID=t\nthis is not a setting\n");
  const r = (await import("node:child_process")).spawnSync(HUB, ["serve", "--env-file", envFile, "--data-dir", tmp("bad")], { env: { ...process.env, MDNS: "off" }, encoding: "utf8", timeout: 10000 });
  assert.notEqual(r.status, 0); assert.match(r.stderr, /hub\.env line 2/);
});
