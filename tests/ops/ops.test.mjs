// Issue 20 on the real hub binary run directly (TLS on, RUST_LOG=debug so the noisiest
// libraries are on, its data directory on a small tmpfs we can fill): logs over the admin
// API with curl and `pos-hub logs -f`, refusals from a LAN address without a token and
// with a device token, the support bundle unpacked with tar and checked file by file,
// every configured secret grepped for in the logs and the bundle, the fleet metrics, and
// the status page in headless Chromium at phone size with the events-per-hour chart drawn
// from real events, the outbox chart, the clock and disk banners (screenshots kept).
import { test, after, before } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import https from "node:https";
import { io } from "socket.io-client";
import WebSocket from "ws";
import { HUB, procs, tmp, httpGet, startHub, sleep, freePort } from "../lib/hub.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARTIFACTS = process.env.TEST_ARTIFACTS || path.join(os.tmpdir(), "poshub-artifacts");
const root = process.getuid?.() === 0;
const cleanups = [];
after(() => {
  for (const p of procs) try { p.kill("SIGKILL"); } catch {}
  for (const c of cleanups.reverse()) try { c(); } catch {}
});

const run = (cmd, args, opts = {}) => {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: 30000, ...opts });
  return { code: r.status, out: (r.stdout || "") + (r.stderr || ""), stdout: r.stdout || "" };
};
function keyPair(dir, name) {
  const priv = path.join(dir, `${name}.pem`), pub = path.join(dir, `${name}.pub.pem`);
  execFileSync("openssl", ["genpkey", "-algorithm", "ed25519", "-out", priv]);
  execFileSync("openssl", ["pkey", "-in", priv, "-pubout", "-out", pub]);
  return { priv, pub, b64: fs.readFileSync(pub).toString("base64") };
}
const mint = (key, { role = "till", device = "till-1", tenant = "t-ops", store = "s-1" } = {}) =>
  execFileSync(HUB, ["token", "mint", "--key", key, "--tenant", tenant, "--store", store, "--device", device, "--role", role, "--ttl=1h"], { encoding: "utf8" }).trim();

/** HTTPS to the hub from `host` (a LAN address of this machine, or 127.0.0.1). */
function req(host, port, p, ca, { token, method = "GET" } = {}) {
  return new Promise((resolve, reject) => {
    const r = https.request({ host, servername: "localhost", port, path: p, method, ca, timeout: 10000,
      headers: token ? { authorization: `Bearer ${token}` } : {} }, (res) => {
      const chunks = []; res.on("data", (d) => chunks.push(d));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
    });
    r.on("error", reject); r.end();
  });
}
async function until(fn, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}
// A non-loopback address of this machine: connecting to it from here is a LAN caller.
const lanAddr = Object.values(os.networkInterfaces()).flat().find((i) => i && i.family === "IPv4" && !i.internal)?.address;
const LINE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (ERROR|WARN |INFO |DEBUG|TRACE) \S+ /;

const S = {};
before(async () => {
  const dir = tmp("ops");
  S.dir = dir;
  S.key = keyPair(dir, "cluster");
  S.forger = keyPair(dir, "forger");
  S.dataDir = path.join(dir, "data");
  fs.mkdirSync(S.dataDir);
  if (root && run("mount", ["-t", "tmpfs", "-o", "size=48m", "tmpfs", S.dataDir]).code === 0) {
    S.tmpfs = true;
    cleanups.push(() => run("umount", ["-l", S.dataDir]));
  }
  S.secrets = {
    bridgeToken: "cbt-" + crypto.randomBytes(18).toString("hex"),
    nutPassword: "nutpw-" + crypto.randomBytes(12).toString("hex"),
  };
  const closed = await freePort(); // nothing listens: the cloud and the UPS are down
  const env = path.join(dir, "hub.env");
  fs.writeFileSync(env, [
    "TENANT_ID=t-ops", "STORE_ID=s-1", `CLUSTER_PUBLIC_KEY_BASE64=${S.key.b64}`,
    `CLOUD_BRIDGE_URL=http://127.0.0.1:${closed}/v1/events/ingest`, `CLOUD_BRIDGE_TOKEN=${S.secrets.bridgeToken}`,
    `UPS_NUT=ups@127.0.0.1:${closed}`, "UPS_NUT_USER=monitor", `UPS_NUT_PASSWORD=${S.secrets.nutPassword}`,
    "SOCKET_BUFFER=64", "MDNS=off", "NTP_SERVERS=off", "",
  ].join("\n"));
  S.port = await freePort();
  S.hub = await startHub({ dataDir: S.dataDir, port: S.port, env: { RUST_LOG: "debug" },
    args: ["serve", "--env-file", env, "--data-dir", S.dataDir, "--port", String(S.port)] });
  S.ca = (await httpGet(S.port, "/ca.crt")).body;
  S.caFile = path.join(dir, "ca.crt");
  fs.writeFileSync(S.caFile, S.ca);
  S.admin = mint(S.key.priv, { role: "admin", device: "owner" });
  S.till = mint(S.key.priv, { device: "till-7" });
  S.secrets.admin = S.admin;
  S.secrets.till = S.till;
  // The private key's base64 body (the public one is configured, so it may appear).
  S.secrets.privateKey = fs.readFileSync(S.key.priv, "utf8").split("\n").filter((l) => l && !l.startsWith("-----")).join("");
  S.marker = "payload-marker-" + crypto.randomBytes(8).toString("hex");

  // Real traffic: a till sends 5 events; a second one connects and leaves; a forged token is refused.
  const till = io(`https://localhost:${S.port}`, { transports: ["websocket"], ca: S.ca, auth: { token: S.till }, reconnection: false });
  await new Promise((res, rej) => { till.on("connect", res); till.on("connect_error", rej); });
  for (let i = 0; i < 5; i++) {
    const ack = await till.timeout(5000).emitWithAck("event", { id: `sale-${i}`, type: "order.paid", payload: { note: S.marker, total: i } });
    assert.equal(ack.ok, true);
  }
  S.tillSock = till;
  const other = io(`https://localhost:${S.port}`, { transports: ["websocket"], ca: S.ca, auth: { token: mint(S.key.priv, { device: "kds-1", role: "kitchen" }) }, reconnection: false });
  await new Promise((res, rej) => { other.on("connect", res); other.on("connect_error", rej); });
  other.disconnect();
  const refused = await new Promise((res) => {
    const s = io(`https://localhost:${S.port}`, { transports: ["websocket"], ca: S.ca, auth: { token: mint(S.forger.priv, { device: "evil" }) }, reconnection: false });
    s.on("connect", () => { s.close(); res("connected"); });
    s.on("connect_error", (e) => res(e.message));
  });
  assert.equal(refused, "bad_signature");
});

test("GET /admin/logs: curl, lines/since/format, refusals from the LAN without an admin token", async () => {
  const curl = (q, extra = []) => run("curl", ["-sS", "--cacert", S.caFile, ...extra, `https://localhost:${S.port}${q}`]);
  const all = curl("/admin/logs?lines=2000");
  assert.equal(all.code, 0, all.out);
  const lines = all.stdout.trimEnd().split("\n");
  assert.ok(lines.length > 10, all.stdout);
  for (const l of lines) assert.match(l, LINE, `every line carries time, level and source: ${l}`);
  assert.ok(lines.some((l) => / INFO  hub\/serve pos-hub listening/.test(l)), "the hub's start line");
  const times = lines.map((l) => Date.parse(l.slice(0, 24)));
  assert.deepEqual(times, [...times].sort((a, b) => a - b), "newest last");
  assert.equal(curl("/admin/logs?lines=5").stdout.trimEnd().split("\n").length, 5);
  assert.equal(curl("/admin/logs?since=2099-01-01T00:00:00Z").stdout, "");
  const recent = curl("/admin/logs?since=1h&lines=100000").stdout.trimEnd().split("\n");
  assert.ok(recent.length >= lines.length, "everything was written in the last hour");
  const bad = curl("/admin/logs?since=yesterday-ish", ["-w", "%{http_code}"]);
  assert.match(bad.stdout, /400$/);
  const json = curl("/admin/logs?lines=3&format=json").stdout.trimEnd().split("\n").map((l) => JSON.parse(l));
  assert.equal(json.length, 3);
  for (const e of json) assert.ok(e.time && e.level && e.source && typeof e.timeMs === "number", JSON.stringify(e));

  if (!lanAddr) { console.log("# no non-loopback IPv4 address here: LAN refusals not checked"); return; }
  const lan = (q, token) => req(lanAddr, S.port, q, S.ca, { token });
  assert.equal((await lan("/admin/logs")).status, 401, "no token from the LAN");
  assert.equal((await lan("/admin/logs", S.till)).status, 401, "a device token is not an admin token");
  assert.equal((await lan("/admin/logs", mint(S.forger.priv, { role: "admin" }))).status, 401, "a forged admin token");
  const ok = await lan("/admin/logs?lines=3", S.admin);
  assert.equal(ok.status, 200);
  assert.equal(ok.body.toString().trimEnd().split("\n").length, 3);
  // curl from the LAN address too (the name stays localhost for the certificate).
  const c = run("curl", ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", S.caFile, "--resolve", `localhost:${S.port}:${lanAddr}`,
    "-H", `Authorization: Bearer ${S.till}`, `https://localhost:${S.port}/admin/logs`]);
  assert.equal(c.stdout, "401");
});

/** Spawns a follower and resolves with a function waiting for a line matching re. */
function follower(cmd, args) {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  procs.add(child);
  let out = "", err = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  return {
    child, out: () => out,
    wait: (re, ms) => until(() => re.test(out), ms, `${re} in the follower's output (${err})`),
    stop: () => { child.kill("SIGTERM"); procs.delete(child); },
  };
}

test("pos-hub logs -f and curl --no-buffer follow: a new line within a second", async () => {
  const cli = follower(HUB, ["logs", "--hub", `https://localhost:${S.port}`, "--ca", S.caFile, "--token", S.admin, "-f", "-n", "5"]);
  const raw = follower("curl", ["-sSN", "--cacert", S.caFile, "-H", `Authorization: Bearer ${S.admin}`, `https://localhost:${S.port}/admin/logs?follow=1&lines=0`]);
  try {
    await cli.wait(/\n.*\n.*\n.*\n.*\n/, 10000); // the 5 newest lines arrived first
    assert.equal(cli.out().trimEnd().split("\n").length, 5);
    await sleep(500); // both followers are now polling
    // A fresh, unique line: a device connecting is logged (DEBUG) with its id, named now.
    const dev = "probe-" + crypto.randomBytes(4).toString("hex");
    const s = io(`https://localhost:${S.port}`, { transports: ["websocket"], ca: S.ca, auth: { token: mint(S.key.priv, { device: dev, tenant: "t-ops", store: "s-1" }) }, reconnection: false });
    await new Promise((res) => s.on("connect", res));
    const re = new RegExp(`device connected .*${dev}|${dev}.*device connected`);
    // From the time the hub wrote the line (its own stamp) to each follower printing it.
    const seen = await Promise.all([cli, raw].map(async (f) => { await f.wait(re, 5000); return Date.now(); }));
    const line = cli.out().split("\n").find((l) => re.test(l));
    const ms = seen.map((t) => t - Date.parse(line.slice(0, 24)));
    console.log(`# the new line reached pos-hub logs -f in ${ms[0]} ms and curl -N in ${ms[1]} ms after the hub wrote it`);
    for (const m of ms) assert.ok(m < 1000, `a follower saw the new line ${m} ms after it was written`);
    for (const l of cli.out().trimEnd().split("\n")) assert.match(l, LINE);
    s.disconnect();
  } finally { cli.stop(); raw.stop(); }
});

test("support bundle: pos-hub support-bundle, unpacked and checked file by file; refusals; no event contents", async () => {
  if (lanAddr) {
    assert.equal((await req(lanAddr, S.port, "/admin/support-bundle", S.ca)).status, 401);
    assert.equal((await req(lanAddr, S.port, "/admin/support-bundle", S.ca, { token: S.till })).status, 401);
  }
  const out = path.join(S.dir, "bundle.tar.gz");
  const r = run(HUB, ["support-bundle", "--hub", `https://localhost:${S.port}`, "--ca", S.caFile, "--token", S.admin, "-o", out]);
  assert.equal(r.code, 0, r.out);
  const x = path.join(S.dir, "bundle");
  fs.mkdirSync(x);
  const t = run("tar", ["xzf", out, "-C", x]);
  assert.equal(t.code, 0, t.out);
  const [top] = fs.readdirSync(x);
  assert.match(top, /^pos-hub-support-.+-\d{8}T\d{6}Z$/);
  const d = path.join(x, top);
  const read = (f) => fs.readFileSync(path.join(d, f), "utf8");
  const files = fs.readdirSync(d).sort();
  for (const f of ["MANIFEST.txt", "status.json", "logs.txt", "versions.json", "partitions.json", "update.json", "clock-power.json", "realms.json", "metrics.txt"])
    assert.ok(files.includes(f), `${f} in the bundle (${files})`);
  const manifest = read("MANIFEST.txt");
  for (const f of files.filter((f) => f !== "MANIFEST.txt")) assert.match(manifest, new RegExp(`^${f}\\t${fs.statSync(path.join(d, f)).size}$`, "m"), `MANIFEST lists ${f} with its size`);

  const st = JSON.parse(read("status.json"));
  const live = JSON.parse((await req("127.0.0.1", S.port, "/status", S.ca)).body);
  assert.equal(st.version, live.version);
  assert.equal(st.realms[0].storeId, "s-1");
  assert.ok(st.realms[0].lastSeq >= 5);
  const logs = read("logs.txt").trimEnd().split("\n");
  assert.ok(logs.length > 10);
  for (const l of logs) assert.match(l, LINE);
  assert.ok(logs.some((l) => /pos-hub listening/.test(l)));
  const v = JSON.parse(read("versions.json"));
  assert.equal(v.runningVersion, live.version);
  assert.ok(v.kernel && typeof v.appliance === "boolean");
  assert.ok(v.packageList === "packages.txt" ? files.includes("packages.txt") : /not the firmware image/.test(v.packageList));
  const parts = JSON.parse(read("partitions.json"));
  const data = parts.usage.find((p) => p.role === "data");
  assert.ok(data && data.bytesTotal > 0 && data.bytesFree <= data.bytesTotal, JSON.stringify(parts.usage));
  if (S.tmpfs) assert.ok(data.bytesTotal <= 48 * 1048576 + 1, "the tmpfs data partition");
  assert.ok(parts.mounts.length > 0);
  const up = JSON.parse(read("update.json"));
  assert.ok("history" in up && "failedVersions" in up && up.status.runningVersion === live.version, JSON.stringify(up));
  const cp = JSON.parse(read("clock-power.json"));
  assert.ok(["synced", "floor", "unknown"].includes(cp.clock.state));
  assert.ok(cp.power && Array.isArray(cp.power.sources), "the UPS watcher's state");
  assert.ok(Math.abs(Date.parse(cp.systemTime) - Date.now()) < 60000);
  const realms = JSON.parse(read("realms.json"));
  assert.equal(realms.length, 1);
  assert.equal(realms[0].tenantId, "t-ops");
  assert.equal(realms[0].lanEvents, 5);
  assert.equal(realms[0].cloudEvents, 0);
  assert.equal(realms[0].outboxDepth, 5, "the cloud is down: all 5 wait");
  assert.equal(realms[0].bridgeConfigured, true);
  assert.ok(realms[0].databaseBytes > 0);
  assert.match(read("metrics.txt"), /poshub_ack_latency_seconds_count \d+/);

  // No event contents anywhere in the bundle (the payload marker, the event ids' payloads).
  const everything = files.map((f) => read(f)).join("\n");
  assert.ok(!everything.includes(S.marker), "an event payload leaked into the bundle");
  assert.ok(!everything.includes("order.paid"), "event types are contents too");
  S.bundleText = everything;
});

test("metrics an operator graphs: ack latency, commit batches, bridge lag, events by origin, connects/disconnects by reason, disk", async () => {
  const m = (await req("127.0.0.1", S.port, "/metrics", S.ca)).body.toString();
  const num = (re) => { const x = m.match(re); assert.ok(x, `${re} in /metrics`); return Number(x[1]); };
  assert.ok(num(/^poshub_ack_latency_seconds_count (\d+)$/m) >= 5);
  assert.ok(num(/^poshub_ack_latency_seconds_bucket\{le="\+Inf"\} (\d+)$/m) >= 5);
  assert.ok(num(/^poshub_ack_latency_seconds_sum ([\d.e-]+)$/m) > 0);
  assert.ok(num(/^poshub_commit_batch_events_count (\d+)$/m) >= 1);
  assert.ok(num(/^poshub_commit_batch_events_sum ([\d.]+)$/m) >= 5);
  assert.equal(num(/^poshub_events_total\{tenant="t-ops",store="s-1",origin="lan"\} (\d+)$/m), 5);
  assert.equal(num(/^poshub_events_total\{tenant="t-ops",store="s-1",origin="cloud"\} (\d+)$/m), 0);
  assert.ok(num(/^poshub_bridge_push_lag_seconds\{tenant="t-ops",store="s-1"\} ([\d.]+)$/m) > 0, "the cloud is down: the oldest event waits");
  assert.ok(num(/^poshub_device_connects_total\{role="till"\} (\d+)$/m) >= 1);
  assert.ok(num(/^poshub_device_connects_total\{role="kitchen"\} (\d+)$/m) >= 1);
  assert.ok(num(/^poshub_device_disconnects_total\{reason="client_disconnect"\} (\d+)$/m) >= 1);
  assert.equal(num(/^poshub_device_refused_total\{code="bad_signature"\} (\d+)$/m), 1);
  assert.ok(num(/^poshub_data_bytes_free (\d+)$/m) > 0);
  // Prometheus refuses a scrape that names a family twice (a second HELP or TYPE line).
  const families = [...m.matchAll(/^# TYPE (\S+) /gm)].map((x) => x[1]);
  assert.deepEqual(families.filter((f, i) => families.indexOf(f) !== i), [], "each metric family once in /metrics");
  if (lanAddr) assert.equal((await req(lanAddr, S.port, "/metrics", S.ca, { token: S.till })).status, 401);
});

test("status page on a phone: events-per-hour chart from real events, outbox chart, banners, logs and bundle for the admin", async (t) => {
  if (!fs.existsSync(CHROMIUM) || run("which", ["certutil"]).code !== 0) return t.skip("chromium or certutil missing (scripts/install-test-deps installs them)");
  const { chromium } = await import("playwright-core");
  const home = tmp("ops-home");
  fs.mkdirSync(path.join(home, ".pki", "nssdb"), { recursive: true });
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-N", "--empty-password"]);
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-A", "-n", "pos-hub store CA", "-t", "C,,", "-i", S.caFile]);
  const browser = await chromium.launch({
    executablePath: CHROMIUM, headless: true, env: { ...process.env, HOME: home },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  try {
    const ctx = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, acceptDownloads: true });
    const page = await ctx.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    // The page is served from the hub; on the LAN it would ask for the token: give it.
    await page.goto(`https://localhost:${S.port}/`);
    await page.evaluate((tok) => localStorage.setItem("poshub-admin", tok), S.admin);
    await page.reload();
    const hours = await page.waitForFunction(() => {
      const c = document.querySelector("canvas[data-hours]");
      return c && c.dataset.total === "5" && c.dataset.bars ? JSON.parse(c.dataset.bars) : null;
    }, null, { timeout: 15000 }).then((h) => h.jsonValue());
    const hour = new Date().getUTCHours();
    assert.equal(hours.length, 24);
    assert.equal(hours[hour].n, 5, "this hour's bar holds the 5 events sent");
    assert.equal(hours.filter((b) => b.n).length, 1);
    // The bar is really drawn: coloured pixels inside it, none in an empty hour's column.
    const ink = await page.evaluate(([b, empty]) => {
      const c = document.querySelector("canvas[data-hours]"), g = c.getContext("2d"), k = c.width / c.clientWidth;
      const count = (r) => { const d = g.getImageData(Math.round(r.x * k), Math.round((r.y) * k), Math.max(1, Math.round(r.w * k)), Math.max(1, Math.round(r.h * k))).data; let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; };
      return { bar: count(b), empty: count({ x: empty.x, y: b.y, w: empty.w, h: b.h - 2 }) };
    }, [hours[hour], hours[(hour + 12) % 24]]);
    assert.ok(ink.bar > 50, `the bar has ink (${ink.bar} px)`);
    assert.equal(ink.empty, 0, "an empty hour has no bar");
    const outbox = await page.waitForFunction(() => document.querySelector("canvas[data-outbox]")?.dataset.last, null, { timeout: 15000 }).then((h) => h.jsonValue());
    assert.equal(outbox, "5", "outbox depth: the 5 events the cloud has not taken");
    const text = await page.innerText("body");
    assert.match(text, /Clock not trusted/, "NTP is off: the clock is not verified");
    assert.match(text, /\d+(\.\d)? (MB|GB) free of \d+(\.\d)? (MB|GB)/, "sizes in MB/GB");
    assert.doesNotMatch(text, /MiB/);
    assert.doesNotMatch(text, /Disk nearly full/);
    await page.screenshot({ path: path.join(ARTIFACTS, "ops-status-page.png"), fullPage: true });

    // Logs and the support bundle from the page (it sends the admin token).
    await page.click("#logsBtn");
    await page.waitForFunction(() => /pos-hub listening/.test(document.getElementById("logs").textContent), null, { timeout: 10000 });
    const [dl] = await Promise.all([page.waitForEvent("download", { timeout: 15000 }), page.click("#bundleBtn")]);
    assert.match(dl.suggestedFilename(), /^pos-hub-support-.+\.tar\.gz$/);
    const saved = path.join(S.dir, "from-page.tar.gz");
    await dl.saveAs(saved);
    assert.match(run("tar", ["tzf", saved]).stdout, /realms\.json/);
    await page.locator("#admin").screenshot({ path: path.join(ARTIFACTS, "ops-logs.png") });

    // Disk nearly full: fill the tmpfs data partition to over 90%.
    if (S.tmpfs) {
      const st = JSON.parse((await req("127.0.0.1", S.port, "/status", S.ca)).body).system;
      const filler = path.join(S.dataDir, "filler.bin");
      const bytes = st.dataBytesFree - Math.floor(st.dataBytesTotal * 0.05);
      const fd = fs.openSync(filler, "w");
      const chunk = Buffer.alloc(1 << 20);
      for (let left = bytes; left > 0; left -= chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, left));
      fs.closeSync(fd);
      try {
        await page.waitForSelector("[data-banner=disk]", { timeout: 10000 });
        await page.evaluate(() => scrollTo(0, 0));
        assert.match(await page.innerText("[data-banner=disk]"), /Disk nearly full: \d+ MB free of \d+ MB/);
        await page.screenshot({ path: path.join(ARTIFACTS, "ops-disk-nearly-full.png") });
        const m = (await req("127.0.0.1", S.port, "/metrics", S.ca)).body.toString();
        assert.ok(Number(m.match(/^poshub_data_bytes_free (\d+)$/m)[1]) < st.dataBytesTotal * 0.1);
      } finally { fs.rmSync(filler); }
      await page.waitForFunction(() => !document.querySelector("[data-banner=disk]"), null, { timeout: 10000 });
    } else console.log("# not root: the disk-full banner is not checked (needs a tmpfs)");
    assert.deepEqual(errors, []);
  } finally { await browser.close(); }
});

test("a device that stops reading is cut and counted as queue_full", async () => {
  const lazy = new WebSocket(`wss://localhost:${S.port}/socket.io/?EIO=4&transport=websocket`, { ca: S.ca });
  await new Promise((res, rej) => { lazy.on("open", res); lazy.on("error", rej); });
  lazy.send(`40${JSON.stringify({ token: mint(S.key.priv, { device: "lazy-1" }) })}`);
  await until(async () => JSON.parse((await req("127.0.0.1", S.port, "/status", S.ca)).body).realms[0].devices.some((d) => d.deviceId === "lazy-1"), 5000, "lazy-1 connected");
  lazy._socket.pause(); // reads nothing more
  const gauge = async () => Number(((await req("127.0.0.1", S.port, "/metrics", S.ca)).body.toString().match(/^poshub_device_disconnects_total\{reason="queue_full"\} (\d+)$/m) || [0, 0])[1]);
  const pad = "x".repeat(1000);
  for (let b = 0; b < 40 && (await gauge()) === 0; b++) {
    const ack = await S.tillSock.timeout(20000).emitWithAck("events", Array.from({ length: 250 }, (_, i) => ({ id: `flood-${b}-${i}`, type: "t", payload: { pad } })));
    assert.equal(ack.ok, true);
  }
  await until(async () => (await gauge()) >= 1, 15000, "queue_full in /metrics");
  lazy.terminate();
});

test("no secret in any log line or in the bundle, after a full run", async () => {
  S.tillSock?.close();
  assert.equal(await S.hub.stop(), 0);
  const logDir = path.join(S.dataDir, "log");
  const files = fs.readdirSync(logDir).map((f) => path.join(logDir, f));
  assert.ok(files.some((f) => f.endsWith("hub.log")), `the hub wrote its own log: ${files}`);
  const text = files.map((f) => fs.readFileSync(f, "utf8")).join("\n");
  assert.ok(/stopped cleanly/.test(text), "the file holds the whole run");
  assert.ok(/DEBUG/.test(text), "RUST_LOG=debug was on");
  const haystacks = { "log files": text, "hub stderr": S.hub.log(), bundle: S.bundleText || "" };
  for (const [name, secret] of Object.entries(S.secrets))
    for (const [where, hay] of Object.entries(haystacks)) {
      assert.ok(secret.length > 16);
      assert.ok(!hay.includes(secret), `${name} appears in the ${where}`);
      // A JWT's signature alone is enough to replay nothing, but its claims part is
      // the token's identity: check the halves too.
      if (secret.split(".").length === 3) for (const part of secret.split(".").slice(1)) assert.ok(!hay.includes(part), `part of ${name} in the ${where}`);
    }
  assert.ok(!text.includes(S.marker), "event payloads are not logged");
});
