// The package bundled by Vite into the example till page, in headless Chromium (Debian's,
// driven by playwright-core): events recorded while the hub is down survive a page reload
// (IndexedDB), reach the hub once it is back, exactly once and in order; the page receives
// another device's events once, and not again after a reload (persisted cursor). And a hub
// whose CA the browser does not trust is reported as such, with where to get the CA.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import { io } from "socket.io-client";
import { procs, startHub, sleep, mint, until, readLog } from "./helpers.mjs";
import { CHROMIUM, dist, buildTill, serveDist, launch } from "./browser-helpers.mjs";

let browser;
after(async () => { await browser?.close(); for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

test("browser till: record while the hub is down, reload, hub back: everything arrives once", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  buildTill();
  const { srv, port: webPort } = await serveDist();
  // Create the hub's data (keys) once, then keep it down while the till records.
  let hub = await startHub({ env: { TLS: "off" } });
  const { dataDir, port } = hub;
  await hub.stop();
  const hubUrl = `http://127.0.0.1:${port}`;
  browser = await launch();
  const page = await browser.newPage();
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  const q = new URLSearchParams({ hub: hubUrl, token: mint(dataDir, "web-till"), db: "t1" });
  await page.goto(`http://127.0.0.1:${webPort}/?${q}`);
  await page.evaluate(() => window.till.ready);
  const ids = [];
  for (let i = 0; i < 20; i++) ids.push(await page.evaluate((i) => window.till.record("order.created", { i }), i));
  let st = await page.evaluate(() => window.till.status());
  assert.equal(st.state, "offline");
  assert.equal(st.outbox, 20);

  await page.reload();
  await page.evaluate(() => window.till.ready);
  st = await page.evaluate(() => window.till.status());
  assert.equal(st.outbox, 20, "the outbox survived the reload");
  for (let i = 20; i < 25; i++) ids.push(await page.evaluate((i) => window.till.record("order.created", { i }), i));

  hub = await startHub({ dataDir, port, env: { TLS: "off" } });
  await page.evaluate(() => window.till.drained());
  st = await page.evaluate(() => window.till.status());
  assert.equal(st.state, "hub");
  assert.equal(st.outbox, 0);

  // Another device writes; the page receives each once.
  const other = io(hubUrl, { transports: ["websocket"], auth: { token: mint(dataDir, "kitchen") }, reconnection: false });
  await new Promise((r) => other.once("connect", r));
  const otherIds = [];
  for (let i = 0; i < 3; i++) {
    const id = `k-${i}`;
    assert.equal((await other.emitWithAck("event", { id, type: "kitchen.ready", payload: { i } })).ok, true);
    otherIds.push(id);
  }
  other.close();
  await until(() => page.evaluate(() => window.till.received().length >= 3), 10000, "page received 3 events");
  await sleep(300);
  assert.deepEqual((await page.evaluate(() => window.till.received())).map((e) => e.id), otherIds);

  const log = await readLog(hubUrl, mint(dataDir, "checker"));
  const mine = log.filter((e) => e.deviceId === "web-till");
  assert.deepEqual(mine.map((e) => e.id), ids, "every recorded event exactly once, in record order");
  assert.deepEqual(mine.map((e) => e.payload.i), [...Array(25).keys()]);

  // After a reload, the persisted cursor means nothing is delivered twice.
  await page.reload();
  await page.evaluate(() => window.till.ready);
  await until(() => page.evaluate(() => window.till.status().state === "hub"), 10000, "reconnected");
  await sleep(500);
  assert.deepEqual(await page.evaluate(() => window.till.received()), [], "no event delivered again after reload");
  assert.deepEqual(pageErrors, []);
  await hub.stop();
  srv.close();
});

test("browser till: a hub whose CA the browser does not trust is reported with where to get it", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  if (!fs.existsSync(dist)) buildTill();
  const { srv, port: webPort } = await serveDist();
  const hub = await startHub(); // TLS on, store CA not in this browser
  browser ??= await launch();
  const page = await browser.newPage();
  const q = new URLSearchParams({ hub: `https://127.0.0.1:${hub.port}`, token: mint(hub.dataDir, "web-till-2"), db: "t2" });
  await page.goto(`http://127.0.0.1:${webPort}/?${q}`);
  await page.evaluate(() => window.till.ready);
  const id = await page.evaluate(() => window.till.record("order.created", { x: 1 }));
  assert.ok(id);
  const st = await until(async () => { const s = await page.evaluate(() => window.till.status()); return s.lastError?.code === "ca_not_trusted" && s; }, 15000, "ca_not_trusted status");
  assert.equal(st.state, "offline");
  assert.match(st.lastError.message, new RegExp(`http://127\\.0\\.0\\.1:${hub.port}/ca\\.crt`));
  assert.equal(st.outbox, 1, "the event waits in the outbox");
  await hub.stop();
  srv.close();
});
