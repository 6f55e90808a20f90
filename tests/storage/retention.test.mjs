// A bounded log (issue 16): LOG_RETENTION prunes old events that the cloud already has
// (never one still in the outbox), a device whose cursor fell behind what was kept is
// refused with cursor_expired and the oldest kept seq, /status and /metrics report the
// oldest seq and the database size. The real hub, socket.io-client and pos-cloud-ref;
// retention shortened to seconds (LOG_RETENTION=8s, LOG_PRUNE_INTERVAL=200ms).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { io } from "socket.io-client";
import { procs, httpGet, startHub, sleep, freePort } from "../lib/hub.mjs";
import { CLOUD_TOKEN as TOKEN, startCloud, device as connectDevice, write as writeEvents, until, realmStatus as realm } from "../lib/cloud.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const device = (hub, since) => connectDevice(io, hub, { token: hub.token, since, timeout: 5000 });
const write = (d, prefix, n, size = 500) => writeEvents(d, prefix, n, (i) => ({ i, note: "y".repeat(size) }));

async function refusal(hub, since) {
  const s = device(hub, since);
  // The code is the message; the oldest kept seq comes as the CONNECT_ERROR's data.
  try { await s.ready; } catch (e) { return e.data?.oldestSeq !== undefined ? `${e.message} oldestSeq=${e.data.oldestSeq}` : e.message; } finally { s.close(); }
  return "connected";
}

test("retention without a cloud prunes old events; an expired cursor is refused with the oldest kept seq", async () => {
  const hub = await startHub({ env: { TLS: "off", LOG_RETENTION: "8s", LOG_PRUNE_INTERVAL: "200ms" } });
  const till = device(hub);
  await till.ready;
  const dbFile = path.join(hub.dataDir, "realms", "t-dev", "s-dev.db");
  const old = await write(till, "old", 300, 8000);
  const st0 = await realm(hub);
  assert.equal(st0.oldestSeq, 1, "nothing is older than the retention yet");
  assert.ok(st0.dbBytes > 2_400_000, JSON.stringify(st0));
  await until(async () => fs.statSync(dbFile).size > 2_400_000, 5000, "the WAL checkpointed into the main file");
  const mainBefore = fs.statSync(dbFile).size;
  await sleep(8500);
  const fresh = await write(till, "new", 5);
  const st = await until(async () => { const r = await realm(hub); return r.oldestSeq === fresh[0].seq && r; }, 10000, "old events pruned");
  // The freed pages go back to the file system (incremental vacuum, then a checkpoint).
  await until(async () => fs.statSync(dbFile).size < mainBefore / 4, 10000, `main file shrinks from ${mainBefore} bytes`);
  console.log(`# main database file ${mainBefore} bytes with 300 events of 8 KB, ${fs.statSync(dbFile).size} after pruning them; /status dbBytes (with the WAL) ${st0.dbBytes} -> ${(await realm(hub)).dbBytes}`);
  const oldest = st.oldestSeq;
  // Behind the oldest kept event: refused, with the oldest seq in the message.
  assert.equal(await refusal(hub, 0), `cursor_expired oldestSeq=${oldest}`);
  assert.equal(await refusal(hub, old[100].seq), `cursor_expired oldestSeq=${oldest}`);
  // Right before it: a full replay of what is kept, no gap.
  const d = device(hub, oldest - 1);
  await d.ready;
  assert.deepEqual(d.got.map((e) => e.id), fresh.map((f) => f.id));
  // sync below the oldest: the same code, and the oldest seq as a field.
  const s = await d.timeout(5000).emitWithAck("sync", { since: 5 });
  assert.equal(s.ok, false);
  assert.equal(s.error.code, "cursor_expired");
  assert.equal(s.oldestSeq, oldest);
  const s2 = await d.timeout(5000).emitWithAck("sync", { since: oldest - 1 });
  assert.deepEqual(s2.events.map((e) => e.id), fresh.map((f) => f.id));
  // A dedupe of an id retention deleted is no longer possible: documented, not hidden.
  const m = (await httpGet(hub.port, "/metrics")).body;
  assert.match(m, new RegExp(`poshub_events_oldest_seq\\{tenant="t-dev",store="s-dev"\\} ${oldest}`));
  assert.match(m, /poshub_db_bytes\{tenant="t-dev",store="s-dev"\} \d+/);
  d.close(); till.close();
  // The kept seqs survive a restart (the newest event is never pruned).
  await hub.stop();
  const again = await startHub({ dataDir: hub.dataDir, env: { TLS: "off", LOG_RETENTION: "8s", LOG_PRUNE_INTERVAL: "200ms" } });
  assert.equal((await realm(again)).oldestSeq, oldest);
  const t2 = device(again);
  await t2.ready;
  const [next] = await write(t2, "after-restart", 1);
  assert.equal(next.seq, fresh[fresh.length - 1].seq + 1, "seqs continue after a restart");
  t2.close();
  await again.stop();
});

test("with a cloud, retention never prunes what is still in the outbox", async () => {
  const cloudPort = await freePort();
  const env = { TLS: "off", LOG_RETENTION: "2s", LOG_PRUNE_INTERVAL: "200ms", CLOUD_BRIDGE_URL: `http://127.0.0.1:${cloudPort}/v1/events/ingest`, CLOUD_BRIDGE_TOKEN: TOKEN, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "1s", CLOUD_FEED_WAIT: "1s" };
  const hub = await startHub({ env });
  const till = device(hub);
  await till.ready;
  const acked = await write(till, "e", 200);
  // Well past the retention, the cloud still unreachable: every event is kept.
  await sleep(3000);
  await write(till, "late", 1);
  await sleep(1000);
  let st = await realm(hub);
  assert.equal(st.oldestSeq, 1, "nothing in the outbox is pruned");
  assert.equal(st.outboxDepth, 201);
  assert.equal(await refusal(hub, 0), "connected");
  // The cloud comes up and takes everything; then the old events may go.
  const cloud = await startCloud({ port: cloudPort });
  await until(async () => (await cloud.events()).length === 201, 20000, "cloud got every event");
  st = await until(async () => { const r = await realm(hub); return r.oldestSeq > 1 && r; }, 10000, "pushed events pruned");
  assert.equal(st.outboxDepth, 0);
  assert.ok(st.oldestSeq <= 201, `the newest event is kept: oldest ${st.oldestSeq}`);
  assert.equal(await refusal(hub, 0), `cursor_expired oldestSeq=${st.oldestSeq}`);
  assert.deepEqual((await cloud.events()).slice(0, 200).map((e) => e.id), acked.map((a) => a.id));
  till.close();
  await hub.stop();
});
