// Helpers for the image tests: a private copy of the built image (optionally a bigger
// "card" and a different hub.env), booted by scripts/run-qemu (the project's Pi
// bootloader stand-in) with the hub's port forwarded to a free loopback port.
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import http from "node:http";
import https from "node:https";
import net from "node:net";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";

const here = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(here, "../..");
export const IMAGE = process.env.POS_HUB_IMAGE;
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** IMAGE_TEST_TIME_SCALE stretches every console/healthz wait (not a figure: a guard
 * against a machine so loaded that QEMU's TCG guest runs several times slower). */
export const SCALE = Math.max(1, Number(process.env.IMAGE_TEST_TIME_SCALE || 1));
const boxes = new Set();
const scratch = [];
process.on("exit", () => {
  for (const b of boxes) b.killNow();
  // Cards are 100s of MiB each: they go with the test file (POSHUB_KEEP_TMP=1 keeps them).
  if (process.env.POSHUB_KEEP_TMP !== "1") for (const d of scratch) try { fs.rmSync(d, { recursive: true, force: true, maxRetries: 3 }); } catch {}
});

/** A scratch dir under $TMPDIR, removed when the test file's process exits. */
export function scratchDir(name) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `poshub-${name}-`));
  scratch.push(d);
  return d;
}

export async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
}

/** Byte offset of MBR partition `n` of an image file. */
export function partOffset(img, n) {
  const out = execFileSync("sfdisk", ["-J", img], { encoding: "utf8" });
  return JSON.parse(out).partitiontable.partitions[n - 1].start * 512;
}

/** An ed25519 claim key of the test's own and a minter of tokens it signs (the cloud's
 * part), for a box with `CLAIM_PUBLIC_KEY_BASE64` in its hub.env. `dir` is scratch. */
export function claimKit(tenant = "t-abc", store = "s-001") {
  const HUB = process.env.POS_HUB_BIN;
  assert.ok(HUB, "POS_HUB_BIN is not set (scripts/test-image sets it): it mints the tokens");
  const dir = scratchDir("claim");
  const priv = path.join(dir, "k.pem"), pub = path.join(dir, "k.pub.pem");
  execFileSync("openssl", ["genpkey", "-algorithm", "ed25519", "-out", priv]);
  execFileSync("openssl", ["pkey", "-in", priv, "-pubout", "-out", pub]);
  const mint = (role, device = "setup") => execFileSync(HUB, ["token", "mint", "--key", priv, "--tenant", tenant, "--store", store, "--device", device, "--role", role, "--ttl=1h"], { encoding: "utf8" }).trim();
  return { dir, mint, pubB64: fs.readFileSync(pub).toString("base64") };
}

/** A private copy of the image, grown to `sizeMiB` (a bigger card), with `hubEnv` written
 * into the settings partition when given. */
export function cardFrom(image, { sizeMiB = 384, hubEnv } = {}) {
  const dir = scratchDir("card");
  const card = path.join(dir, "card.img");
  execFileSync("cp", ["--sparse=always", image, card]);
  fs.truncateSync(card, sizeMiB * 1024 * 1024);
  if (hubEnv !== undefined) {
    const f = path.join(dir, "hub.env");
    fs.writeFileSync(f, hubEnv);
    execFileSync("mcopy", ["-o", "-i", `${card}@@${partOffset(card, 1)}`, f, "::hub.env"], { env: { ...process.env, MTOOLS_SKIP_CHECK: "1" } });
  }
  return { dir, card };
}

export function httpGet(port, p, { method = "GET", headers = {}, timeout = 4000 } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path: p, method, headers, timeout }, (res) => {
      let body = ""; res.on("data", (d) => (body += d)); res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    req.on("error", reject); req.on("timeout", () => req.destroy(new Error("timeout")));
    req.end();
  });
}

/** HTTPS to the box (the hub serves plain HTTP only for /healthz and /ca.crt),
 * trusting only the store CA it serves. */
export async function httpsReq(box, p, { method = "GET", headers = {}, timeout = 8000, body } = {}) {
  const ca = (await httpGet(box.port, "/ca.crt")).body;
  return new Promise((resolve, reject) => {
    const req = https.request({ host: "127.0.0.1", servername: "localhost", port: box.port, path: p, method, headers, timeout, ca }, (res) => {
      let body = ""; res.on("data", (d) => (body += d)); res.on("end", () => resolve({ status: res.statusCode, body }));
    });
    req.on("error", reject); req.on("timeout", () => req.destroy(new Error("timeout")));
    req.end(body);
  });
}

/** A static file server on loopback with Range support (the update host), recording
 * POSTed reports. */
export async function staticServer(dir) {
  const reports = [];
  const srv = http.createServer((req, res) => {
    if (req.method === "POST") {
      let b = ""; req.on("data", (d) => (b += d)); req.on("end", () => { reports.push({ url: req.url, body: b }); res.end("{}"); });
      return;
    }
    const f = path.join(dir, decodeURIComponent(req.url.split("?")[0]));
    if (!f.startsWith(dir) || !fs.existsSync(f) || fs.statSync(f).isDirectory()) { res.writeHead(404); res.end(); return; }
    const size = fs.statSync(f).size;
    const m = /bytes=(\d+)-/.exec(req.headers.range || "");
    if (m) {
      const start = Number(m[1]);
      res.writeHead(206, { "content-length": size - start, "content-range": `bytes ${start}-${size - 1}/${size}` });
      fs.createReadStream(f, { start }).pipe(res);
    } else {
      res.writeHead(200, { "content-length": size });
      fs.createReadStream(f).pipe(res);
    }
  });
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  return { port: srv.address().port, reports, close: () => srv.close() };
}

/** Processes (QEMU, run-qemu) whose command line names `card`. */
function qemusOn(card) {
  try {
    return execFileSync("pgrep", ["-f", "--", card], { encoding: "utf8" }).split("\n").filter(Boolean).map(Number);
  } catch { return []; } // pgrep exits 1 when nothing matches
}

/** Boots `card` with scripts/run-qemu; the console accumulates in `.console`. */
export async function boot(card, { port, guestfwd, blklog, disk } = {}) {
  port ??= await freePort();
  const dir = path.dirname(card);
  const pidfile = path.join(dir, "qemu.pid");
  const extra = guestfwd ? ["--guestfwd", guestfwd] : [];
  if (blklog) extra.push("--blklog", blklog); // every guest write, flush and FUA logged
  if (disk) extra.push("--disk", disk);
  const child = spawn(path.join(ROOT, "scripts/run-qemu"), [card, "--port", String(port), "--pidfile", pidfile, ...extra], { stdio: ["ignore", "pipe", "pipe"] });
  const box = {
    port, card, child, console: "",
    startedAt: Date.now(),
    exited: new Promise((r) => child.on("exit", (code) => { boxes.delete(box); r(code); })),
    /** Waits until the console matches `re` (after `from` characters); returns the match. */
    async waitFor(re, ms = 60000, from = 0) {
      ms *= SCALE;
      const deadline = Date.now() + ms;
      for (;;) {
        const m = box.console.slice(from).match(re);
        if (m) return m;
        if (Date.now() > deadline) throw new Error(`console never showed ${re} within ${ms} ms; console tail:\n${box.console.slice(-3000)}`);
        await sleep(100);
      }
    },
    async healthz(ms = 60000) {
      ms *= SCALE;
      const deadline = Date.now() + ms;
      for (;;) {
        try { const r = await httpGet(port, "/healthz", { timeout: 2000 }); if (r.status === 200) return r; } catch {}
        if (Date.now() > deadline) throw new Error(`/healthz never ok within ${ms} ms; console tail:\n${box.console.slice(-3000)}`);
        await sleep(200);
      }
    },
    /** Power cut: SIGKILL the firmware loop (run-qemu, so it boots nothing more) and
     * every QEMU on this card. A cut between two boots (a reboot) finds the next QEMU
     * perhaps started but not yet in the pidfile, hence the search by card path. */
    async powerCut() {
      box.killNow();
      for (let i = 0; i < 50 && qemusOn(card).length; i++) {
        for (const pid of qemusOn(card)) { try { process.kill(pid, "SIGKILL"); } catch {} }
        await sleep(100);
      }
      await Promise.race([box.exited, sleep(10000)]);
    },
    killNow() {
      try { child.kill("SIGKILL"); } catch {}
      try { process.kill(Number(fs.readFileSync(pidfile, "utf8")), "SIGKILL"); } catch {}
      for (const pid of qemusOn(card)) { try { process.kill(pid, "SIGKILL"); } catch {} }
    },
    async stop() { box.killNow(); await Promise.race([box.exited, sleep(5000)]); },
  };
  const add = (d) => { box.console += d.toString(); };
  child.stdout.on("data", add);
  child.stderr.on("data", add);
  boxes.add(box);
  return box;
}

/** The dev device and admin tokens the hub printed on the console. */
export async function devTokens(box, from = 0) {
  const device = (await box.waitFor(/device token \(also in [^)]*\):\s*\r?\n(\S+)/, 60000, from))[1];
  const admin = (await box.waitFor(/admin token \(also in [^)]*\):\s*\r?\n(\S+)/, 60000, from))[1];
  return { device, admin };
}

/** Socket.IO over WSS to the box, trusting only the store CA it serves on /ca.crt. */
export async function connect(box, token, opts = {}) {
  const ca = (await httpGet(box.port, "/ca.crt")).body;
  const s = io(`https://localhost:${box.port}`, { transports: ["websocket"], auth: { token, ...(opts.auth || {}) }, ca, rejectUnauthorized: true, reconnection: false, timeout: 10000 });
  s.got = [];
  s.on("event", (e) => s.got.push(e));
  s.synced = new Promise((res, rej) => {
    s.on("synced", (x) => res(x));
    s.on("connect_error", (e) => rej(e));
    setTimeout(() => rej(new Error("no synced within 20 s")), 20000);
  });
  await s.synced;
  return s;
}

/** Sends events `ids` (type order.paid) on a connection of its own, each acked ok, then closes it. */
export async function sendAcked(box, token, ids) {
  const s = await connect(box, token);
  for (const id of ids) assert.equal((await s.timeout(10000).emitWithAck("event", { id, type: "order.paid", payload: { id } })).ok, true);
  s.close();
}

/** The ids of every event of the box's log, by catching up from 0. */
export async function allIds(box, token) {
  const s = await connect(box, token, { auth: { since: 0 } });
  const ids = s.got.map((e) => e.id);
  s.close();
  return ids;
}
