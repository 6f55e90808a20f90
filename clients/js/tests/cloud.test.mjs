// Cloud fallback end to end: no hub answers, so the till's outbox goes to the reference cloud
// (pos-cloud-ref) with an Idempotency-Key; an event type the cloud refuses is kept as
// rejected. Then the hub comes back with its bridge: it pulls those events down, the till
// resends them to the hub with the same ids, and the hub stores each exactly once, in the
// till's record order; another device receives each once.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { HubClient } from "../dist/node.js";
import { procs, tmp, startHub, mint, until, readLog, startCloud } from "./helpers.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

test("no hub: the outbox goes to the cloud; hub back with its bridge: stored once, in order, seen once", async () => {
  const cloud = await startCloud({ tokens: ["bridge-secret", "device-secret"], reject: ["bad.type"] });
  const env = { TLS: "off", CLOUD_BRIDGE_URL: `${cloud.url}/v1/events/ingest`, CLOUD_BRIDGE_TOKEN: "bridge-secret", CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "1s", CLOUD_FEED_WAIT: "1s" };
  let hub = await startHub({ env });
  const { dataDir, port } = hub;
  await hub.stop();
  const url = `http://127.0.0.1:${port}`;
  const till = new HubClient({ token: mint(dataDir, "till-cloud"), hubs: [url], storage: { dir: path.join(tmp("sdk-cloud"), "s") }, cloud: { url: cloud.url, token: "device-secret", after: 1000 }, timeout: 2000, backoffMax: 500 });
  const states = [];
  till.on("status", (s) => states.push(s.state));
  await till.start();
  const ids = [];
  for (let i = 0; i < 30; i++) ids.push((await till.record("order.created", { i })).id);
  const bad = (await till.record("bad.type", { no: true })).id;
  await till.drained();
  let st = till.status();
  assert.equal(st.state, "cloud");
  assert.equal(st.outbox, 0);
  assert.equal(st.cloudOnly, 30);
  assert.equal(st.rejected, 1);
  assert.deepEqual(till.rejected().map((r) => [r.id, r.code]), [[bad, "cloud_rejected"]]);
  const inCloud = (await cloud.events()).filter((e) => e.deviceId === "till-cloud");
  assert.deepEqual(inCloud.map((e) => e.id), ids, "the cloud holds each event once, in record order");

  hub = await startHub({ dataDir, port, env });
  await until(() => till.status().state === "hub" && till.status().cloudOnly === 0, 20000, "till back on the hub, cloud-only events confirmed");
  for (let i = 30; i < 40; i++) ids.push((await till.record("order.created", { i })).id);
  await till.drained();

  const checker = mint(dataDir, "checker");
  const mine = await until(async () => { const l = (await readLog(url, checker)).filter((e) => e.deviceId === "till-cloud"); return l.length >= 40 && l; }, 20000, "40 events in the hub");
  await new Promise((r) => setTimeout(r, 2500)); // let the bridge pull/push once more: nothing may double
  const log = (await readLog(url, checker)).filter((e) => e.deviceId === "till-cloud");
  assert.deepEqual(log.map((e) => e.id), ids, "each event stored once, in record order");
  assert.equal(mine.length, 40);
  assert.ok(!log.some((e) => e.id === bad), "the refused event was not resent to the hub");
  console.log(`origins in the hub: ${JSON.stringify(log.reduce((m, e) => ((m[e.origin] = (m[e.origin] ?? 0) + 1), m), {}))}`);
  const cloudIds = (await cloud.events()).filter((e) => e.deviceId === "till-cloud").map((e) => e.id);
  assert.equal(new Set(cloudIds).size, cloudIds.length, "the cloud holds each id once");

  // Another device sees each once.
  const kitchen = new HubClient({ token: mint(dataDir, "kitchen"), hubs: [url], storage: { dir: path.join(tmp("sdk-kitchen"), "s") } });
  const got = [];
  kitchen.on("event", (e) => { if (e.deviceId === "till-cloud") got.push(e.id); });
  await kitchen.start();
  await until(() => got.length >= 40, 10000, "kitchen received 40");
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(got, ids);
  assert.ok(states.includes("cloud") && states.at(-1) === "hub", states.join(","));
  await kitchen.stop();
  await till.stop();
  await hub.stop();
  await cloud.stop();
});
