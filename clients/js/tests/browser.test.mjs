// The package bundled by Vite into the example till page, in headless Chromium (Debian's,
// driven by playwright-core): events recorded while the hub is down survive a page reload
// (IndexedDB), reach the hub once it is back, exactly once and in order; the page receives
// another device's events once, and not again after a reload (persisted cursor). A hub
// whose CA the browser does not trust is reported as such, with where to get the CA. The
// origin's quota used up (lowered through DevTools) makes record() fail with storage_full,
// losing nothing recorded before. Two tabs of the same page: the second is refused until the
// first closes, then takes over its outbox and cursor; a third waits as a standby. A page
// that is no secure context has no Web Locks and is refused unless it opts out.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import { io } from "socket.io-client";
import { procs, startHub, sleep, mint, until, eventsOf } from "./helpers.mjs";
import { CHROMIUM, buildTill, serveDist, launch } from "./browser-helpers.mjs";

let browser;
const sockets = new Set();
after(async () => { for (const s of sockets) s.close(); await browser?.close(); for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

/** The example till built and served on loopback, a hub (`env`), and the browser. */
async function setup(env = { TLS: "off" }) {
  buildTill();
  const { srv, port: webPort } = await serveDist();
  const hub = await startHub({ env });
  browser ??= await launch();
  return { srv, webPort, hub, dataDir: hub.dataDir, port: hub.port, hubUrl: `http://127.0.0.1:${hub.port}` };
}

/** Another device of the store (plain socket.io-client), connected. */
async function kitchen(hubUrl, dataDir) {
  const s = io(hubUrl, { transports: ["websocket"], auth: { token: mint(dataDir, "kitchen") }, reconnection: false });
  sockets.add(s);
  await new Promise((r) => s.once("connect", r));
  return s;
}

test("browser till: record while the hub is down, reload, hub back: everything arrives once", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  // Create the hub's data (keys) once, then keep it down while the till records.
  let { srv, webPort, hub, dataDir, port, hubUrl } = await setup();
  await hub.stop();
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
  const other = await kitchen(hubUrl, dataDir);
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

  const mine = await eventsOf(hubUrl, mint(dataDir, "checker"), "web-till", ids.length);
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
  const { srv, webPort, hub } = await setup({}); // TLS on, store CA not in this browser
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

test("browser till: the storage quota used up during record() is storage_full; nothing recorded before is lost", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  let { srv, webPort, hub, dataDir, port, hubUrl } = await setup();
  await hub.stop();
  const context = await browser.newContext();
  const page = await context.newPage();
  // Chromium's own quota for this origin, lowered to 512 KB (the override holds only when set
  // before the origin first touches its storage): IndexedDB then aborts with QuotaExceededError.
  const origin = `http://127.0.0.1:${webPort}`;
  const cdp = await context.newCDPSession(page);
  await cdp.send("Storage.overrideQuotaForOrigin", { origin, quotaSize: 512 * 1024 });
  const q = new URLSearchParams({ hub: hubUrl, token: mint(dataDir, "web-quota"), db: "quota" });
  await page.goto(`${origin}/?${q}`);
  await page.evaluate(() => window.till.ready);
  // Random text (incompressible), 20 KB per event, until the quota refuses one.
  const big = (i) => page.evaluate((i) => {
    const b = new Uint8Array(15000);
    crypto.getRandomValues(b);
    return window.till.tryRecord("order.created", { i, pad: btoa(String.fromCharCode(...b)) });
  }, i);
  const ids = [];
  let refused;
  for (let i = 0; i < 200 && !refused; i++) {
    const r = await big(i);
    if (r.id) ids.push(r.id); else refused = r;
  }
  assert.ok(refused, "the quota was never reached");
  assert.equal(refused.code, "storage_full");
  assert.equal(refused.name, "StorageFullError");
  assert.match(refused.message, /quota/);
  assert.ok(ids.length >= 5, `${ids.length} recorded before the quota ran out`);
  assert.equal((await page.evaluate(() => window.till.status())).outbox, ids.length, "the refused event is not in the outbox");
  // Everything resolved before is intact after a reload, and reaches the hub once, in order.
  await page.reload();
  await page.evaluate(() => window.till.ready);
  assert.equal((await page.evaluate(() => window.till.status())).outbox, ids.length);
  hub = await startHub({ dataDir, port, env: { TLS: "off" } });
  await page.evaluate(() => window.till.drained());
  const mine = await eventsOf(hubUrl, mint(dataDir, "checker"), "web-quota", ids.length);
  assert.deepEqual(mine.map((e) => e.id), ids);
  assert.deepEqual(mine.map((e) => e.payload.i), [...ids.keys()]);
  // The acked entries were deleted: the quota has room again.
  const again = await big(ids.length);
  assert.ok(again.id, `record() after the outbox drained: ${JSON.stringify(again)}`);
  await page.evaluate(() => window.till.drained());
  await context.close();
  await hub.stop();
  srv.close();
});

test("browser till: two tabs of one till page never share its outbox or cursor (Web Locks)", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  let { srv, webPort, hub, dataDir, port, hubUrl } = await setup();
  const context = await browser.newContext(); // one profile: both tabs see the same IndexedDB
  const url = `http://127.0.0.1:${webPort}/?${new URLSearchParams({ hub: hubUrl, token: mint(dataDir, "web-tabs"), db: "shared", lockWait: "1000" })}`;
  const tab1 = await context.newPage();
  await tab1.goto(url);
  await tab1.evaluate(() => window.till.ready);
  await until(() => tab1.evaluate(() => window.till.status().state === "hub"), 10000, "tab 1 connected");
  const other = await kitchen(hubUrl, dataDir);
  const send = async (id) => assert.equal((await other.emitWithAck("event", { id, type: "kitchen.ready", payload: {} })).ok, true);
  for (const id of ["k1", "k2", "k3"]) await send(id);
  await until(() => tab1.evaluate(() => window.till.received().length === 3), 10000, "tab 1 received 3 events");

  // The second tab of the same page is refused while the first holds the outbox.
  const tab2 = await context.newPage();
  await tab2.goto(url);
  const r2 = await tab2.evaluate(() => window.till.ready.then(() => "ok", (e) => ({ code: e.code, message: e.message })));
  assert.equal(r2.code, "storage_locked", JSON.stringify(r2));
  assert.match(r2.message, /another tab/);
  assert.equal((await tab2.evaluate(() => window.till.tryRecord("order.created", {}))).code, "not_started");
  assert.equal((await tab2.evaluate(() => window.till.start())).code, "storage_locked", "and again on a retry");

  // Tab 1 records with the hub down, then closes with those events still in the outbox.
  await hub.stop();
  await until(() => tab1.evaluate(() => window.till.status().state === "offline"), 10000, "tab 1 offline");
  const ids = [];
  for (let i = 0; i < 10; i++) ids.push(await tab1.evaluate((i) => window.till.record("order.created", { i }), i));
  const cursor = (await tab1.evaluate(() => window.till.status())).cursor;
  await tab1.close();

  // Now the second tab takes over: the same outbox and cursor, each event sent once, nothing
  // received twice.
  assert.equal(await tab2.evaluate(() => window.till.start()), "ok");
  let st = await tab2.evaluate(() => window.till.status());
  assert.equal(st.outbox, 10);
  assert.equal(st.cursor, cursor);
  hub = await startHub({ dataDir, port, env: { TLS: "off" } });
  await tab2.evaluate(() => window.till.drained());
  const other2 = await kitchen(hubUrl, dataDir);
  assert.equal((await other2.emitWithAck("event", { id: "k4", type: "kitchen.ready", payload: {} })).ok, true);
  await until(() => tab2.evaluate(() => window.till.received().length >= 1), 10000, "tab 2 received k4");
  await sleep(300);
  assert.deepEqual((await tab2.evaluate(() => window.till.received())).map((e) => e.id), ["k4"]);
  const mine = await eventsOf(hubUrl, mint(dataDir, "checker"), "web-tabs", ids.length);
  assert.deepEqual(mine.map((e) => e.id), ids, "every event of the shared outbox stored once, in record order");

  // A third tab with lockWait: Infinity stands by, and takes over when the second closes.
  const tab3 = await context.newPage();
  await tab3.goto(url.replace("lockWait=1000", "lockWait=Infinity"));
  const waiting = () => Promise.race([window.till.ready.then(() => "started", (e) => e.code), new Promise((r) => setTimeout(() => r("waiting"), 1500))]);
  assert.equal(await tab3.evaluate(waiting), "waiting");
  const cursor2 = (await tab2.evaluate(() => window.till.status())).cursor;
  await tab2.close();
  await tab3.evaluate(() => window.till.ready);
  assert.equal((await tab3.evaluate(() => window.till.status())).cursor, cursor2);
  other.close();
  other2.close();
  await context.close();
  await hub.stop();
  srv.close();
});

test("browser till: a page that is no secure context (no Web Locks) is refused with storage_unguarded, unless allowUnlocked", { skip: !fs.existsSync(CHROMIUM) && `no ${CHROMIUM}` }, async () => {
  const { srv, webPort, hub, dataDir, hubUrl } = await setup();
  // A LAN name over plain http is not a secure context (127.0.0.1 and localhost are).
  const plain = await launch(["--host-resolver-rules=MAP till.lan 127.0.0.1"]);
  try {
    const page = await plain.newPage();
    const q = new URLSearchParams({ hub: hubUrl, token: mint(dataDir, "web-plain"), db: "plain" });
    await page.goto(`http://till.lan:${webPort}/?${q}`);
    assert.equal(await page.evaluate(() => window.isSecureContext), false);
    const r = await page.evaluate(() => window.till.ready.then(() => "ok", (e) => ({ code: e.code, message: e.message })));
    assert.equal(r.code, "storage_unguarded", JSON.stringify(r));
    assert.match(r.message, /allowUnlocked/);
    await page.goto(`http://till.lan:${webPort}/?${q}&allowUnlocked=1`);
    await page.evaluate(() => window.till.ready);
    const id = await page.evaluate(() => window.till.record("order.created", {}));
    await page.evaluate(() => window.till.drained());
    assert.deepEqual((await eventsOf(hubUrl, mint(dataDir, "checker"), "web-plain", 1)).map((e) => e.id), [id]);
  } finally {
    await plain.close();
  }
  await hub.stop();
  srv.close();
});
