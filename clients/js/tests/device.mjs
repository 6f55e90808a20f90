// A till process for the tests: records COUNT events (continuing after a restart from what
// its resolved log says), appends each resolved id to RESOLVED, each received event to RX,
// prints {"drained":...} once the outbox is empty, and keeps receiving until killed.
// With gapHang, a `gap` is printed ({"gap": ...}) and its handler never returns (a crash
// inside it is then a SIGKILL from the test).
// Usage: node device.mjs JSON-OPTIONS   ({token, hubs, ca?, dir, resolved, rx, count, name, gapMs, gapHang})
import fs from "node:fs";
import { HubClient } from "../dist/node.js";

const o = JSON.parse(process.argv[2]);
const say = (m) => process.stdout.write(JSON.stringify(m) + "\n");
const client = new HubClient({ token: o.token, hubs: o.hubs, ca: o.ca, caFingerprint: o.caFingerprint, storage: { dir: o.dir }, discovery: o.discovery, timeout: 3000, backoffMax: 500, cloud: o.cloud });
client.on("event", (e) => { fs.appendFileSync(o.rx, `${process.pid} ${e.seq} ${e.id} ${e.deviceId}\n`); });
client.on("error", (e) => say({ error: e.code, message: e.message }));
if (o.gapHang) client.on("gap", (g) => { say({ gap: g }); return new Promise(() => {}); });
client.on("status", (s) => { if (o.statusLog) say({ status: s }); });
await client.start();
say({ started: client.status() });
const done = fs.existsSync(o.resolved) ? fs.readFileSync(o.resolved, "utf8").split("\n").filter(Boolean).length : 0;
for (let i = done; i < o.count; i++) {
  const { id } = await client.record("test.event", { dev: o.name, i });
  fs.appendFileSync(o.resolved, `${id} ${i}\n`);
  if (o.gapMs) await new Promise((r) => setTimeout(r, o.gapMs));
}
await client.drained();
say({ drained: client.status() });
if (o.exitWhenDrained) { await client.stop(); say({ stopped: true }); process.exit(0); }
setInterval(() => {}, 1000);
