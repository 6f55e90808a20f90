// A cursor the hub's log retention has passed (cursor_expired), end to end: the real hub
// with LOG_RETENTION of seconds prunes events a stopped till never received; the till comes
// back with events in its outbox. The app is told once, in seq position (`gap` handler, and
// `cursor_expired` as an error with the missing range); the cursor becomes oldestSeq - 1; the
// till reconnects at once, receives every kept event and later live ones, and its outbox
// reaches the hub exactly once, in record order. The outbox is sent while a `gap` handler
// still runs, and a till killed inside its `gap` handler is told the same gap again. And a hub
// that keeps another log (reset or replaced) is followed from its start, told as log_changed.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { io } from "socket.io-client";
import { HubClient, HubClientError } from "../dist/node.js";
import { procs, tmp, startHub, sleep, mint, until, eventsOf, httpGet, spawnNode } from "./helpers.mjs";

const sockets = new Set();
const clients = new Set();
after(() => {
  for (const s of sockets) s.close();
  for (const c of clients) void c.stop();
  for (const p of procs) try { p.kill("SIGKILL"); } catch {}
});

async function writer(url, token) {
  const s = io(url, { transports: ["websocket"], auth: { token }, reconnection: false });
  sockets.add(s);
  await new Promise((res, rej) => { s.once("connect", res); s.once("connect_error", rej); });
  s.write = async (prefix, n) => {
    const seqs = [];
    for (let i = 0; i < n; i++) {
      const a = await s.timeout(5000).emitWithAck("event", { id: `${prefix}-${i}`, type: "kitchen.ticket", payload: { i } });
      assert.equal(a.ok, true, JSON.stringify(a));
      seqs.push(a.seq);
    }
    return seqs;
  };
  return s;
}

test("cursor_expired: the gap is reported in seq position, the cursor moves past it, the till reconnects, receives and delivers its outbox", async () => {
  const prune = { TLS: "off", LOG_RETENTION: "2s", LOG_PRUNE_INTERVAL: "200ms" };
  let hub = await startHub({ env: prune });
  const { dataDir, port } = hub;
  const url = `http://127.0.0.1:${port}`;
  const opts = { token: mint(dataDir, "till-gap"), hubs: [url], storage: { dir: path.join(tmp("sdk-gap"), "s") }, timeout: 3000, backoffMax: 500 };
  const watch = (c) => {
    clients.add(c);
    const w = { log: [], errors: [], statuses: [] };
    c.on("event", (e) => { w.log.push(e.seq); });
    c.on("gap", async (g) => { w.log.push(g); await sleep(100); }); // an async handler is awaited before the next event
    c.on("error", (e) => w.errors.push(e));
    c.on("status", (s) => w.statuses.push(s));
    return w;
  };

  // The till receives the first 5 events of the kitchen, then is stopped.
  let c = new HubClient(opts);
  watch(c);
  await c.start();
  let kitchen = await writer(url, mint(dataDir, "kitchen"));
  const first = await kitchen.write("a", 5);
  await until(() => c.status().cursor === first.at(-1), 10000, "the till received the first events");
  await c.stop();

  // While it is away: 10 more events, older than the retention by the time 3 more come; the
  // hub prunes everything but those 3. Then the hub is restarted without retention (nothing
  // more goes) and stays down while the till records.
  const missed = await kitchen.write("b", 10);
  await sleep(2300);
  const kept = await kitchen.write("c", 3);
  const realm = async () => JSON.parse((await httpGet(port, "/status")).body).realms[0];
  await until(async () => (await realm()).oldestSeq === kept[0], 10000, `retention pruned up to ${kept[0]}`);
  kitchen.close();
  await hub.stop();

  c = new HubClient(opts);
  await c.start();
  assert.equal(c.status().cursor, first.at(-1), "the persisted cursor");
  const ids = [];
  for (let i = 0; i < 10; i++) ids.push((await c.record("order.created", { i })).id);
  assert.equal(c.status().outbox, 10);
  await c.stop();

  // First a till process whose gap handler never returns: its outbox is delivered all the
  // same; then it is killed inside the handler, before the cursor passed the gap.
  hub = await startHub({ dataDir, port, env: { TLS: "off", LOG_RETENTION: "off" } });
  const d = tmp("sdk-gap-proc");
  const child = spawnNode("device.mjs", [JSON.stringify({ ...opts, dir: opts.storage.dir, resolved: path.join(d, "resolved"), rx: path.join(d, "rx"), count: 0, gapHang: true })]);
  await until(() => child.messages.some((m) => m.drained) && child.messages.some((m) => m.gap), 20000, `the process drained its outbox inside the gap handler (${child.err})`);
  const gap = { from: missed[0], to: missed.at(-1), oldestSeq: kept[0] };
  assert.deepEqual(child.messages.find((m) => m.gap).gap, gap);
  assert.equal(fs.existsSync(path.join(d, "rx")), false, "no event delivered past the unfinished gap handler");
  child.kill("SIGKILL");
  await child.exited;

  c = new HubClient(opts);
  const w = watch(c);
  await c.start();
  assert.equal(c.status().cursor, first.at(-1), "the cursor did not pass the unfinished gap");
  await c.drained();
  // (The cursor then goes on past the till's own events, which the killed process delivered.)
  await until(() => c.status().cursor >= kept.at(-1), 10000, "the till caught up with what the hub kept");
  // The app sees (again, after the kill): one gap, before the first kept event, then every kept event once.
  assert.deepEqual(w.log, [gap, ...kept]);
  const expired = w.errors.filter((e) => e.code === "cursor_expired");
  assert.equal(expired.length, 1, w.errors.map((e) => e.code).join());
  assert.ok(expired[0] instanceof HubClientError);
  assert.deepEqual(expired[0].data, gap);
  assert.match(expired[0].message, new RegExp(`${gap.from}-${gap.to}`));
  assert.ok(w.statuses.some((s) => s.lastError?.code === "cursor_expired"), "reported in status().lastError");
  assert.equal(c.status().state, "hub", "reconnected");
  assert.equal(c.status().lastError, null);

  // Its outbox reached the hub exactly once, in record order, after the kept events.
  const mine = await eventsOf(url, mint(dataDir, "checker"), "till-gap", ids.length, { since: kept[0] - 1 });
  assert.deepEqual(mine.map((e) => e.id), ids);
  assert.deepEqual(mine.map((e) => e.payload.i), [...Array(10).keys()]);

  // It keeps receiving live events.
  kitchen = await writer(url, mint(dataDir, "kitchen"));
  const live = await kitchen.write("d", 2);
  await until(() => c.status().cursor === live.at(-1), 10000, "live events received");
  assert.deepEqual(w.log, [gap, ...kept, ...live]);
  await c.stop();

  // The cursor past the gap is persisted: a restart reports no gap and redelivers nothing.
  c = new HubClient(opts);
  const w2 = watch(c);
  await c.start();
  assert.equal(c.status().cursor, live.at(-1));
  await until(() => c.status().state === "hub", 10000, "connected again");
  const more = await kitchen.write("e", 1);
  await until(() => c.status().cursor === more[0], 10000, "the next event");
  assert.deepEqual(w2.log, more);
  assert.deepEqual(w2.errors.filter((e) => e.code === "cursor_expired"), []);
  kitchen.close();
  await c.stop();
  await hub.stop();
});

/** The meta.json files under a client's storage dir. */
function metaFiles(dir) {
  return fs.readdirSync(dir, { recursive: true }).filter((f) => path.basename(String(f)) === "meta.json").map((f) => path.join(dir, String(f)));
}

test("a reset or replaced hub (another log) is followed from its start: log_changed, in order, then every event of the new log", async () => {
  const hub = await startHub({ env: { TLS: "off" } });
  const url = `http://127.0.0.1:${hub.port}`;
  const dir = path.join(tmp("sdk-relog"), "s");
  const opts = { token: mint(hub.dataDir, "till-relog"), hubs: [url], storage: { dir }, timeout: 3000, backoffMax: 500 };
  const watch = (c) => {
    clients.add(c);
    const w = { log: [], errors: [] };
    c.on("event", (e) => { w.log.push(e.id); });
    // Awaited before any event of the new log.
    c.on("log_changed", async (x) => { w.log.push(x); await sleep(100); });
    c.on("error", (e) => w.errors.push(e));
    return w;
  };
  let c = new HubClient(opts);
  let w = watch(c);
  await c.start();
  let kitchen = await writer(url, mint(hub.dataDir, "kitchen"));
  const seqs = await kitchen.write("a", 3);
  await until(() => c.status().cursor === seqs.at(-1), 10000, "received");
  kitchen.close();
  await c.stop();
  await hub.stop();
  const logA = JSON.parse(fs.readFileSync(metaFiles(dir)[0], "utf8")).logId;
  assert.match(logA, /^[0-9a-f]{32}$/, "the log id was stored with the cursor");

  // 1. Another hub at the same address, same dev key, whose log is already LONGER than the
  //    cursor: before log ids its events 1-3 were skipped without a word.
  const dataB = tmp("data");
  fs.cpSync(path.join(hub.dataDir, "dev"), path.join(dataB, "dev"), { recursive: true });
  let hubB = await startHub({ dataDir: dataB, port: hub.port, env: { TLS: "off" } });
  kitchen = await writer(url, mint(dataB, "kitchen"));
  await kitchen.write("b", 5);
  c = new HubClient(opts);
  w = watch(c);
  await c.start();
  await until(() => w.log.filter((x) => typeof x === "string").length === 5, 10000, "the new log from seq 1");
  const change = w.log[0];
  assert.equal(typeof change, "object", JSON.stringify(w.log));
  assert.equal(change.previousLogId, logA);
  assert.equal(change.previousCursor, seqs.at(-1));
  assert.match(change.logId, /^[0-9a-f]{32}$/);
  assert.notEqual(change.logId, logA);
  assert.equal(change.hubSeq, 5);
  assert.deepEqual(w.log.slice(1), ["b-0", "b-1", "b-2", "b-3", "b-4"]);
  assert.deepEqual(w.errors.map((e) => e.code), ["log_changed"]);
  assert.deepEqual(w.errors[0].data, change);
  await kitchen.write("c", 1);
  await until(() => w.log.at(-1) === "c-0", 10000, "live events after");
  assert.equal(c.status().cursor, 6);
  assert.equal(c.status().state, "hub");
  const logB = change.logId;
  await c.stop();
  // A restart on the same log: nothing again.
  c = new HubClient(opts);
  w = watch(c);
  await c.start();
  await kitchen.write("d", 1);
  await until(() => w.log.at(-1) === "d-0", 10000, "live after a restart");
  assert.deepEqual(w.log, ["d-0"]);
  await c.stop();
  kitchen.close();
  await hubB.stop();

  // 2. A storage from before log ids (no logId kept) meets a hub whose log ends before its
  //    cursor: it switches too, told by `synced` (before this, only cursor_ahead was said).
  for (const f of metaFiles(dir)) {
    const m = JSON.parse(fs.readFileSync(f, "utf8"));
    delete m.logId;
    fs.writeFileSync(f, JSON.stringify(m));
  }
  const dataC = tmp("data");
  fs.cpSync(path.join(hub.dataDir, "dev"), path.join(dataC, "dev"), { recursive: true });
  const hubC = await startHub({ dataDir: dataC, port: hub.port, env: { TLS: "off" } });
  c = new HubClient(opts);
  w = watch(c);
  await c.start();
  await until(() => w.errors.some((e) => e.code === "log_changed"), 10000, "log_changed told");
  const change2 = w.log[0];
  assert.equal(change2.previousLogId, null);
  assert.equal(change2.previousCursor, 7);
  assert.notEqual(change2.logId, logB);
  assert.equal(change2.hubSeq, 0);
  kitchen = await writer(url, mint(dataC, "kitchen"));
  await kitchen.write("e", 2);
  await until(() => w.log.filter((x) => typeof x === "string").length === 2, 10000, "the new log's events");
  assert.deepEqual(w.log.slice(1), ["e-0", "e-1"]);
  assert.equal(c.status().cursor, 2);
  assert.equal(JSON.parse(fs.readFileSync(metaFiles(dir)[0], "utf8")).logId, change2.logId);
  assert.equal(w.errors.filter((e) => e.code === "cursor_ahead").length, 0);
  kitchen.close();
  await c.stop();
  await hubC.stop();
});
