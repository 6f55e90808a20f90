// A full data partition (issue 16): the real hub with its data directory on a small ext4
// file system of its own (a 48 MiB file, mkfs.ext4, mounted through a loop device; needs
// root, as CI has), the official socket.io-client as devices and the reference cloud
// (pos-cloud-ref) as the bridge's peer. The partition is filled with a real file until
// ENOSPC while devices write; everything on 127.0.0.1.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { io } from "socket.io-client";
import { HUB, procs, tmp, httpGet, sleep, freePort } from "../lib/hub.mjs";
import { CLOUD_TOKEN as TOKEN, startCloud, device as connectDevice, until } from "../lib/cloud.mjs";

const mounts = [];
after(() => {
  for (const p of procs) try { p.kill("SIGKILL"); } catch {}
  for (const m of mounts) spawnSync("umount", ["-l", m]);
});
const isRoot = process.getuid && process.getuid() === 0;

/** A fresh ext4 file system of `mib` MiB mounted on a new directory (loop device). */
function smallPartition(mib) {
  const dir = tmp("fullfs");
  const img = path.join(dir, "data.img");
  const mnt = path.join(dir, "mnt");
  fs.writeFileSync(img, "");
  fs.truncateSync(img, mib << 20);
  execFileSync("mkfs.ext4", ["-q", "-F", "-L", "posdata", img]);
  fs.mkdirSync(mnt);
  execFileSync("mount", ["-o", "loop", img, mnt]);
  mounts.push(mnt);
  return mnt;
}

/** Fills the file system holding `dir` to the last block with real files (dd until ENOSPC). */
function fill(dir, tag = "") {
  const files = [];
  for (const bs of ["1M", "4k", "512"]) {
    const f = path.join(dir, `filler${tag}-${bs}`);
    const r = spawnSync("dd", ["if=/dev/zero", `of=${f}`, `bs=${bs}`, "conv=fsync"], { encoding: "utf8" });
    assert.match(r.stderr, /No space left on device/, `dd ${bs} should stop at ENOSPC: ${r.stderr}`);
    files.push(f);
  }
  execFileSync("sync");
  return files;
}

function startHubRaw({ dataDir, port, env }) {
  const child = spawn(HUB, ["serve", "--dev", "--data-dir", dataDir, "--port", String(port)], {
    env: { ...process.env, MDNS: "off", NTP_SERVERS: "off", RUST_LOG: "info", TLS: "off", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  procs.add(child);
  let log = ""; child.stderr.on("data", (d) => (log += d));
  const exited = new Promise((r) => child.on("exit", (code) => { procs.delete(child); r(code); }));
  return { child, port, dataDir, log: () => log, exited, stop: async () => { child.kill("SIGTERM"); return Promise.race([exited, sleep(15000).then(() => "timeout")]); } };
}

/** Waits until /healthz answers at all (200, or 503 with a reason). */
async function answering(hub, ms = 20000) {
  const end = Date.now() + ms;
  for (;;) {
    if (hub.child.exitCode !== null) throw new Error(`hub exited: ${hub.log()}`);
    try { return await httpGet(hub.port, "/healthz"); } catch {}
    if (Date.now() > end) throw new Error(`hub does not answer: ${hub.log()}`);
    await sleep(100);
  }
}

function device(hub, since) {
  const token = fs.readFileSync(path.join(hub.dataDir, "dev-token.txt"), "utf8").trim();
  return connectDevice(io, hub, { token, since, timeout: 5000, readyMs: 15000 });
}

const status = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body);
const payload = (i) => ({ i, note: "x".repeat(1000) });

/** Every acked event, and nothing else, comes back to a device catching up from 0. */
async function catchUpHasExactly(hub, acked) {
  const d = device(hub, 0);
  const synced = await d.ready;
  d.close();
  assert.deepEqual(d.got.map((e) => e.id), acked.map((a) => a.id), "catch-up returns every acked event in order");
  assert.deepEqual(d.got.map((e) => e.seq), acked.map((a) => a.seq));
  return synced;
}

test("a full data partition: storage_full refusals, nothing acked lost, reads and the bridge keep working, recovers by itself", { skip: !isRoot && "needs root for mount -o loop (CI runs as root)", timeout: 170000 }, async () => {
  const mnt = smallPartition(48);
  const cloudPort = await freePort();
  const env = { CLOUD_BRIDGE_URL: `http://127.0.0.1:${cloudPort}/v1/events/ingest`, CLOUD_BRIDGE_TOKEN: TOKEN, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "1s", CLOUD_FEED_WAIT: "1s" };
  // A clock file from an earlier run (the hub rewrites it at every shutdown).
  const clockBefore = `${Math.floor(Date.now() / 1000) - 100}\n`;
  fs.writeFileSync(path.join(mnt, "clock.txt"), clockBefore);
  let hub = startHubRaw({ dataDir: mnt, port: await freePort(), env });
  assert.equal((await answering(hub)).status, 200);
  const tokenBefore = fs.readFileSync(path.join(mnt, "dev-token.txt"), "utf8");
  const keyBefore = fs.readFileSync(path.join(mnt, "dev", "cluster-key.pem"), "utf8");

  // The cloud is unreachable for now: everything stays in the outbox.
  const till = device(hub);
  await till.ready;
  const acked = [];
  for (let i = 0; i < 100; i++) {
    const a = await till.timeout(5000).emitWithAck("event", { id: `pre-${i}`, type: "order.created", payload: payload(i) });
    assert.equal(a.ok, true, JSON.stringify(a));
    acked.push({ id: `pre-${i}`, seq: a.seq });
  }

  const fillers = fill(mnt);
  // Devices keep writing: SQLite may still reuse WAL space for a while, then refuses.
  let refusal;
  for (let i = 0; i < 5000 && !refusal; i++) {
    const id = `full-${i}`;
    const a = await till.timeout(5000).emitWithAck("event", { id, type: "order.created", payload: payload(i) });
    if (a.ok) acked.push({ id, seq: a.seq });
    else refusal = a.error;
  }
  assert.ok(refusal, "the hub never refused an event on a full partition");
  assert.equal(refusal.code, "storage_full", JSON.stringify(refusal));
  console.log(`# ${acked.length} events acked before the partition was full; refusal: ${refusal.message}`);
  // A batch is refused event by event with the same code.
  const batch = await till.timeout(5000).emitWithAck("events", [1, 2, 3].map((i) => ({ id: `b-${i}`, type: "t", payload: payload(i) })));
  assert.deepEqual(batch.results.map((r) => r.error?.code), ["storage_full", "storage_full", "storage_full"]);

  const hz = await httpGet(hub.port, "/healthz");
  assert.equal(hz.status, 503);
  assert.match(hz.body, /storage_full/);
  const st = await status(hub);
  assert.equal(st.realms[0].storageFull, true);
  assert.equal(st.realms[0].healthy, false);
  assert.ok(st.system.dataWarning, "the 80% warning is shown");
  assert.ok(st.system.dataUsedPercent >= 80, JSON.stringify(st.system));
  const metrics = (await httpGet(hub.port, "/metrics")).body;
  assert.match(metrics, /poshub_storage_full\{tenant="t-dev",store="s-dev"\} 1/);
  assert.match(metrics, /poshub_data_fill_warning 1/);

  // Reads keep working: catch-up from 0, sync pages, /status (above).
  await catchUpHasExactly(hub, acked);
  const page = await till.timeout(5000).emitWithAck("sync", { since: 0, limit: 50 });
  assert.equal(page.ok, true);
  assert.deepEqual(page.events.map((e) => e.id), acked.slice(0, 50).map((a) => a.id));

  // The bridge keeps pushing: the cloud comes up while the partition is still full.
  const cloud = await startCloud({ port: cloudPort });
  await until(async () => (await cloud.events()).length >= acked.length, 30000, "the cloud got every acked event while the hub's disk is full");
  assert.deepEqual((await cloud.events()).map((e) => e.id), acked.map((a) => a.id));
  assert.equal((await status(hub)).realms[0].outboxDepth, 0);
  assert.equal(hub.child.exitCode, null, "the hub is still the same process");

  // A restart on the full partition comes up (no restart loop), says why, serves reads.
  till.close();
  assert.notEqual(await hub.stop(), "timeout");
  // Shutting down folded and truncated the WAL, which gave a little space back:
  // fill that too, so the restart meets a partition with no room at all.
  fillers.push(...fill(mnt, "again"));
  hub = startHubRaw({ dataDir: mnt, port: await freePort(), env });
  const hz2 = await answering(hub);
  assert.equal(hz2.status, 503, hz2.body);
  assert.match(hz2.body, /storage_full/);
  await catchUpHasExactly(hub, acked);
  const till2 = device(hub);
  await till2.ready;
  const r2 = await till2.timeout(5000).emitWithAck("event", { id: "after-restart", type: "t", payload: payload(0) });
  assert.equal(r2.error?.code, "storage_full", JSON.stringify(r2));

  // The hub's small files were left whole: the clock file is written at every shutdown,
  // the dev tokens at every start (the store CA and update state use the same
  // write_atomic, whose failure path a unit test covers).
  assert.match(hub.log(), /cannot save the dev token/);
  assert.equal(fs.readFileSync(path.join(mnt, "dev-token.txt"), "utf8"), tokenBefore);
  assert.equal(fs.readFileSync(path.join(mnt, "dev", "cluster-key.pem"), "utf8"), keyBefore);
  assert.equal(fs.readFileSync(path.join(mnt, "clock.txt"), "utf8"), clockBefore, "the failed clock save left the old file");
  const leftovers = execFileSync("find", [mnt, "-name", "*.tmp"], { encoding: "utf8" }).trim();
  assert.equal(leftovers, "", "no temporary file left behind");

  // Space comes back: the hub notices by itself (no device writing), then takes events.
  for (const f of fillers) fs.rmSync(f);
  const t0 = Date.now();
  await until(async () => (await httpGet(hub.port, "/healthz")).status === 200, 20000, "/healthz ok again after space was freed");
  const healthyMs = Date.now() - t0;
  const a = await till2.timeout(5000).emitWithAck("event", { id: "after-free", type: "t", payload: payload(0) });
  const eventMs = Date.now() - t0;
  assert.equal(a.ok, true, JSON.stringify(a));
  acked.push({ id: "after-free", seq: a.seq });
  console.log(`# recovery after space was freed: /healthz ok after ${healthyMs} ms, first event acked after ${eventMs} ms`);
  assert.equal((await status(hub)).realms[0].storageFull, false);
  await catchUpHasExactly(hub, acked);
  await until(async () => (await cloud.events()).length === acked.length, 20000, "the cloud got the event written after recovery");
  till2.close();
  assert.notEqual(await hub.stop(), "timeout");
});
