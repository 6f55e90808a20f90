// Shared helpers for the hub's Node system tests: start the real binary on a free
// loopback port with its own data dir (MDNS=off, no NTP), wait for /healthz, stop it.
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import net from "node:net";
import http from "node:http";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
export const HUB = process.env.POS_HUB_BIN || path.resolve(here, "../../target/debug/pos-hub");
export const procs = new Set();
const scratch = [];
process.on("exit", () => {
  for (const p of procs) try { p.kill("SIGKILL"); } catch {}
  // Every scratch dir goes with the test file (a CI disk filled up with them);
  // POSHUB_KEEP_TMP=1 keeps them for a post-mortem.
  if (process.env.POSHUB_KEEP_TMP !== "1") for (const d of scratch) try { fs.rmSync(d, { recursive: true, force: true, maxRetries: 3 }); } catch {}
});

/** A scratch dir under $TMPDIR, removed when the test file's process exits. */
export function tmp(name) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), `poshub-${name}-`));
  scratch.push(d);
  return d;
}
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
  });
}

export function httpGet(port, p, host = "127.0.0.1", method = "GET") {
  return new Promise((resolve, reject) => {
    const req = http.request({ host, port, path: p, method, timeout: 3000 }, (res) => {
      let body = ""; res.on("data", (d) => (body += d)); res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.on("error", reject); req.on("timeout", () => req.destroy(new Error("timeout")));
    req.end();
  });
}

export function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 15000, ...opts });
  return { code: r.status, out: (r.stdout || "") + (r.stderr || "") };
}

/** Starts `pos-hub serve --dev` (or with `args`), waits until /healthz answers. */
export async function startHub({ dataDir, port, env = {}, netns, args } = {}) {
  dataDir ??= tmp("data");
  port ??= await freePort();
  const serveArgs = args ?? ["serve", "--dev", "--data-dir", dataDir, "--port", String(port)];
  const cmd = netns ? "ip" : HUB;
  const argv = netns ? ["netns", "exec", netns, HUB, ...serveArgs] : serveArgs;
  const child = spawn(cmd, argv, { env: { ...process.env, MDNS: "off", NTP_SERVERS: "off", RUST_LOG: "info", ...env }, stdio: ["ignore", "ignore", "pipe"] });
  procs.add(child);
  let log = ""; child.stderr.on("data", (d) => (log += d));
  const exited = new Promise((r) => child.on("exit", (code) => { procs.delete(child); r(code); }));
  const deadline = Date.now() + 20000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`hub exited early: ${log}`);
    try {
      const ok = netns
        ? spawnSync("ip", ["netns", "exec", netns, "curl", "-sf", `http://127.0.0.1:${port}/healthz`]).status === 0
        : (await httpGet(port, "/healthz")).status === 200;
      if (ok) break;
    } catch {}
    if (Date.now() > deadline) throw new Error(`hub not ready: ${log}`);
    await sleep(100);
  }
  const stop = async () => { child.kill("SIGTERM"); return waitExit(10000); };
  const waitExit = (ms) => Promise.race([exited, sleep(ms).then(() => "timeout")]);
  const tokenFile = path.join(dataDir, "dev-token.txt");
  return {
    port, dataDir, child, stop, waitExit, log: () => log,
    token: fs.existsSync(tokenFile) ? fs.readFileSync(tokenFile, "utf8").trim() : null,
  };
}
