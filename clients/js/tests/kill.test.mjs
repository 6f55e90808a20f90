// Node, several till processes on the real hub: the hub is SIGKILLed and restarted while
// they record, and one till process is SIGKILLed and restarted on the same storage. Every
// resolved record() must be in the hub's log exactly once, each device's events in record
// order, and every device must have received every other device's events with no gap.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { procs, tmp, startHub, sleep, mint, caPem, until, readLog, spawnNode } from "./helpers.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

test("hub and a till SIGKILLed mid-stream: every resolved record stored once, in order, no receive gap", async () => {
  let hub = await startHub();
  const { dataDir, port } = hub;
  const url = `https://127.0.0.1:${port}`;
  const ca = caPem(dataDir);
  const names = ["till-a", "till-b", "till-c"];
  const COUNT = 300;
  const dev = Object.fromEntries(names.map((name) => {
    const d = tmp(`sdk-${name}`);
    return [name, { name, dir: path.join(d, "store"), resolved: path.join(d, "resolved.txt"), rx: path.join(d, "rx.txt"), token: mint(dataDir, name) }];
  }));
  const launch = (d) => spawnNode("device.mjs", [JSON.stringify({ ...d, hubs: [url], ca, count: COUNT, gapMs: 8 })]);
  const procsBy = Object.fromEntries(names.map((n) => [n, launch(dev[n])]));
  const lines = (f) => (fs.existsSync(f) ? fs.readFileSync(f, "utf8").split("\n").filter(Boolean) : []);

  // The hub dies while all three record (each has resolved some records).
  await until(() => names.every((n) => lines(dev[n].resolved).length >= 60), 30000, "tills recording");
  hub.child.kill("SIGKILL");
  await hub.waitExit(5000);
  await sleep(700);
  // A till dies while the hub is down, with records in its outbox only.
  const b = procsBy["till-b"];
  b.kill("SIGKILL");
  await b.exited;
  const bResolvedAtKill = lines(dev["till-b"].resolved).length;
  hub = await startHub({ dataDir, port });
  await sleep(300);
  procsBy["till-b"] = launch(dev["till-b"]);
  // And the hub dies once more while till-b catches up.
  await until(() => lines(dev["till-b"].resolved).length >= bResolvedAtKill + 40, 30000, "till-b recording again");
  hub.child.kill("SIGKILL");
  await hub.waitExit(5000);
  await sleep(500);
  hub = await startHub({ dataDir, port });

  for (const n of names) {
    await until(() => procsBy[n].messages.some((m) => m.drained), 60000, `${n} drained (${procsBy[n].err})`);
  }
  const log = await readLog(url, mint(dataDir, "checker"), ca);
  // Every resolved record exactly once.
  const count = new Map();
  for (const e of log) count.set(e.id, (count.get(e.id) ?? 0) + 1);
  for (const n of names) {
    const res = lines(dev[n].resolved).map((l) => l.split(" "));
    assert.equal(res.length, COUNT, `${n} resolved every record`);
    for (const [id] of res) assert.equal(count.get(id), 1, `${n}: ${id} stored exactly once`);
    // Per device, in record order: the hub's order of this device's resolved ids is the
    // order their record() calls resolved in.
    const resolvedIds = res.map(([id]) => id);
    const inHub = log.filter((e) => e.deviceId === n);
    const known = new Set(resolvedIds);
    assert.deepEqual(inHub.filter((e) => known.has(e.id)).map((e) => e.id), resolvedIds, `${n}: stored in record order`);
    // The app's own counter: every i stored, never going back. A kill between record()
    // resolving and the app noting it makes the restarted app record that i again (a new
    // event, a new id): the only way an i can repeat, and only right after a kill.
    const is = inHub.map((e) => e.payload.i);
    for (let i = 1; i < is.length; i++) assert.ok(is[i] >= is[i - 1], `${n}: record ${is[i]} stored after ${is[i - 1]}`);
    assert.deepEqual([...new Set(is)], [...Array(COUNT).keys()], `${n}: all ${COUNT} stored`);
    if (is.length > COUNT) console.log(`${n}: ${is.length - COUNT} record(s) made again by the app after its kill (resolved, not yet noted by the app)`);
  }
  for (const [id, c] of count) assert.equal(c, 1, `${id} stored once`);
  // Receive: every other device's event, no gap; within one process run, no duplicate.
  for (const n of names) {
    const others = log.filter((e) => e.deviceId !== n).map((e) => e.seq);
    await until(() => { const got = new Set(lines(dev[n].rx).map((l) => Number(l.split(" ")[1]))); return others.every((s) => got.has(s)); }, 30000, `${n} received every other device's event`);
    const rx = lines(dev[n].rx).map((l) => l.split(" "));
    const byPid = new Map();
    for (const [pid, seq, , from] of rx) {
      assert.notEqual(from, n, `${n} is not sent its own events`);
      const last = byPid.get(pid) ?? 0;
      assert.ok(Number(seq) > last, `${n} pid ${pid}: seq ${seq} after ${last} (in order, once)`);
      byPid.set(pid, Number(seq));
    }
    const got = new Set(rx.map((r) => Number(r[1])));
    assert.deepEqual([...got].sort((x, y) => x - y), others, `${n}: exactly the other devices' seqs`);
    const dups = rx.length - got.size;
    console.log(`${n}: received ${got.size} events in ${byPid.size} process run(s), ${dups} redelivered after a kill`);
  }
  for (const p of Object.values(procsBy)) p.kill("SIGKILL");
  await hub.stop();
});
