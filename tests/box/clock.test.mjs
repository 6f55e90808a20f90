// Issue 5, the clock: measured against Debian's real chrony serving NTP on loopback
// (`local stratum 8`, `-x` so it never touches this machine's clock); an unreachable
// server and a corrupt clock file are reported in /status, never a crash.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { procs, tmp, freePort, httpGet, startHub, sleep } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const CHRONYD = spawnSync("sh", ["-c", "command -v chronyd"], { encoding: "utf8" }).stdout.trim();

async function startChrony() {
  const dir = tmp("chrony");
  const port = await freePort();
  const conf = path.join(dir, "chrony.conf");
  fs.writeFileSync(conf, `local stratum 8\nallow 127.0.0.1\nport ${port}\nbindaddress 127.0.0.1\ncmdport 0\npidfile ${dir}/chronyd.pid\ndriftfile ${dir}/drift\n`);
  const child = spawn(CHRONYD, ["-x", "-d", "-u", "root", "-f", conf], { stdio: "ignore" });
  procs.add(child);
  await sleep(1000);
  return { port, stop: () => child.kill("SIGTERM") };
}

const clockOf = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body).clock;
async function until(pred, ms, what) {
  const end = Date.now() + ms;
  while (Date.now() < end) { const v = await pred(); if (v) return v; await sleep(100); }
  throw new Error(`timed out: ${what}`);
}

test("SNTP against a real chrony: synced, with a measured offset", { skip: !CHRONYD && "chrony not installed" }, async () => {
  const ntp = await startChrony();
  const hub = await startHub({ env: { TLS: "off", NTP_SERVERS: `127.0.0.1:${ntp.port}`, NTP_INTERVAL: "1s" } });
  try {
    const c = await until(async () => { const c = await clockOf(hub); return c.state === "synced" && c; }, 10000, "synced");
    assert.equal(typeof c.offsetMs, "number");
    assert.ok(Math.abs(c.offsetMs) < 1000, `offset ${c.offsetMs} ms against a server on the same machine`);
    assert.equal(c.source, `127.0.0.1:${ntp.port}`);
    assert.equal(c.setsSystemClock, false, "a plain service only measures");
    assert.ok(c.floorSecs > 1700000000);
  } finally { await hub.stop(); ntp.stop(); }
});

test("an unreachable NTP server is reported, never a crash", async () => {
  const port = await freePort();
  const hub = await startHub({ env: { TLS: "off", NTP_SERVERS: `127.0.0.1:${port}`, NTP_INTERVAL: "1s" } });
  try {
    const c = await until(async () => { const c = await clockOf(hub); return c.lastError && c; }, 15000, "an error in /status");
    assert.match(c.lastError, /no usable NTP answer/);
    assert.notEqual(c.state, "synced");
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200);
  } finally { assert.equal(await hub.stop(), 0); }
});

test("a corrupt clock file is reported and rewritten; a saved time is the floor", async () => {
  const dataDir = tmp("data");
  fs.mkdirSync(dataDir, { recursive: true });
  fs.writeFileSync(path.join(dataDir, "clock.txt"), "\u0000garbage\n");
  const hub = await startHub({ dataDir, env: { TLS: "off" } });
  const c = await clockOf(hub);
  assert.match(c.lastError, /corrupt/);
  assert.equal(await hub.stop(), 0);
  const saved = Number(fs.readFileSync(path.join(dataDir, "clock.txt"), "utf8").trim());
  assert.ok(Math.abs(saved - Date.now() / 1000) < 60, "the time is saved at shutdown");
  // A saved time ahead of the system clock becomes the floor: the clock is known wrong.
  fs.writeFileSync(path.join(dataDir, "clock.txt"), `${Math.floor(Date.now() / 1000) + 86400}\n`);
  const again = await startHub({ dataDir, env: { TLS: "off" } });
  try {
    const c2 = await clockOf(again);
    assert.equal(c2.state, "floor");
    assert.ok(c2.floorSecs > Date.now() / 1000 + 80000);
  } finally { await again.stop(); }
});

test("no TLS certificate while the clock is known wrong; one is issued once NTP answers", { skip: !CHRONYD && "chrony not installed" }, async () => {
  const dataDir = tmp("data");
  fs.mkdirSync(dataDir, { recursive: true });
  // A last-known-good time a day ahead: this machine's clock is "behind its floor".
  fs.writeFileSync(path.join(dataDir, "clock.txt"), `${Math.floor(Date.now() / 1000) + 86400}\n`);
  const ntpPort = await freePort();
  const hub = await startHub({ dataDir, env: { NTP_SERVERS: `127.0.0.1:${ntpPort}`, NTP_INTERVAL: "1s", TLS_CHECK_INTERVAL: "1s" } });
  let ntp;
  try {
    assert.equal((await httpGet(hub.port, "/healthz")).status, 200, "plain /healthz still answers");
    const curl = (await import("node:child_process")).spawnSync("curl", ["-sS", "-k", `https://127.0.0.1:${hub.port}/healthz`], { encoding: "utf8" });
    assert.notEqual(curl.status, 0, "no certificate may be served while the clock is known wrong");
    assert.match(hub.log(), /no TLS certificate is issued/);
    // chrony answers on that port now; once measured, the leaf follows.
    const dir = tmp("chrony");
    const conf = path.join(dir, "chrony.conf");
    fs.writeFileSync(conf, `local stratum 8\nallow 127.0.0.1\nport ${ntpPort}\nbindaddress 127.0.0.1\ncmdport 0\npidfile ${dir}/chronyd.pid\ndriftfile ${dir}/drift\n`);
    ntp = spawn(CHRONYD, ["-x", "-d", "-u", "root", "-f", conf], { stdio: "ignore" });
    procs.add(ntp);
    await until(async () => (await import("node:child_process")).spawnSync("curl", ["-sS", "-k", `https://127.0.0.1:${hub.port}/healthz`], { encoding: "utf8" }).status === 0, 20000, "TLS after NTP");
    const st = JSON.parse((await import("node:child_process")).spawnSync("curl", ["-sS", "-k", `https://127.0.0.1:${hub.port}/status`], { encoding: "utf8" }).stdout);
    assert.equal(st.clock.state, "synced");
  } finally { await hub.stop(); ntp?.kill("SIGTERM"); }
});
