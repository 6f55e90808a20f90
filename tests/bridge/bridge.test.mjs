// System tests of the cloud bridge (issue 4): the real hub against the reference cloud
// (`pos-cloud-ref`, on its own SQLite database) with each fault in turn, restarts of either
// side, set-aside events and bad input from the cloud. Everything on 127.0.0.1.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { io } from "socket.io-client";
import { HUB, procs, httpGet, startHub, sleep, freePort } from "../lib/hub.mjs";
import { CLOUD_TOKEN as TOKEN, startCloud, device as connectDevice, write, until, realmStatus as status } from "../lib/cloud.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

const bridgeEnv = (cloud) => ({ TLS: "off", CLOUD_BRIDGE_URL: cloud.ingestUrl, CLOUD_BRIDGE_TOKEN: TOKEN, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "1s", CLOUD_FEED_WAIT: "1s" });
const mint = (hub, device) => execFileSync(HUB, ["token", "mint", "--key", path.join(hub.dataDir, "dev", "cluster-key.pem"), "--tenant", "t-dev", "--store", "s-dev", "--device", device], { encoding: "utf8" }).trim();

const device = (hub, name, since) => connectDevice(io, hub, { token: mint(hub, name), since });

/** The cloud holds exactly the hub's LAN events, once each, in seq order. */
async function cloudHasExactly(cloud, acked) {
  await until(async () => (await cloud.events()).filter((e) => e.origin === "lan").length >= acked.length, 20000, `cloud has ${acked.length} LAN events`);
  const lan = (await cloud.events()).filter((e) => e.origin === "lan");
  assert.deepEqual(lan.map((e) => e.id), acked.map((a) => a.id), "every LAN event exactly once, in seq order");
  assert.deepEqual(lan.map((e) => e.seq), acked.map((a) => a.seq));
}

test("push and pull: every LAN event reaches the cloud once; cloud events reach every device once", async () => {
  const cloud = await startCloud();
  const hub = await startHub({ env: bridgeEnv(cloud) });
  try {
    const d = device(hub, "till", 0);
    await d.ready;
    const acked = await write(d, "lan", 60);
    await cloudHasExactly(cloud, acked);
    await until(async () => (await status(hub)).outboxDepth === 0, 10000, "outbox drained");
    const st = await status(hub);
    assert.equal(st.pushedCursor, 60); assert.equal(st.bridge.state, "online");
    await cloud.addCloud([{ id: "web-1", type: "order.online", payload: { from: "web" } }, { id: "web-2", type: "menu.changed", payload: {} }]);
    await until(() => d.got.filter((e) => e.origin === "cloud").length === 2, 10000, "cloud events on the device");
    const cloudEvs = d.got.filter((e) => e.origin === "cloud");
    assert.deepEqual(cloudEvs.map((e) => [e.id, e.seq]), [["web-1", 61], ["web-2", 62]]);
    assert.equal(cloudEvs[0].deviceId, "cloud-backoffice");
    // The hub's own events came back in the feed and were not stored twice.
    await sleep(500);
    const after = await status(hub);
    assert.equal(after.lastSeq, 62);
    assert.ok(after.cloudCursor, "cloud cursor recorded");
    d.close();
  } finally { await hub.stop(); await cloud.stop(); }
});

for (const fault of [
  { mode: "refuse", count: 3 },
  { mode: "error500", count: 3 },
  { mode: "rate_limit", count: 2, retryAfter: 1 },
  { mode: "hang", count: 1 },
  { mode: "reset_after_commit", count: 2 },
  { mode: "slow", count: 3, delayMs: 800 },
]) {
  test(`push survives fault ${fault.mode}: exactly once, in order`, async () => {
    const cloud = await startCloud();
    const hub = await startHub({ env: bridgeEnv(cloud) });
    try {
      const d = device(hub, "till", undefined);
      await d.ready;
      const first = await write(d, "a", 5);
      await cloudHasExactly(cloud, first);
      await cloud.fault({ ...fault, target: "ingest" });
      const t0 = Date.now();
      const more = await write(d, "b", 40);
      assert.ok(Date.now() - t0 < 10000, "LAN acks never wait for the cloud");
      await cloudHasExactly(cloud, [...first, ...more]);
      const stats = await cloud.stats();
      assert.ok(stats[`fault_${fault.mode}`] >= 1, `fault ${fault.mode} was exercised: ${JSON.stringify(stats)}`);
      if (fault.mode === "reset_after_commit") {
        assert.ok((stats.idempotent_replays || 0) + (stats.duplicates || 0) >= 1, `the committed-but-unanswered batch was resent and deduplicated: ${JSON.stringify(stats)}`);
      }
      d.close();
    } finally { await hub.stop(); await cloud.stop(); }
  });
}

test("feed faults (refuse, 500, hang) do not lose or duplicate cloud events", async () => {
  const cloud = await startCloud();
  const hub = await startHub({ env: bridgeEnv(cloud) });
  try {
    const d = device(hub, "kds", undefined);
    await d.ready;
    for (const [i, mode] of ["refuse", "error500", "hang"].entries()) {
      await cloud.fault({ mode, count: 2, target: "feed" });
      await cloud.addCloud([{ id: `c-${mode}`, type: "t", payload: { mode } }]);
      await until(() => d.got.length >= i + 1, 30000, `cloud event after ${mode}`);
    }
    await sleep(500);
    assert.deepEqual(d.got.map((e) => e.id), ["c-refuse", "c-error500", "c-hang"]);
    d.close();
  } finally { await hub.stop(); await cloud.stop(); }
});

test("hub restarted in the middle of a push, and the cloud restarted: still exactly once", async () => {
  const cloud = await startCloud();
  let hub = await startHub({ env: bridgeEnv(cloud) });
  const dataDir = hub.dataDir;
  try {
    let d = device(hub, "till", undefined);
    await d.ready;
    await cloud.fault({ mode: "slow", delayMs: 1500, count: 1 });
    const a = await write(d, "pre", 30);
    await sleep(300); // a push is in flight now
    d.close();
    hub.child.kill("SIGKILL");
    await hub.waitExit(5000);
    hub = await startHub({ dataDir, env: bridgeEnv(cloud) });
    d = device(hub, "till", undefined);
    await d.ready;
    const b = await write(d, "mid", 10);
    await cloudHasExactly(cloud, [...a, ...b]);
    // Cloud down: the LAN carries on, /healthz stays healthy, status says offline.
    const port = cloud.port;
    await cloud.stop();
    const c = await write(d, "offline", 20);
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    await until(async () => (await status(hub)).bridge.state === "offline", 10000, "offline in /status");
    assert.ok((await status(hub)).outboxDepth >= 20);
    const cloud2 = await startCloud({ db: cloud.db, port });
    try {
      await cloudHasExactly(cloud2, [...a, ...b, ...c]);
      await until(async () => (await status(hub)).outboxDepth === 0, 10000, "outbox drained after the cloud came back");
    } finally { await cloud2.stop(); }
    d.close();
  } finally { await hub.stop(); }
});

test("events the cloud rejects are set aside with the reason and do not block the rest", async () => {
  const cloud = await startCloud({ reject: ["bad.type"] });
  const hub = await startHub({ env: bridgeEnv(cloud) });
  try {
    const d = device(hub, "till", undefined);
    await d.ready;
    const a = await write(d, "ok1", 3);
    const bad = await d.timeout(5000).emitWithAck("event", { id: "poison", type: "bad.type", payload: {} });
    const b = await write(d, "ok2", 3);
    await cloudHasExactly(cloud, [...a, ...b]);
    // The cloud may hold the last batch before the hub has its answer: wait for both.
    const st = await until(async () => { const r = await status(hub); return r.bridge.setAside === 1 && r.outboxDepth === 0 && r; }, 10000, "poison set aside and the outbox drained");
    assert.deepEqual(st.bridge.setAsideEvents.map((e) => [e.seq, e.id]), [[bad.seq, "poison"]]);
    assert.match(st.bridge.setAsideEvents[0].reason, /refused/);
    d.close();
  } finally { await hub.stop(); await cloud.stop(); }
});

test("bad input from the cloud is refused without stopping the bridge or the LAN", async () => {
  // A hostile cloud: ingest works, the feed serves junk pages in turn, then good events.
  const pages = [
    "this is not json",
    JSON.stringify({ events: [{ type: "no.id", payload: 1 }, { id: "other-realm", type: "t", payload: 1, tenantId: "t-evil", storeId: "s-dev" }], cursor: "2" }),
    JSON.stringify({ events: [{ id: "x".repeat(100), type: "t", payload: 1 }, "str", 42], cursor: "3" }),
    `{"events":[{"id":"huge","type":"t","payload":"${"x".repeat(17 * 1024 * 1024)}"}],"cursor":"4"}`,
    JSON.stringify({ events: [{ id: "good-1", type: "t", payload: { ok: true } }], cursor: "5" }),
  ];
  let served = 0, pushed = 0;
  const srv = http.createServer((req, res) => {
    if (req.url.startsWith("/v1/events/ingest")) {
      let b = ""; req.on("data", (d) => (b += d)); req.on("end", () => {
        const body = JSON.parse(b); pushed += body.events.length;
        res.end(JSON.stringify({ results: body.events.map((e) => ({ seq: e.seq, id: e.id, status: "accepted" })) }));
      });
      return;
    }
    const page = pages[Math.min(served++, pages.length)] ?? JSON.stringify({ events: [], cursor: "5" });
    if (served > pages.length) return setTimeout(() => res.end(JSON.stringify({ events: [], cursor: "5" })), 500);
    res.end(page);
  });
  const port = await freePort();
  await new Promise((r) => srv.listen(port, "127.0.0.1", r));
  const hub = await startHub({ env: { TLS: "off", CLOUD_BRIDGE_URL: `http://127.0.0.1:${port}/v1/events/ingest`, CLOUD_BRIDGE_TOKEN: TOKEN, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "300ms" } });
  try {
    const d = device(hub, "till", undefined);
    await d.ready;
    await until(() => d.got.some((e) => e.id === "good-1"), 30000, "the good event after the junk");
    assert.deepEqual(d.got.map((e) => e.id), ["good-1"], "only the good cloud event is stored");
    const st = await status(hub);
    assert.ok(st.bridge.refusedFromCloud >= 5, JSON.stringify(st.bridge));
    const mine = await write(d, "lan", 5);
    await until(() => pushed >= 5, 10000, "push still works");
    assert.equal(mine.length, 5);
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    assert.match(hub.log(), /malformed page refused|refused an event from the cloud feed/);
    d.close();
  } finally { await hub.stop(); srv.close(); }
});
