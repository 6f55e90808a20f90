// python-socketio, the official Python client, against the real hub over both transports
// (WebSocket and HTTP long-polling): the hub's own Socket.IO layer must speak the protocol
// as the reference clients do, not only as socket.io-client for Node does.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { HUB, procs, startHub } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const here = path.dirname(fileURLToPath(import.meta.url));
const mint = (hub, device) => execFileSync(HUB, ["token", "mint", "--key", path.join(hub.dataDir, "dev", "cluster-key.pem"),
  "--tenant", "t-dev", "--store", "s-dev", "--device", device, "--role", "till", "--ttl=1h"], { encoding: "utf8" }).trim();

for (const transport of ["websocket", "polling"]) {
  test(`python-socketio over ${transport}: connect, ack, duplicate, batch, sync, fan-out, refusal`, async () => {
    const hub = await startHub({ env: { TLS: "off" } });
    try {
      const r = spawnSync("python3", [path.join(here, "pyclient.py")], {
        encoding: "utf8", timeout: 60000,
        env: { ...process.env, HUB_URL: `http://127.0.0.1:${hub.port}`, TRANSPORT: transport,
          TOKEN_A: mint(hub, "py-a"), TOKEN_B: mint(hub, "py-b"), BAD_TOKEN: "not-a-token" },
      });
      assert.equal(r.status, 0, r.stderr + r.stdout);
      const out = JSON.parse(r.stdout.trim().split("\n").pop());
      assert.deepEqual(out.ack, { ok: true, seq: 1, duplicate: false });
      assert.deepEqual(out.dup, { ok: true, seq: 1, duplicate: true });
      assert.equal(out.batch.ok, true);
      assert.deepEqual(out.batch.results[0], { ok: true, seq: 2, duplicate: false });
      assert.equal(out.batch.results[1].error.code, "invalid_id");
      assert.deepEqual(out.sync.events.map((e) => e.id), ["py-1", "py-2"]);
      assert.equal(out.sync.lastSeq, 2);
      assert.equal(out.sync.logId, out.b_synced.logId, "sync names the same log as synced");
      assert.equal(out.b_synced.seq, 0);
      assert.match(out.b_synced.logId, /^[0-9a-f]{32}$/);
      assert.deepEqual(Object.keys(out.b_synced).sort(), ["logId", "seq"]);
      assert.equal(out.b_got_fanout, true);
      assert.deepEqual(out.b_ids, ["py-1", "py-2"]);
      assert.match(JSON.stringify(out.refused), /malformed_token/, "connect_error carries the stable code");
    } finally { assert.equal(await hub.stop(), 0); }
  });
}
