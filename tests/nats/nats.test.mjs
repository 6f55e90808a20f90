// System tests of the NATS JetStream bridge target (issue 15): the real hub against a
// real three-node nats-server cluster with JetStream on loopback, never a mock. Each
// test ends with every LAN event exactly once in the stream (counted by Nats-Msg-Id)
// and in seq order, read back with the official `nats` client.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { io } from "socket.io-client";
import { procs, httpGet, startHub, sleep } from "../lib/hub.mjs";
import {
  startCluster, createStream, streamInfo, countOn, leaderOf, readSubject, publishDown, consumerInfo, startProxy, TOKEN,
} from "./cluster.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

const UP = "poshub.t-dev.s-dev.up";
const DOWN = "poshub.t-dev.s-dev.down";
const CONSUMER = "poshub-down-t_2Ddev-s_2Ddev";

const natsEnv = (urls, extra = {}) => ({
  TLS: "off", CLOUD_BRIDGE_URL: urls, CLOUD_BRIDGE_TOKEN: TOKEN, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "500ms", CLOUD_FEED_WAIT: "1s", ...extra,
});

function device(hub, since) {
  const s = io(`http://127.0.0.1:${hub.port}`, { transports: ["websocket"], auth: { token: hub.token, since }, reconnection: false });
  s.got = [];
  s.on("event", (e) => s.got.push(e));
  s.ready = new Promise((res, rej) => { s.on("synced", res); s.on("connect_error", rej); setTimeout(() => rej(new Error("no synced")), 10000); });
  return s;
}

async function until(pred, ms, what) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) { last = await pred(); if (last) return last; await sleep(100); }
  throw new Error(`timed out: ${what}`);
}

/** With VERBOSE=1, what the hub logged about its bridge. */
const report = (hub, what) => {
  if (process.env.VERBOSE) console.log(`--- ${what}\n` + hub.log().split("\n").filter((l) => /NATS|nats|bridge|stream|cursor/.test(l)).slice(-40).join("\n"));
};

const status = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body).realms[0];

/** Writes n events in batches of 100; returns [{id, seq}] as acked. */
async function write(d, prefix, n) {
  const out = [];
  for (let b = 0; b < n; b += 100) {
    const evs = Array.from({ length: Math.min(100, n - b) }, (_, i) => ({ id: `${prefix}-${b + i}`, type: "order.created", payload: { i: b + i } }));
    const a = await d.timeout(10000).emitWithAck("events", evs);
    assert.equal(a.ok, true);
    a.results.forEach((r, i) => { assert.equal(r.ok, true); out.push({ id: evs[i].id, seq: r.seq }); });
  }
  return out;
}

/** The stream holds exactly `acked`, once each by Nats-Msg-Id, in seq order. */
async function streamHasExactly(c, acked, ms = 60000) {
  await until(async () => (await countOn(c, UP)) >= acked.length, ms, `stream has ${acked.length} events`);
  // Give stragglers (a late duplicate) a moment to show.
  await sleep(300);
  const msgs = await readSubject(c, UP);
  const ids = msgs.map((m) => m.msgId);
  assert.equal(new Set(ids).size, ids.length, "no Nats-Msg-Id twice");
  assert.deepEqual(ids, acked.map((a) => `t-dev:s-dev:${a.id}`), "every LAN event exactly once, in seq order");
  assert.deepEqual(msgs.map((m) => m.hubSeq), acked.map((a) => a.seq), "Pos-Hub-Seq in seq order");
  assert.deepEqual(msgs.map((m) => m.data.id), acked.map((a) => a.id), "the payload is the event's JSON");
  return msgs;
}

test("cluster R3, both directions, /status, restart without duplicates", async () => {
  const c = await startCluster();
  let hub = await startHub({ env: natsEnv(c.urls()) });
  try {
    const d = device(hub, 0);
    await d.ready;
    const acked = await write(d, "lan", 250);
    const msgs = await streamHasExactly(c, acked);
    assert.equal(msgs[0].data.origin, "lan");
    const info = await streamInfo(c);
    assert.equal(info.config.num_replicas, 3, "created with 3 replicas");
    assert.deepEqual(info.config.subjects, ["poshub.>"]);
    assert.equal(info.cluster.replicas.length, 2, "a leader and two replicas");
    await until(async () => (await status(hub)).outboxDepth === 0, 10000, "outbox drained");
    const st = await status(hub);
    assert.equal(st.bridge.kind, "nats");
    assert.equal(st.bridge.state, "online");
    assert.equal(st.pushedCursor, acked.at(-1).seq);
    assert.equal(st.bridge.nats.stream, "POSHUB");
    assert.equal(st.bridge.nats.consumer, CONSUMER);
    assert.equal(st.bridge.nats.pendingAcks, 0);
    assert.match(st.bridge.nats.connectedServer, /^n[123] \(127\.0\.0\.1:\d+, nats-server 2\./);

    // Down: the chain publishes; every device gets each event once, origin cloud.
    await publishDown(c, DOWN, [
      { id: "web-1", type: "order.online", payload: { from: "web" }, deviceId: "backoffice" },
      { id: "web-2", type: "menu.changed", payload: {} },
      { id: "web-1", type: "order.online", payload: { from: "web" } }, // a redelivery / republish
    ]);
    await until(() => d.got.filter((e) => e.origin === "cloud").length === 2, 10000, "cloud events on the device");
    const cloud = d.got.filter((e) => e.origin === "cloud");
    assert.deepEqual(cloud.map((e) => e.id), ["web-1", "web-2"]);
    assert.equal(cloud[0].deviceId, "backoffice");
    assert.equal(cloud[1].deviceId, "cloud");
    await until(async () => { const ci = await consumerInfo(c, CONSUMER); return ci.num_ack_pending === 0 && ci.num_pending === 0; }, 10000, "down messages acked");
    assert.equal((await status(hub)).bridge.pulled, 2);
    // Cloud events are not sent back up.
    await sleep(500);
    assert.equal((await readSubject(c, UP)).length, acked.length);
    d.close();

    // A restart resumes from the stream's position: nothing twice, the rest follows.
    await hub.stop();
    hub = await startHub({ dataDir: hub.dataDir, port: hub.port, env: natsEnv(c.urls()) });
    const d2 = device(hub, undefined);
    await d2.ready;
    const more = await write(d2, "after", 50);
    await streamHasExactly(c, [...acked, ...more]);
    await sleep(500);
    assert.equal(d2.got.filter((e) => e.origin === "cloud").length, 0, "down messages are not taken twice after a restart");
    d2.close();
  } finally { await hub.stop(); await c.stopAll(); }
});

/** A cluster with the stream, and a hub pushing `n` events to it, paced (1,500/s) so the
 *  push is still going when the test breaks something; resolves once 500 are pushed. */
async function pacedPush(n) {
  const c = await startCluster();
  await createStream(c);
  const hub = await startHub({ env: natsEnv(c.urls(), { CLOUD_PUSH_MAX_RATE: "1500", CLOUD_PUSH_BUSY_RATE: "1500" }) });
  try {
    const d = device(hub, undefined);
    await d.ready;
    const acked = await write(d, "a", n);
    await until(async () => (await status(hub)).pushedCursor > 500, 20000, "push under way");
    return { c, hub, d, acked };
  } catch (e) { await hub.stop(); await c.stopAll(); throw e; }
}

test("the stream leader killed during a push, then restarted", async () => {
  const { c, hub, d, acked } = await pacedPush(4000);
  try {
    const leader = await leaderOf(c);
    assert.ok(leader >= 0, "a stream leader");
    await c.stop(leader, "SIGKILL");
    const atKill = (await status(hub)).pushedCursor;
    assert.ok(atKill < acked.at(-1).seq, "killed mid-push");
    // LAN acks do not wait for the cluster.
    const t0 = Date.now();
    const more = await write(d, "b", 200);
    assert.ok(Date.now() - t0 < 5000, "LAN acks never wait");
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    await sleep(3000);
    c.start(leader);
    await streamHasExactly(c, [...acked, ...more], 90000);
    const st = await status(hub);
    assert.notEqual(st.bridge.nats.connectedServer, null);
    report(hub, "leader killed");
    d.close();
  } finally { await hub.stop(); await c.stopAll(); }
});

test("all three servers restarted during a push", async () => {
  const { c, hub, d, acked } = await pacedPush(3000);
  try {
    await c.stopAll("SIGTERM");
    await until(async () => (await status(hub)).bridge.state === "offline", 10000, "bridge offline");
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200, "healthy while the cluster is away");
    const more = await write(d, "b", 100);
    for (let i = 0; i < 3; i++) c.start(i);
    await streamHasExactly(c, [...acked, ...more], 90000);
    report(hub, "all restarted");
    d.close();
  } finally { await hub.stop(); await c.stopAll(); }
});

test("the hub SIGKILLed mid-push; a duplicate window of 2 s and a hub down longer than it", async () => {
  const c = await startCluster();
  await createStream(c, { duplicateWindowMs: 2000 });
  // Unpaced: the pipeline is full when the hub dies, so PubAcks are in flight.
  const env = natsEnv(c.urls(), { CLOUD_PUSH_MAX_RATE: "1000000", CLOUD_PUSH_BUSY_RATE: "1000000" });
  let hub = await startHub({ env: { ...env, CLOUD_BRIDGE_URL: "nats://127.0.0.1:1" } });
  let logs = "";
  const upCount = () => countOn(c, UP);
  try {
    // Events wait in the outbox while the cluster is unreachable.
    const d = device(hub, undefined);
    await d.ready;
    const all = await write(d, "a", 12000);
    d.close();
    await hub.stop();
    // Killed twice mid-push, each time away for longer than the duplicate window:
    // only the stream itself can say where the push really got to.
    for (let round = 0; round < 2; round++) {
      const n0 = await upCount();
      hub = await startHub({ dataDir: hub.dataDir, port: hub.port, env });
      await until(async () => (await upCount()) > n0 + 300, 30000, "push under way");
      hub.child.kill("SIGKILL");
      await hub.waitExit(5000);
      logs += hub.log();
      assert.ok((await upCount()) < all.length, "killed mid-push");
      await sleep(3000);
    }
    hub = await startHub({ dataDir: hub.dataDir, port: hub.port, env });
    await streamHasExactly(c, all, 120000);
    assert.match(logs + hub.log(), /PubAcks were lost; cursor moved/, "after a SIGKILL the stream held events past the saved cursor, found by reading the stream");
  } finally { await hub.stop(); await c.stopAll(); }
});

test("a proxy drops the connection right after a publish: the lost PubAck", async () => {
  const c = await startCluster();
  await createStream(c);
  const proxy = await startProxy(c.nodes[0].port, { cutAfter: 120, cuts: 3 });
  const hub = await startHub({ env: natsEnv(proxy.url) });
  try {
    const d = device(hub, undefined);
    await d.ready;
    const acked = await write(d, "a", 2500);
    await until(() => proxy.cut >= 3, 60000, "three cuts");
    await streamHasExactly(c, acked);
    assert.ok(proxy.conns >= 4, `the hub reconnected after each cut (${proxy.conns} connections)`);
    assert.match(hub.log(), /PubAcks were lost; cursor moved/, "the stored-but-unacknowledged publish was found in the stream, not sent again");
    d.close();
  } finally { report(hub, `proxy: ${proxy.cut} cuts, ${proxy.conns} connections, ${proxy.pubs} publishes`); await hub.stop(); await proxy.stop(); await c.stopAll(); }
});

test("hostile down messages are refused and not redelivered; good ones arrive once", async () => {
  const c = await startCluster();
  await createStream(c);
  const hub = await startHub({ env: natsEnv(c.urls()) });
  try {
    const d = device(hub, undefined);
    await d.ready;
    const big = "x".repeat(70 * 1024);
    await publishDown(c, DOWN, [
      "{not json",
      "[1,2,3]",
      "\"a string\"",
      { type: "t", payload: {} }, // no id
      { id: "other", type: "t", payload: {}, tenantId: "t-other", storeId: "s-dev" }, // another realm
      { id: "huge", type: "t", payload: { big } }, // payload over 64 KiB
      "{\"id\":\"vast\",\"type\":\"t\",\"payload\":\"" + "y".repeat(300 * 1024) + "\"}", // message over 256 KiB
      { id: "bad id!", type: "t", payload: {} },
      { id: "ok-1", type: "t", payload: { fine: true } },
    ]);
    await until(() => d.got.some((e) => e.id === "ok-1"), 10000, "the good message");
    await until(async () => (await status(hub)).bridge.refusedFromCloud >= 8, 10000, "refusals counted");
    await until(async () => { const ci = await consumerInfo(c, CONSUMER); return ci.num_ack_pending === 0 && ci.num_pending === 0; }, 10000, "every message settled");
    await sleep(1500);
    const ci = await consumerInfo(c, CONSUMER);
    assert.equal(ci.num_redelivered, 0, "refused messages are terminated, not redelivered");
    assert.deepEqual(d.got.map((e) => e.id), ["ok-1"]);
    const st = await status(hub);
    assert.equal(st.lastSeq, 1);
    assert.equal(st.bridge.refusedFromCloud, 8);
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    d.close();
  } finally { await hub.stop(); await c.stopAll(); }
});
