// Test helpers: the real hub binary (tests/lib/hub.mjs starts it), tokens minted with
// Node's own crypto from the dev key `serve --dev` wrote (PKCS#8 v1, so Node reads it),
// the reference cloud, and a plain socket.io-client reader of the hub's whole log.
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import { io } from "socket.io-client";
import { HUB, procs, tmp, startHub as startHubLib, sleep, freePort, httpGet, run } from "../../../tests/lib/hub.mjs";

export { HUB, procs, tmp, sleep, freePort, httpGet, run };

/** tests/lib/hub.mjs's startHub, with stop/waitExit whose timers do not hold the process open. */
export async function startHub(opts) {
  const hub = await startHubLib(opts);
  const exited = new Promise((r) => { if (hub.child.exitCode !== null || hub.child.signalCode) r(hub.child.exitCode); else hub.child.once("exit", (c) => r(c)); });
  hub.waitExit = (ms) => Promise.race([exited, new Promise((r) => setTimeout(() => r("timeout"), ms).unref())]);
  hub.stop = async () => { hub.child.kill("SIGTERM"); return hub.waitExit(10000); };
  return hub;
}
export const here = path.dirname(fileURLToPath(import.meta.url));

const b64u = (b) => Buffer.from(b).toString("base64url");

/** Signs an EdDSA JWT with a PKCS#8 PEM key using only node:crypto. */
export function mintWith(keyPem, claims) {
  const key = crypto.createPrivateKey(keyPem);
  const now = Math.floor(Date.now() / 1000);
  const body = { tenantId: "t-dev", storeId: "s-dev", role: "till", iat: now, exp: now + 3600, ...claims };
  const signing = `${b64u(JSON.stringify({ alg: "EdDSA", typ: "JWT" }))}.${b64u(JSON.stringify(body))}`;
  return `${signing}.${b64u(crypto.sign(null, Buffer.from(signing), key))}`;
}

export function mint(dataDir, deviceId, extra = {}) {
  return mintWith(fs.readFileSync(path.join(dataDir, "dev", "cluster-key.pem"), "utf8"), { deviceId, ...extra });
}

export const caPem = (dataDir) => fs.readFileSync(path.join(dataDir, "ca", "store-ca.crt.pem"), "utf8");

export async function until(pred, ms, what) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await pred();
    if (last) return last;
    await sleep(50);
  }
  throw new Error(`timed out after ${ms} ms: ${what}`);
}

/** Reads the hub's log after `since` (default: all of it) with sync pages, as a plain socket.io-client device. */
export async function readLog(url, token, ca, since = 0) {
  const s = io(url, { transports: ["websocket"], auth: { token }, reconnection: false, ...(ca ? { ca } : {}) });
  await new Promise((res, rej) => { s.once("connect", res); s.once("connect_error", rej); });
  const out = [];
  for (;;) {
    const r = await s.timeout(10000).emitWithAck("sync", { since, limit: 1000 });
    if (!r.ok) throw new Error(JSON.stringify(r));
    out.push(...r.events);
    if (!r.events.length || r.events.at(-1).seq >= r.lastSeq) break;
    since = r.events.at(-1).seq;
  }
  s.close();
  return out;
}

/**
 * One device's events in the hub's log after `since`, once at least `count` are there: `sync`
 * shows an event once the hub has fanned it out, a moment after its ack (`drained()`).
 */
export function eventsOf(url, token, deviceId, count, { ca, since = 0 } = {}) {
  return until(async () => {
    const mine = (await readLog(url, token, ca, since)).filter((e) => e.deviceId === deviceId);
    return mine.length >= count && mine;
  }, 10000, `${count} events of ${deviceId} in the hub's log`);
}

/** Starts pos-cloud-ref on loopback (the shared helper of the repository's tests). */
export { startCloud } from "../../../tests/lib/cloud.mjs";

/** Spawns a Node script of this folder as a device process; lines of stdout as JSON messages. */
export function spawnNode(script, args, { netns } = {}) {
  const argv = [path.join(here, script), ...args];
  const child = netns ? spawn("ip", ["netns", "exec", netns, process.execPath, ...argv], { stdio: ["ignore", "pipe", "pipe"] })
    : spawn(process.execPath, argv, { stdio: ["ignore", "pipe", "pipe"] });
  procs.add(child);
  child.messages = [];
  child.err = "";
  let buf = "";
  child.stdout.on("data", (d) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl); buf = buf.slice(nl + 1);
      try { child.messages.push(JSON.parse(line)); } catch { child.err += line + "\n"; }
    }
  });
  child.stderr.on("data", (d) => (child.err += d));
  child.exited = new Promise((r) => child.on("exit", (code, sig) => { procs.delete(child); r(code ?? sig); }));
  return child;
}
