// The hub's own WebSocket transport (hub/src/link/ws.rs): a device that opens a WebSocket
// straight away (`/socket.io/?EIO=4&transport=websocket`, no sid) is served by it; long-polling
// and its upgrade stay with engineioxide. Raw `ws` clients speak Engine.IO by hand here, so the
// wire is checked byte for byte; the official clients use it in every other test.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import WebSocket from "ws";
import { io } from "socket.io-client";
import { HUB, procs, startHub, sleep, httpGet } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

const mint = (hub, device) => execFileSync(HUB, ["token", "mint", "--key", path.join(hub.dataDir, "dev", "cluster-key.pem"),
  "--tenant", "t-dev", "--store", "s-dev", "--device", device, "--role", "till", "--ttl=1h"], { encoding: "utf8" }).trim();

/** A raw WebSocket that records every message and when the connection closed. */
function raw(hub, { pong = true } = {}) {
  const ws = new WebSocket(`ws://127.0.0.1:${hub.port}/socket.io/?EIO=4&transport=websocket`);
  ws.msgs = []; ws.pings = 0; ws.t0 = performance.now();
  ws.on("error", () => {});
  ws.on("message", (m, binary) => {
    const s = String(m);
    if (!binary && s === "2") { ws.pings++; if (pong) ws.send("3"); return; }
    ws.msgs.push(s);
  });
  ws.closedAt = new Promise((res) => ws.once("close", () => res(performance.now() - ws.t0)));
  ws.next = async (pred, ms = 5000) => {
    const until = performance.now() + ms;
    while (performance.now() < until) {
      const i = ws.msgs.findIndex(pred);
      if (i >= 0) return ws.msgs.splice(i, 1)[0];
      await sleep(10);
    }
    throw new Error(`no matching message in ${ms} ms; got ${JSON.stringify(ws.msgs.slice(0, 5))}`);
  };
  return ws;
}

test("a direct WebSocket: Engine.IO open packet, Socket.IO connect, events, acks and fan-out as the protocol has them", async () => {
  const hub = await startHub({ env: { TLS: "off" } });
  const a = raw(hub), b = raw(hub);
  const open = JSON.parse((await a.next((m) => m.startsWith("0"))).slice(1));
  assert.equal(typeof open.sid, "string");
  assert.deepEqual(open.upgrades, []);
  assert.equal(open.pingInterval, 25000);
  assert.equal(open.pingTimeout, 20000);
  assert.equal(open.maxPayload, 8 << 20);
  await b.next((m) => m.startsWith("0"));
  a.send(`40${JSON.stringify({ token: mint(hub, "raw-a") })}`);
  b.send(`40${JSON.stringify({ token: mint(hub, "raw-b") })}`);
  const ok = JSON.parse((await a.next((m) => m.startsWith("40"))).slice(2));
  assert.equal(typeof ok.sid, "string");
  await a.next((m) => m.startsWith('42["synced"'));
  await b.next((m) => m.startsWith('42["synced"'));
  // An event with ack id 7: the ack is `437[...]`; b gets the event, a does not get its own.
  a.send(`427${JSON.stringify(["event", { id: "raw-1", type: "order.created", payload: { n: 1 } }])}`);
  const ack = JSON.parse((await a.next((m) => m.startsWith("437"))).slice(3));
  assert.equal(ack[0].ok, true);
  const fan = JSON.parse((await b.next((m) => m.startsWith('42["event"'))).slice(2));
  assert.equal(fan[1].id, "raw-1");
  assert.equal(fan[1].seq, ack[0].seq);
  await sleep(200);
  assert.equal(a.msgs.filter((m) => m.includes("raw-1")).length, 0, "the sender is not echoed");
  // A text message that is not Engine.IO closes that connection only.
  b.send("9nonsense");
  const closedIn = await b.closedAt;
  assert.ok(closedIn > 0);
  a.send(`428${JSON.stringify(["event", { id: "raw-2", type: "order.created", payload: {} }])}`);
  assert.equal(JSON.parse((await a.next((m) => m.startsWith("438"))).slice(3))[0].ok, true);
  a.close();
  // The official client, long-polling then upgrading, still goes through engineioxide, beside it.
  const c = io(`http://127.0.0.1:${hub.port}`, { transports: ["polling", "websocket"], auth: { token: mint(hub, "poll") }, reconnection: false });
  await new Promise((res, rej) => { c.on("synced", res); c.on("connect_error", rej); });
  const r = await c.timeout(5000).emitWithAck("event", { id: "poll-1", type: "order.created", payload: {} });
  assert.equal(r.ok, true);
  c.close();
  await hub.stop();
});

test("Engine.IO heartbeat on a direct WebSocket: a ping every 25 s; a device that never answers is closed once its pong is 20 s late", async () => {
  const hub = await startHub({ env: { TLS: "off" } });
  const good = raw(hub), mute = raw(hub, { pong: false });
  for (const [ws, d] of [[good, "hb-good"], [mute, "hb-mute"]]) {
    await ws.next((m) => m.startsWith("0"));
    ws.send(`40${JSON.stringify({ token: mint(hub, d) })}`);
    await ws.next((m) => m.startsWith('42["synced"'));
  }
  const closedIn = await Promise.race([mute.closedAt, sleep(70_000).then(() => null)]);
  assert.ok(closedIn !== null, "the device that never answered a ping is still connected after 70 s");
  // Not before the first ping (25 s) plus its pong's 20 s.
  assert.ok(closedIn >= 44_000, `closed after ${closedIn} ms, before the ping and its timeout`);
  assert.ok(mute.pings >= 1);
  assert.ok(good.pings >= 1);
  assert.equal(good.readyState, WebSocket.OPEN, "the device that answers stays connected");
  const st = JSON.parse((await httpGet(hub.port, "/status")).body);
  const devs = st.realms[0].devices.map((d) => d.deviceId);
  assert.ok(devs.includes("hb-good") && !devs.includes("hb-mute"), JSON.stringify(devs));
  good.close();
  await hub.stop();
});
