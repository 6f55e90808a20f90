// Clear errors: refused tokens (connect_error codes), an event the hub refuses (kept as
// rejected, reported, not resent, not blocking the rest), bad input at record(), a full disk,
// two clients on one storage directory; and the dev key readable by Node's crypto and OpenSSL.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { HubClient, HubClientError, StorageFullError } from "../dist/node.js";
import { procs, tmp, startHub, mint, mintWith, caPem, until, eventsOf, run } from "./helpers.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
let hub;
const store = () => ({ dir: path.join(tmp("sdk-err"), "s") });

test("the dev cluster key is PKCS#8 v1: Node's crypto and openssl read it", async () => {
  hub = await startHub();
  const pem = fs.readFileSync(path.join(hub.dataDir, "dev", "cluster-key.pem"), "utf8");
  const key = crypto.createPrivateKey(pem);
  assert.equal(key.asymmetricKeyType, "ed25519");
  assert.equal(key.export({ format: "der", type: "pkcs8" }).length, 48);
  const o = run("openssl", ["pkey", "-in", path.join(hub.dataDir, "dev", "cluster-key.pem"), "-noout", "-text"]);
  assert.equal(o.code, 0, o.out);
  // A token minted by Node's crypto with it is accepted by the hub (used by every test here).
  const c = new HubClient({ token: mint(hub.dataDir, "till-key"), hubs: [`https://127.0.0.1:${hub.port}`], ca: caPem(hub.dataDir), storage: store() });
  await c.start();
  await c.record("t", {});
  await c.drained();
  assert.equal(c.status().state, "hub");
  await c.stop();
});

for (const [what, token, code] of [
  ["a token signed by another key", () => mintWith(crypto.generateKeyPairSync("ed25519").privateKey.export({ format: "pem", type: "pkcs8" }), { deviceId: "forger" }), "bad_signature"],
  ["an expired token", () => mint(hub.dataDir, "late", { exp: Math.floor(Date.now() / 1000) - 3600, iat: Math.floor(Date.now() / 1000) - 7200 }), "expired"],
  ["a token of another store", () => mint(hub.dataDir, "elsewhere", { storeId: "s-other" }), "wrong_realm"],
]) {
  test(`${what} is refused with connect_error ${code}, reported in status and as an error`, async () => {
    const c = new HubClient({ token: token(), hubs: [`https://127.0.0.1:${hub.port}`], ca: caPem(hub.dataDir), storage: store() });
    const errors = [];
    c.on("error", (e) => errors.push(e));
    await c.start();
    await c.record("t", { kept: true });
    const st = await until(() => c.status().lastError?.code === code && c.status(), 10000, `lastError ${code}`);
    assert.equal(st.state, "offline");
    assert.equal(st.outbox, 1, "the event stays in the outbox");
    assert.ok(errors.some((e) => e instanceof HubClientError && e.code === code), errors.map((e) => e.code).join());
    assert.match(st.lastError.message, /refused/);
    await c.stop();
  });
}

test("an event the hub refuses is kept as rejected, reported, not resent, and does not block the rest", async () => {
  const s = store();
  const url = `https://127.0.0.1:${hub.port}`;
  const opts = { token: mint(hub.dataDir, "till-rej"), hubs: [url], ca: caPem(hub.dataDir), storage: s };
  let c = new HubClient(opts);
  const rejected = [];
  c.on("rejected", (r) => rejected.push(r));
  await c.start();
  const a = (await c.record("t", { n: 1 })).id;
  const bad = (await c.record("t", { n: 2 }, { ts: "x".repeat(80) })).id; // the hub allows ts strings up to 64 chars
  const b = (await c.record("t", { n: 3 })).id;
  await c.drained();
  assert.deepEqual(rejected.map((r) => [r.id, r.code]), [[bad, "invalid_ts"]]);
  assert.equal(c.status().rejected, 1);
  assert.equal(c.status().lastError.code, "invalid_ts");
  await c.stop();
  // Restarted on the same storage: still listed, not resent.
  c = new HubClient(opts);
  const again = [];
  c.on("rejected", (r) => again.push(r));
  await c.start();
  await until(() => c.status().state === "hub", 10000, "connected");
  await c.record("t", { n: 4 });
  await c.drained();
  assert.deepEqual(again, []);
  assert.deepEqual(c.rejected().map((r) => r.id), [bad]);
  const log = await eventsOf(url, mint(hub.dataDir, "checker"), "till-rej", 3, { ca: caPem(hub.dataDir) });
  assert.deepEqual(log.map((e) => e.payload.n), [1, 3, 4]);
  assert.ok(log.some((e) => e.id === a) && log.some((e) => e.id === b));
  await c.dismissRejected();
  assert.equal(c.status().rejected, 0);
  await c.stop();
  c = new HubClient(opts);
  await c.start();
  assert.deepEqual(c.rejected(), [], "dismissed for good");
  await c.stop();
});

test("record() refuses bad input at once with the hub's codes", async () => {
  const c = new HubClient({ token: mint(hub.dataDir, "till-bad"), hubs: [], storage: store() });
  await c.start();
  await assert.rejects(c.record("", {}), (e) => e.code === "invalid_type");
  await assert.rejects(c.record("t", {}, { id: "no spaces" }), (e) => e.code === "invalid_id");
  await assert.rejects(c.record("t", { big: "x".repeat(70000) }), (e) => e.code === "payload_too_large");
  const cyclic = {}; cyclic.self = cyclic;
  await assert.rejects(c.record("t", cyclic), (e) => e.code === "invalid_payload");
  assert.equal(c.status().outbox, 0);
  await c.stop();
  assert.throws(() => new HubClient({ token: "not-a-jwt" }), (e) => e.code === "malformed_token");
});

test("two clients on one storage directory: the second is refused", async () => {
  const s = store();
  const a = new HubClient({ token: mint(hub.dataDir, "till-x"), hubs: [], storage: s });
  await a.start();
  const b = new HubClient({ token: mint(hub.dataDir, "till-x"), hubs: [], storage: s });
  await assert.rejects(b.start(), (e) => e.code === "storage_locked");
  await a.stop();
});

const root = process.getuid?.() === 0;
test("a full disk: record() rejects with storage_full, what was recorded stays intact", { skip: !root && "needs root to mount a small tmpfs" }, async () => {
  const mnt = tmp("sdk-full");
  assert.equal(run("mount", ["-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt]).code, 0);
  try {
    const opts = { token: mint(hub.dataDir, "till-full"), hubs: [], storage: { dir: path.join(mnt, "s") } };
    let c = new HubClient(opts);
    await c.start();
    let ok = 0;
    let err;
    for (let i = 0; i < 200 && !err; i++) {
      try { await c.record("t", { i, pad: "p".repeat(4000) }); ok++; } catch (e) { err = e; }
    }
    assert.ok(err instanceof StorageFullError, String(err));
    assert.equal(err.code, "storage_full");
    assert.match(err.message, /full/);
    assert.ok(ok > 10, `${ok} recorded before the disk filled`);
    assert.equal(c.status().outbox, ok);
    await c.stop();
    c = new HubClient(opts);
    await c.start();
    assert.equal(c.status().outbox, ok, "every resolved record is still there after reopening");
    await c.stop();
  } finally {
    run("umount", [mnt]);
  }
  await hub.stop();
});
