// Checks that the Node reference hub speaks the subset of pos-hub's protocol that
// pos-hub-bench uses, with the official socket.io-client, over WSS (trusting the CA from its
// plain GET /ca.crt) and over plain ws. Run by hand: `npm test` here (not part of CI).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";

const here = path.dirname(fileURLToPath(import.meta.url));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const within = (p, ms, what) => Promise.race([p, sleep(ms).then(() => { throw new Error(`timeout: ${what}`); })]);

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
}

async function start(tls) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "node-ref-check-"));
  const port = await freePort();
  const child = spawn(process.execPath, [path.join(here, "server.mjs"), "--data-dir", dir, "--port", String(port)], {
    env: { ...process.env, TLS: tls ? "on" : "off" }, stdio: ["ignore", "ignore", "inherit"],
  });
  for (let i = 0; ; i++) {
    try { if ((await fetch(`http://127.0.0.1:${port}/healthz`)).status === 200) break; } catch {}
    if (i > 100) throw new Error("node-ref did not start");
    await sleep(100);
  }
  const ca = tls ? await (await fetch(`http://127.0.0.1:${port}/ca.crt`)).text() : undefined;
  const key = crypto.createPrivateKey(fs.readFileSync(path.join(dir, "dev/cluster-key.pem")));
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const token = (device, claims = {}) => {
    const now = Math.floor(Date.now() / 1000);
    const h = b64({ alg: "EdDSA", typ: "JWT" });
    const p = b64({ tenantId: "t-dev", storeId: "s-dev", deviceId: device, role: "till", exp: now + 600, iat: now, ...claims });
    return `${h}.${p}.${crypto.sign(null, Buffer.from(`${h}.${p}`), key).toString("base64url")}`;
  };
  const sockets = [];
  const connect = (auth) => {
    const s = io(`${tls ? "https://localhost" : "http://127.0.0.1"}:${port}`, { ca, transports: ["websocket"], auth, reconnection: false });
    s.events = []; s.on("event", (e) => s.events.push(e));
    s.synced = new Promise((r) => s.on("synced", r));
    sockets.push(s);
    return s;
  };
  const stop = async () => { for (const s of sockets) s.close(); child.kill("SIGTERM"); await new Promise((r) => child.on("exit", r)); fs.rmSync(dir, { recursive: true, force: true }); };
  return { connect, token, stop };
}

for (const tls of [true, false]) {
  test(`node-ref over ${tls ? "wss" : "ws"}: acks after commit, dedupe, batches, fan-out, replay, refusals`, async () => {
    const hub = await start(tls);
    try {
      const a = hub.connect({ token: hub.token("till-a") });
      const b = hub.connect({ token: hub.token("till-b") });
      assert.deepEqual(await within(a.synced, 5000, "a synced"), { seq: 0 });
      await within(b.synced, 5000, "b synced");
      assert.deepEqual(await a.emitWithAck("event", { id: "e1", type: "order.created", payload: { n: 1 }, ts: 7 }), { ok: true, seq: 1, duplicate: false });
      assert.deepEqual(await a.emitWithAck("event", { id: "e1", type: "order.created", payload: { n: 1 } }), { ok: true, seq: 1, duplicate: true });
      const batch = await a.emitWithAck("events", [
        { id: "e2", type: "t", payload: 2 }, { id: "bad id", type: "t", payload: 0 }, { id: "e2", type: "t", payload: 2 }, { id: "e3", type: "t", payload: 3 },
      ]);
      assert.equal(batch.ok, true);
      assert.deepEqual(batch.results[0], { ok: true, seq: 2, duplicate: false });
      assert.equal(batch.results[1].error.code, "invalid_id");
      assert.deepEqual(batch.results[2], { ok: true, seq: 2, duplicate: true });
      assert.deepEqual(batch.results[3], { ok: true, seq: 3, duplicate: false });
      assert.equal((await a.emitWithAck("events", [])).error.code, "too_many_events");
      for (let i = 0; i < 50 && b.events.length < 3; i++) await sleep(20);
      assert.deepEqual(b.events.map((e) => e.seq), [1, 2, 3], "every other device gets every stored event in order");
      assert.equal(a.events.length, 0, "the sender does not get its own events");
      const e = b.events[0];
      assert.deepEqual({ ...e, hubTs: 0 }, { seq: 1, id: "e1", type: "order.created", payload: { n: 1 }, deviceId: "till-a", ts: 7, hubTs: 0, origin: "lan" });
      const c = hub.connect({ token: hub.token("till-c"), since: 1 });
      assert.deepEqual(await within(c.synced, 5000, "c synced"), { seq: 3 });
      assert.deepEqual(c.events.map((x) => x.seq), [2, 3], "replay after since, then synced");
      for (const [auth, code] of [
        [{}, "missing_token"], [{ token: "x.y" }, "malformed_token"], [{ token: hub.token("d") + "A" }, "bad_signature"],
        [{ token: hub.token("d", { exp: 1000 }) }, "expired"], [{ token: hub.token("d", { storeId: "other" }) }, "wrong_realm"],
        [{ token: hub.token("d"), since: -1 }, "invalid_since"],
      ]) {
        const s = hub.connect(auth);
        const err = await within(new Promise((r) => s.on("connect_error", r)), 5000, code);
        assert.equal(err.message, code);
      }
    } finally {
      await hub.stop();
    }
  });
}
