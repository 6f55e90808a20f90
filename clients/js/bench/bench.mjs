// Figures for the client SDK against the real release hub (printed, never asserted):
//   1. record() to durable, p50/p99, Chromium (IndexedDB strict) and Node (fsync'd journal)
//   2. events/s one device pushes through the SDK to the hub (durable at both ends)
//   3. time from the hub coming back to the outbox drained (N events recorded while it was down)
// Usage: node bench/bench.mjs [--quick]   (POS_HUB_BIN, CHROMIUM as for the tests)
import fs from "node:fs";
import path from "node:path";
import { HubClient } from "../dist/node.js";
import { tmp, startHub, mint } from "../tests/helpers.mjs";
import { CHROMIUM, buildTill, serveDist, launch } from "../tests/browser-helpers.mjs";

const quick = process.argv.includes("--quick");
const N_LAT = quick ? 300 : 2000;
const N_PUSH = quick ? 5000 : 50000;
const N_DOWN = quick ? 2000 : 20000;
const pct = (a, p) => { const s = [...a].sort((x, y) => x - y); return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]; };
const ms = (x) => `${x.toFixed(2)} ms`;
const out = [];
const report = (k, v) => { out.push([k, v]); console.log(`${k}: ${v}`); };

let hub = await startHub({ env: { TLS: "off" } });
const { dataDir, port } = hub;
const url = `http://127.0.0.1:${port}`;

// 0. Chromium record() latency (IndexedDB, durability strict), first, while the realm is nearly
// empty: a page catching up tens of thousands of events (the example renders each into the
// DOM) delays record() on the same main thread by seconds.
if (fs.existsSync(CHROMIUM)) {
  buildTill();
  const { srv, port: webPort } = await serveDist();
  const browser = await launch();
  const page = await browser.newPage();
  const q = new URLSearchParams({ hub: url, token: mint(dataDir, "bench-web"), db: "bench" });
  await page.goto(`http://127.0.0.1:${webPort}/?${q}`);
  await page.evaluate(() => window.till.ready);
  const n = quick ? 200 : 1000;
  const t = await page.evaluate((n) => window.till.bench(n), n);
  report(`Chromium record() to durable (${n} sequential, IndexedDB strict)`, `p50 ${ms(pct(t, 50))}, p99 ${ms(pct(t, 99))}`);
  await page.evaluate(() => window.till.drained());
  await browser.close();
  srv.close();
} else {
  report("Chromium record()", `skipped: no ${CHROMIUM}`);
}

// 1. Node record() latency, sequential, hub connected (the network never waits on it).
{
  const c = new HubClient({ token: mint(dataDir, "bench-lat"), hubs: [url], storage: { dir: path.join(tmp("bench"), "s") } });
  await c.start();
  const t = [];
  for (let i = 0; i < N_LAT; i++) {
    const t0 = performance.now();
    await c.record("bench.event", { i, total: 12.5 });
    t.push(performance.now() - t0);
  }
  await c.drained();
  report(`Node record() to durable (${N_LAT} sequential, fdatasync each)`, `p50 ${ms(pct(t, 50))}, p99 ${ms(pct(t, 99))}`);
  await c.stop();
}

// 2. Throughput of one device: records issued 256 at a time (group-committed), pipelined to the hub.
{
  const c = new HubClient({ token: mint(dataDir, "bench-push"), hubs: [url], storage: { dir: path.join(tmp("bench"), "s") } });
  await c.start();
  const t0 = performance.now();
  for (let i = 0; i < N_PUSH; i += 256) {
    const batch = [];
    for (let j = i; j < Math.min(N_PUSH, i + 256); j++) batch.push(c.record("bench.event", { j, total: 12.5 }));
    await Promise.all(batch);
  }
  await c.drained();
  const s = (performance.now() - t0) / 1000;
  report(`one device, ${N_PUSH} events recorded and acked by the hub`, `${Math.round(N_PUSH / s)} events/s (${s.toFixed(2)} s)`);
  await c.stop();
}

// 3. Hub down, N recorded, hub back: time from /healthz ok to drained.
{
  const c = new HubClient({ token: mint(dataDir, "bench-down"), hubs: [url], storage: { dir: path.join(tmp("bench"), "s") }, backoffMax: 250 });
  await c.start();
  await hub.stop();
  const all = [];
  for (let i = 0; i < N_DOWN; i++) all.push(c.record("bench.event", { i }));
  await Promise.all(all);
  hub = await startHub({ dataDir, port, env: { TLS: "off" } });
  const t0 = performance.now();
  await c.drained();
  report(`hub back to outbox drained (${N_DOWN} events waiting, reconnect backoff at most 250 ms)`, `${ms(performance.now() - t0)}`);
  await c.stop();
}

await hub.stop();
process.exit(0);
