// A real three-node nats-server cluster with JetStream on loopback (Debian's
// nats-server), started and stopped by the tests; plus helpers to read the stream
// back with the official `nats` client, and a TCP proxy of our own that drops a
// connection right after a chosen publish (so its PubAck is lost).
import { spawn, execFileSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { connect, headers as natsHeaders, StringCodec } from "nats";
import { procs, tmp, sleep, freePort } from "../lib/hub.mjs";

export const NATS = process.env.NATS_SERVER_BIN || "nats-server";
export const TOKEN = "nats-secret";
const sc = StringCodec();

/**
 * Starts three JetStream nodes routed to each other; resolves once the cluster can place
 * a stream on all three (a probe R3 stream is created and deleted). A meta leader can be
 * elected by two nodes while the third never joins (its port taken between `freePort`
 * and its start by another process's outgoing connection): then R3 placement fails
 * forever ("no suitable peers for placement"). Such a start is thrown away and the
 * cluster started again on new ports, up to three times, saying why.
 */
export async function startCluster({ token = TOKEN } = {}) {
  let why;
  for (let attempt = 1; attempt <= 3; attempt++) {
    const c = await startClusterOnce({ token });
    try {
      await untilJs(c, 30000);
      await probePlacement(c, 30000);
      return c;
    } catch (e) {
      why = `${e.message}\n` + c.nodes.map((n) => `--- ${n.name} (${n.child?.exitCode !== null ? `exited ${n.child?.exitCode}` : "running"}):\n${(n.log || "").split("\n").slice(-15).join("\n")}`).join("\n");
      console.error(`startCluster: attempt ${attempt} did not form a cluster of three; starting again on new ports.\n${why}`);
      await c.stopAll("SIGKILL");
    }
  }
  throw new Error(`a three-node JetStream cluster did not form in three attempts: ${why}`);
}

/** Creates and deletes an R3 stream: every node is a JetStream peer of the meta group. */
async function probePlacement(c, ms) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    const dead = c.nodes.find((n) => n.child.exitCode !== null || n.child.signalCode);
    if (dead) throw new Error(`node ${dead.name} exited at start`);
    try {
      const nc = await c.client({ maxReconnectAttempts: 0, timeout: 1000 });
      try {
        const jsm = await nc.jetstreamManager({ timeout: 2000 });
        await jsm.streams.add({ name: "PROBE", subjects: ["probe.placement"], num_replicas: 3 });
        await jsm.streams.delete("PROBE");
        return;
      } finally { await nc.close(); }
    } catch (e) { last = e; }
    await sleep(300);
  }
  throw new Error(`an R3 stream could not be placed: ${last?.message ?? last}`);
}

async function startClusterOnce({ token }) {
  const dir = tmp("nats");
  const nodes = [];
  for (let i = 0; i < 3; i++) nodes.push({ name: `n${i + 1}`, port: await freePort(), cport: await freePort(), dir: path.join(dir, `n${i + 1}`) });
  for (const n of nodes) {
    fs.mkdirSync(n.dir, { recursive: true });
    const routes = nodes.filter((o) => o !== n).map((o) => `"nats-route://127.0.0.1:${o.cport}"`).join(", ");
    n.conf = path.join(dir, `${n.name}.conf`);
    fs.writeFileSync(n.conf, [
      `server_name: ${n.name}`,
      `listen: "127.0.0.1:${n.port}"`,
      `jetstream { store_dir: "${n.dir}", max_memory_store: 64MB, max_file_store: 2GB }`,
      `cluster { name: "poshub-test", listen: "127.0.0.1:${n.cport}", routes: [${routes}], no_advertise: true }`,
      token ? `authorization { token: "${token}" }` : "",
      "",
    ].join("\n"));
  }
  const c = {
    nodes, dir, token,
    url: (i) => `nats://127.0.0.1:${nodes[i].port}`,
    urls: () => nodes.map((n) => `nats://127.0.0.1:${n.port}`).join(","),
    start: (i) => startNode(nodes[i]),
    /** SIGKILL (default) or SIGTERM one node; resolves when it exited. */
    stop: (i, sig = "SIGKILL") => stopNode(nodes[i], sig),
    stopAll: async (sig = "SIGTERM") => { await Promise.all(nodes.map((n) => stopNode(n, sig))); },
    client: (opts = {}) => connect({ servers: nodes.map((n) => `127.0.0.1:${n.port}`), token, maxReconnectAttempts: -1, reconnectTimeWait: 200, ...opts }),
  };
  for (const n of nodes) startNode(n);
  return c;
}

/**
 * One JetStream server (not clustered) with `auth` as extra configuration text (an
 * `authorization` block, operator mode, `tls`); `clientOpts` log the tests' own
 * client in. Streams on it have one replica (the hub falls back from 3).
 */
export async function startServer({ auth = "", clientOpts = {}, name = "solo" } = {}) {
  const dir = tmp(`nats-${name}`);
  const n = { name, port: await freePort(), dir: path.join(dir, "js"), conf: path.join(dir, "server.conf") };
  fs.writeFileSync(n.conf, [`server_name: ${name}`, `listen: "127.0.0.1:${n.port}"`, `jetstream { store_dir: "${n.dir}", max_memory_store: 64MB, max_file_store: 1GB }`, auth, ""].join("\n"));
  const c = {
    nodes: [n], dir,
    url: () => `nats://127.0.0.1:${n.port}`,
    stopAll: async (sig = "SIGTERM") => stopNode(n, sig),
    client: (opts = {}) => connect({ servers: `127.0.0.1:${n.port}`, maxReconnectAttempts: -1, reconnectTimeWait: 200, ...clientOpts, ...opts }),
  };
  startNode(n);
  await untilJs(c, 20000);
  return c;
}

function startNode(n) {
  const child = spawn(NATS, ["-c", n.conf], { stdio: ["ignore", "ignore", "pipe"] });
  procs.add(child);
  n.log = "";
  child.stderr.on("data", (d) => { n.log += d; if (n.log.length > 200000) n.log = n.log.slice(-100000); });
  n.exited = new Promise((r) => child.on("exit", () => { procs.delete(child); r(); }));
  n.child = child;
  return child;
}

async function stopNode(n, sig) {
  if (!n.child || n.child.exitCode !== null || n.child.signalCode) return;
  n.child.kill(sig);
  await n.exited;
}

/** Waits until JetStream answers with a meta leader. */
async function untilJs(c, ms) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try {
      const nc = await c.client({ maxReconnectAttempts: 0, timeout: 1000 });
      try { const jsm = await nc.jetstreamManager({ timeout: 1000 }); await jsm.getAccountInfo(); return; } finally { await nc.close(); }
    } catch (e) { last = e; }
    await sleep(200);
  }
  throw new Error(`JetStream cluster not ready: ${last}`);
}

export async function withClient(c, f) {
  const nc = await c.client();
  try { return await f(nc); } finally { await nc.close(); }
}

/** Creates the stream as a chain operator would (the hub creates it otherwise). */
export async function createStream(c, { name = "POSHUB", replicas = 3, duplicateWindowMs } = {}) {
  return withClient(c, async (nc) => {
    const jsm = await nc.jetstreamManager();
    const cfg = { name, subjects: ["poshub.>"], num_replicas: replicas };
    if (duplicateWindowMs) cfg.duplicate_window = duplicateWindowMs * 1e6;
    // Right after start the meta leader may not yet know every peer ("no suitable peers
    // for placement"): retry for a while, as an operator's tooling would.
    for (let i = 0; ; i++) {
      try { return await jsm.streams.add(cfg); } catch (e) {
        if (i >= 60 || !/no suitable peers|insufficient resources|not available/i.test(String(e.message))) throw e;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  });
}

export async function streamInfo(c, name = "POSHUB", subject) {
  for (let i = 0; ; i++) {
    try { return await withClient(c, async (nc) => (await nc.jetstreamManager()).streams.info(name, subject ? { subjects_filter: subject } : undefined)); }
    catch (e) { if (i > 50) throw e; await sleep(200); }
  }
}

/** How many messages the stream holds on one subject (0 while it cannot tell). */
export async function countOn(c, subject, name = "POSHUB") {
  try {
    return await withClient(c, async (nc) => (await (await nc.jetstreamManager()).streams.info(name, { subjects_filter: subject })).state.subjects?.[subject] ?? 0);
  } catch { return 0; }
}

/** The node index leading the stream. */
export async function leaderOf(c, name = "POSHUB") {
  const info = await streamInfo(c, name);
  return c.nodes.findIndex((n) => n.name === info.cluster?.leader);
}

/** Every message on `subject` in stream order: {seq, msgId, hubSeq, data}. */
export async function readSubject(c, subject, name = "POSHUB") {
  return withClient(c, async (nc) => {
    const jsm = await nc.jetstreamManager();
    const js = nc.jetstream();
    const info = await jsm.streams.info(name, { subjects_filter: subject });
    const total = info.state.subjects?.[subject] ?? 0;
    const out = [];
    if (total === 0) return out;
    const consumer = await js.consumers.get(name, { filterSubjects: subject });
    const it = await consumer.consume();
    for await (const m of it) {
      out.push({ seq: m.seq, msgId: m.headers?.get("Nats-Msg-Id"), hubSeq: Number(m.headers?.get("Pos-Hub-Seq")), data: m.json() });
      if (out.length >= total) break;
    }
    await it.close();
    return out;
  });
}

/** Publishes raw bytes to a subject through JetStream (the chain's side of `down`). */
export async function publishDown(c, subject, items) {
  return withClient(c, async (nc) => {
    const js = nc.jetstream();
    for (const it of items) {
      const data = typeof it === "string" || it instanceof Uint8Array ? it : JSON.stringify(it);
      await js.publish(subject, typeof data === "string" ? sc.encode(data) : data);
    }
  });
}

export async function consumerInfo(c, consumer, name = "POSHUB") {
  return withClient(c, async (nc) => (await nc.jetstreamManager()).consumers.info(name, consumer));
}

/**
 * A TCP proxy in front of one server. After `cutAfter` publishes (HPUB) on
 * subjects starting with `prefix` have been forwarded whole, it closes both sides
 * at once, so the server stores that message and its PubAck never reaches the
 * client. `cuts` says how many times it does so; `cutAfter` counts per connection.
 */
export async function startProxy(target, { prefix = "poshub.", cutAfter = 100, cuts = 1 } = {}) {
  const port = await freePort();
  const p = { port, url: `nats://127.0.0.1:${port}`, cut: 0, conns: 0, pubs: 0 };
  const sockets = new Set();
  const server = net.createServer((client) => {
    p.conns++;
    const upstream = net.connect(target, "127.0.0.1");
    sockets.add(client); sockets.add(upstream);
    let buf = Buffer.alloc(0);
    let count = 0;
    let dead = false;
    const kill = () => { dead = true; client.destroy(); upstream.destroy(); };
    upstream.on("data", (d) => { if (!dead) client.write(d); });
    client.on("data", (d) => {
      if (dead) return;
      buf = Buffer.concat([buf, d]);
      // Forward whole protocol operations, counting HPUBs.
      let out = 0;
      for (;;) {
        const nl = buf.indexOf("\r\n", out);
        if (nl < 0) break;
        const line = buf.subarray(out, nl).toString("latin1");
        let end = nl + 2;
        const m = line.match(/^(H?PUB)\s+(\S+)\s+(?:\S+\s+)?(?:(\d+)\s+)?(\d+)$/i);
        if (m) {
          end = nl + 2 + Number(m[4]) + 2;
          if (buf.length < end) break;
          if (m[2].startsWith(prefix)) { count++; p.pubs++; }
          if (m[2].startsWith(prefix) && count === cutAfter && p.cut < cuts) {
            upstream.write(buf.subarray(0, end));
            p.cut++;
            // Let the server read the publish, then drop everything.
            setTimeout(kill, 20);
            dead = true;
            return;
          }
        }
        out = end;
      }
      if (out > 0) { upstream.write(buf.subarray(0, out)); buf = buf.subarray(out); }
    });
    const close = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
    client.on("error", close); upstream.on("error", close); client.on("close", close); upstream.on("close", close);
  });
  await new Promise((r) => server.listen(port, "127.0.0.1", r));
  p.stop = () => { for (const s of sockets) s.destroy(); return new Promise((r) => server.close(r)); };
  return p;
}

export function natsAvailable() {
  try { execFileSync(NATS, ["--version"], { stdio: "ignore" }); return true; } catch { return false; }
}
export { natsHeaders };
