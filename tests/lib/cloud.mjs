// Shared helpers for the tests that run the hub with the reference cloud (tests/bridge,
// tests/storage): start `pos-cloud-ref`, a device that records what it receives, events
// written one by one with their acks checked, and polling until a condition holds.
// socket.io-client is passed in (`io`): each test folder has its own node_modules.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { HUB, procs, tmp, httpGet, sleep } from "./hub.mjs";

export const CLOUD = process.env.POS_CLOUD_BIN || path.join(path.dirname(HUB), "pos-cloud-ref");
export const CLOUD_TOKEN = "bridge-secret";

/** Starts pos-cloud-ref on 127.0.0.1:`port` (0: any) with its database `db` (a fresh one by
 *  default, off any partition under test); `tokens` are the bearer tokens it accepts,
 *  `reject` lists event types it refuses. */
export async function startCloud({ db = path.join(tmp("cloud"), "cloud.db"), port = 0, tokens = [CLOUD_TOKEN], reject = [] } = {}) {
  const args = ["--listen", `127.0.0.1:${port}`, "--db", db, ...tokens.flatMap((t) => ["--token", t]), ...reject.flatMap((t) => ["--reject-type", t])];
  const child = spawn(CLOUD, args, { stdio: ["ignore", "pipe", "pipe"] });
  procs.add(child);
  const url = await new Promise((res, rej) => {
    let out = "";
    child.stdout.on("data", (d) => { out += d; const m = out.match(/listening on (http:\/\/\S+)/); if (m) res(m[1]); });
    child.on("exit", (c) => rej(new Error(`cloud exited ${c}`)));
    setTimeout(() => rej(new Error("cloud did not start")), 10000).unref();
  });
  const api = (method, p, body) => new Promise((res, rej) => {
    const u = new URL(url + p);
    const req = http.request({ host: u.hostname, port: u.port, path: u.pathname + u.search, method, headers: { "content-type": "application/json" }, timeout: 5000 }, (r) => {
      let b = ""; r.on("data", (d) => (b += d)); r.on("end", () => res(JSON.parse(b || "null")));
    });
    req.on("error", rej); req.end(body ? JSON.stringify(body) : undefined);
  });
  return {
    url, db, port: Number(new URL(url).port),
    ingestUrl: `${url}/v1/events/ingest`,
    fault: (f) => api("POST", "/v1/admin/faults", f),
    events: async () => (await api("GET", "/v1/admin/events?tenantId=t-dev&storeId=s-dev")).events,
    addCloud: (events) => api("POST", "/v1/admin/cloud-events", { tenantId: "t-dev", storeId: "s-dev", events }),
    stats: () => api("GET", "/v1/admin/stats"),
    stop: () => { child.kill("SIGTERM"); return new Promise((r) => child.on("exit", r)); },
  };
}

/** A device over ws with `token`, catching up from `since`: what it receives in `s.got`,
 *  `s.ready` resolves on `synced` (rejects on a refusal or after `readyMs`). `timeout` is
 *  socket.io-client's connect timeout (its default when not given). */
export function device(io, hub, { token, since, timeout, readyMs = 10000 }) {
  const s = io(`http://127.0.0.1:${hub.port}`, { transports: ["websocket"], auth: { token, since }, reconnection: false, ...(timeout && { timeout }) });
  s.got = [];
  s.on("event", (e) => s.got.push(e));
  s.ready = new Promise((res, rej) => { s.on("synced", res); s.on("connect_error", rej); setTimeout(() => rej(new Error("no synced")), readyMs); });
  return s;
}

/** Writes `n` events `<prefix>-<i>` one by one, each acked ok; returns their ids and seqs. */
export async function write(d, prefix, n, payload = (i) => ({ i })) {
  const out = [];
  for (let i = 0; i < n; i++) {
    const id = `${prefix}-${i}`;
    const a = await d.timeout(5000).emitWithAck("event", { id, type: "order.created", payload: payload(i) });
    assert.equal(a.ok, true, JSON.stringify(a));
    out.push({ id, seq: a.seq });
  }
  return out;
}

/** Polls `pred` every 50 ms until it returns something truthy (returned) or `ms` passed. */
export async function until(pred, ms, what) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) { last = await pred(); if (last) return last; await sleep(50); }
  throw new Error(`timed out: ${what}`);
}

/** The first realm of the hub's /status. */
export const realmStatus = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body).realms[0];
