// Issue 5, UPS-aware shutdown, against Debian's real nut-server (upsd + the dummy-ups
// driver, whose status file the test steps through) and a fake power_supply directory.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { io } from "socket.io-client";
import { procs, tmp, freePort, httpGet, startHub, sleep } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const NUT = fs.existsSync("/lib/nut/upsd") && fs.existsSync("/lib/nut/dummy-ups");

/** Starts upsd and dummy-ups on a free loopback port; returns a setter for ups.status. */
async function startNut(initial = "OL") {
  const dir = tmp("nut");
  const port = await freePort();
  const dev = path.join(dir, "dummy.dev");
  fs.writeFileSync(path.join(dir, "ups.conf"), `[dummy]\n  driver = dummy-ups\n  port = ${dev}\n  desc = "test"\n`);
  fs.writeFileSync(path.join(dir, "upsd.conf"), `LISTEN 127.0.0.1 ${port}\n`);
  fs.writeFileSync(path.join(dir, "upsd.users"), "", { mode: 0o600 });
  fs.writeFileSync(path.join(dir, "nut.conf"), "MODE=standalone\n");
  fs.mkdirSync(path.join(dir, "state"), { mode: 0o755 });
  // dummy-ups re-reads its file when the mtime (whole seconds) changes: two states set
  // within one second would look like one, so every state gets a later second.
  let mtime = Math.floor(Date.now() / 1000);
  const set = (status) => {
    fs.writeFileSync(dev + ".tmp", `ups.status: ${status}\nbattery.charge: 50\n`);
    mtime = Math.max(mtime + 1, Math.floor(Date.now() / 1000));
    fs.utimesSync(dev + ".tmp", mtime, mtime);
    fs.renameSync(dev + ".tmp", dev);
  };
  set(initial);
  const env = { ...process.env, NUT_CONFPATH: dir, NUT_STATEPATH: path.join(dir, "state") };
  const drv = spawn("/lib/nut/dummy-ups", ["-a", "dummy", "-u", "root", "-F"], { env, stdio: "ignore" });
  procs.add(drv);
  await sleep(500);
  const upsd = spawn("/lib/nut/upsd", ["-u", "root", "-F"], { env, stdio: "ignore" });
  procs.add(upsd);
  for (let i = 0; i < 50; i++) {
    if (await nutAnswers(port)) break;
    await sleep(100);
  }
  return { port, set, stop: () => { drv.kill("SIGKILL"); upsd.kill("SIGKILL"); } };
}

function nutAnswers(port) {
  return new Promise((res) => {
    const s = net.connect(port, "127.0.0.1", () => s.write("GET VAR dummy ups.status\n"));
    s.on("data", (d) => { s.destroy(); res(/^VAR dummy/.test(String(d))); });
    s.on("error", () => res(false));
    setTimeout(() => { s.destroy(); res(false); }, 1000);
  });
}

async function device(hub, since) {
  const s = io(`http://127.0.0.1:${hub.port}`, { transports: ["websocket"], auth: { token: hub.token, since }, reconnection: false });
  await new Promise((res, rej) => { s.on("synced", res); s.on("connect_error", rej); });
  return s;
}

async function waitFor(pred, ms, what) {
  const end = Date.now() + ms;
  while (Date.now() < end) { if (await pred()) return; await sleep(100); }
  throw new Error(`timed out waiting for ${what}`);
}

const status = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body);

test("NUT: OL -> OB -> OB LB shuts the hub down cleanly with every acked event on disk", { skip: !NUT && "nut-server not installed" }, async () => {
  const nut = await startNut("OL");
  const env = { TLS: "off", UPS_NUT: `dummy@127.0.0.1:${nut.port}`, UPS_POLL: "200ms", UPS_SHUTDOWN_AFTER: "10m", RUST_LOG: process.env.HUB_RUST_LOG || "info" };
  const hub = await startHub({ env });
  try {
    const d = await device(hub, 0);
    const notices = [];
    d.on("hub.power", (n) => notices.push(n));
    const acked = [];
    for (let i = 0; i < 50; i++) acked.push(await d.timeout(5000).emitWithAck("event", { id: `p-${i}`, type: "t", payload: { i } }));
    assert.ok(acked.every((a) => a.ok));
    await waitFor(async () => (await status(hub)).power?.state === "online", 5000, "power online");
    nut.set("OB DISCHRG");
    await waitFor(() => notices.some((n) => n.state === "on_battery"), 10000, "hub.power on_battery");
    assert.equal((await status(hub)).power.state, "on_battery");
    // Events keep flowing on battery.
    acked.push(await d.timeout(5000).emitWithAck("event", { id: "p-onbatt", type: "t", payload: {} }));
    nut.set("OB LB");
    // Within UPS_POLL once upsd reports it; a upsd that stalls meanwhile counts as low
    // after the 15 s deadtime, so allow for that on a loaded machine.
    const code = await hub.waitExit(40000);
    assert.equal(code, 0, hub.log());
    assert.match(hub.log(), /power: shutting down before the battery dies/);
    assert.match(hub.log(), /stopped cleanly/);
    // Every acked event is on disk: a new hub on the same data replays them all.
    const again = await startHub({ dataDir: hub.dataDir, env: { TLS: "off" } });
    try {
      const r = await device(again, undefined);
      const page = await r.timeout(5000).emitWithAck("sync", { since: 0, limit: 1000 });
      assert.deepEqual(page.events.map((e) => e.id).sort(), acked.map((_, i) => (i < 50 ? `p-${i}` : "p-onbatt")).sort());
      r.close();
    } finally { await again.stop(); }
  } finally { nut.stop(); if (hub.child.exitCode === null) await hub.stop(); }
});

test("NUT: OL -> OB -> OL tells devices and does not shut down", { skip: !NUT && "nut-server not installed" }, async () => {
  const nut = await startNut("OL");
  const hub = await startHub({ env: { TLS: "off", UPS_NUT: `dummy@127.0.0.1:${nut.port}`, UPS_POLL: "200ms", UPS_SHUTDOWN_AFTER: "10m" } });
  try {
    const d = await device(hub, 0);
    const notices = [];
    d.on("hub.power", (n) => notices.push(n.state));
    await waitFor(async () => (await status(hub)).power?.state === "online", 5000, "online");
    nut.set("OB");
    await waitFor(() => notices.includes("on_battery"), 10000, "on_battery notice");
    nut.set("OL");
    await waitFor(() => notices.includes("online"), 10000, "online notice");
    await sleep(1500);
    assert.equal(hub.child.exitCode, null, "the hub must keep running");
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    d.close();
  } finally { nut.stop(); await hub.stop(); }
});

test("NUT: a UPS that stops answering while on battery counts as low", { skip: !NUT && "nut-server not installed" }, async () => {
  const nut = await startNut("OB");
  const hub = await startHub({ env: { TLS: "off", UPS_NUT: `dummy@127.0.0.1:${nut.port}`, UPS_POLL: "200ms", UPS_DEADTIME: "1s", UPS_SHUTDOWN_AFTER: "10m" } });
  try {
    await waitFor(async () => (await status(hub)).power?.state === "on_battery", 10000, "on battery");
    nut.stop();
    assert.equal(await hub.waitExit(15000), 0, hub.log());
    assert.match(hub.log(), /stopped answering while on battery/);
  } finally { if (hub.child.exitCode === null) await hub.stop(); }
});

test("garbage from a NUT server is reported, never a crash", async () => {
  const port = await freePort();
  const srv = net.createServer((c) => c.on("data", () => c.write("\u0000\u00ff garbage \"unterminated\nERR\n")));
  await new Promise((r) => srv.listen(port, "127.0.0.1", r));
  const hub = await startHub({ env: { TLS: "off", UPS_NUT: `dummy@127.0.0.1:${port}`, UPS_POLL: "200ms" } });
  try {
    await waitFor(async () => (await status(hub)).power?.lastError, 5000, "an error in /status");
    const st = await status(hub);
    assert.match(st.power.lastError, /unexpected answer|NUT error/);
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
    assert.equal(hub.child.exitCode, null);
  } finally { srv.close(); await hub.stop(); }
});

test("power_supply directory: on battery and low capacity shut down; back on mains cancels", async () => {
  const dir = tmp("ps");
  const ac = path.join(dir, "AC"), bat = path.join(dir, "BAT0");
  fs.mkdirSync(ac); fs.mkdirSync(bat);
  const w = (p, v) => fs.writeFileSync(p, v + "\n");
  w(path.join(ac, "type"), "Mains"); w(path.join(ac, "online"), "1");
  w(path.join(bat, "type"), "Battery"); w(path.join(bat, "status"), "Charging"); w(path.join(bat, "capacity"), "80");
  const hub = await startHub({ env: { TLS: "off", UPS_POWER_SUPPLY: dir, UPS_POLL: "200ms", UPS_SHUTDOWN_AFTER: "10m" } });
  try {
    await waitFor(async () => (await status(hub)).power?.state === "online", 5000, "online");
    w(path.join(ac, "online"), "0"); w(path.join(bat, "status"), "Discharging");
    await waitFor(async () => (await status(hub)).power?.state === "on_battery", 5000, "on battery");
    w(path.join(ac, "online"), "1"); w(path.join(bat, "status"), "Charging");
    await waitFor(async () => (await status(hub)).power?.state === "online", 5000, "back online");
    w(path.join(ac, "online"), "0"); w(path.join(bat, "status"), "Discharging"); w(path.join(bat, "capacity"), "10");
    assert.equal(await hub.waitExit(10000), 0, hub.log());
    assert.match(hub.log(), /battery is low/);
  } finally { if (hub.child.exitCode === null) await hub.stop(); }
});

test("a GPIO power-fail line that cannot be opened is reported, never a crash", async () => {
  // No gpio-sim on these machines: this checks the error path only (see README).
  const hub = await startHub({ env: { TLS: "off", UPS_GPIO: "gpiochip99:17", UPS_POLL: "200ms" } });
  try {
    await waitFor(async () => (await status(hub)).power?.lastError, 5000, "an error in /status");
    assert.match((await status(hub)).power.lastError, /GPIO \/dev\/gpiochip99:17/);
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
  } finally { assert.equal(await hub.stop(), 0); }
});
