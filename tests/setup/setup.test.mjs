// Issue 8 on the real hub binary run directly: an unclaimed hub (no realm, a claim key),
// claimed through its /setup page in headless Chromium (Debian's chromium driven by
// playwright-core, trusting only the store CA through its NSS database); forged and
// expired claim tokens refused; the status page then shows a device that connects and
// the event it sends (screenshot kept); /metrics; factory reset back to unclaimed with
// an empty log and the same CA fingerprint.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import https from "node:https";
import { io } from "socket.io-client";
import { HUB, procs, tmp, httpGet, startHub, sleep, freePort } from "../lib/hub.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const ARTIFACTS = process.env.TEST_ARTIFACTS || path.join(os.tmpdir(), "poshub-artifacts");

function keyPair(dir, name) {
  const priv = path.join(dir, `${name}.pem`), pub = path.join(dir, `${name}.pub.pem`);
  execFileSync("openssl", ["genpkey", "-algorithm", "ed25519", "-out", priv]);
  execFileSync("openssl", ["pkey", "-in", priv, "-pubout", "-out", pub]);
  return { priv, pub, b64: fs.readFileSync(pub).toString("base64") };
}
const mint = (key, { role = "till", device = "till-1", ttl = "1h", tenant = "t-abc", store = "s-001" } = {}) =>
  execFileSync(HUB, ["token", "mint", "--key", key, "--tenant", tenant, "--store", store, "--device", device, "--role", role, `--ttl=${ttl}`], { encoding: "utf8" }).trim();

function httpsGet(port, p, ca, headers = {}) {
  return new Promise((resolve, reject) => {
    https.get({ host: "127.0.0.1", servername: "localhost", port, path: p, ca, headers, timeout: 5000 }, (res) => {
      let b = ""; res.on("data", (d) => (b += d)); res.on("end", () => resolve({ status: res.statusCode, body: b, headers: res.headers }));
    }).on("error", reject);
  });
}

async function until(fn, ms, what) {
  const deadline = Date.now() + ms;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(200);
  }
}

test("claim in Chromium, status page shows the device and its event, /metrics, factory reset keeps the CA", async (t) => {
  if (!fs.existsSync(CHROMIUM) || spawnOk("which", ["certutil"]) === false) return t.skip("chromium or certutil missing (scripts/install-test-deps installs them)");
  const { chromium } = await import("playwright-core");
  const dir = tmp("setup");
  const claimKey = keyPair(dir, "tenant-cluster");
  const otherKey = keyPair(dir, "forger");
  const envFile = path.join(dir, "hub.env");
  fs.writeFileSync(envFile, `PORT=4001\nCLAIM_PUBLIC_KEY_BASE64=${claimKey.b64}\nMDNS=off\nNTP_SERVERS=off\n`);
  const dataDir = path.join(dir, "data");
  const port = await freePort();
  const args = ["serve", "--env-file", envFile, "--data-dir", dataDir, "--port", String(port)];
  let hub = await startHub({ dataDir, port, args });
  const ca = (await httpGet(port, "/ca.crt")).body;
  const fp0 = JSON.parse((await httpsGet(port, "/status", ca)).body).caFingerprint;

  // Unclaimed: no events, / goes to /setup.
  const refused = await new Promise((res) => {
    const s = io(`https://localhost:${port}`, { transports: ["websocket"], ca, auth: { token: mint(claimKey.priv) }, reconnection: false });
    s.on("connect", () => { s.close(); res("connected"); });
    s.on("connect_error", (e) => res(e.message));
  });
  assert.notEqual(refused, "connected", "an unclaimed hub accepts no device");
  const root = await httpsGet(port, "/", ca);
  assert.equal(root.status, 307);
  assert.equal(root.headers.location, "/setup");

  const home = tmp("home");
  fs.mkdirSync(path.join(home, ".pki", "nssdb"), { recursive: true });
  const caFile = path.join(dir, "ca.crt");
  fs.writeFileSync(caFile, ca);
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-N", "--empty-password"]);
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-A", "-n", "pos-hub store CA", "-t", "C,,", "-i", caFile]);
  const browser = await chromium.launch({
    executablePath: CHROMIUM, headless: true, env: { ...process.env, HOME: home },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  try {
    const page = await browser.newPage({ viewport: { width: 390, height: 844 } }); // a phone
    await page.goto(`https://localhost:${port}/`);
    assert.match(page.url(), /\/setup$/);
    const claimWith = async (token) => {
      await page.fill("#t", token);
      await page.click("#go");
      await page.waitForFunction(() => /Refused|Claimed|No answer/.test(document.getElementById("msg").textContent), null, { timeout: 10000 });
      return page.textContent("#msg");
    };
    assert.match(await claimWith(mint(otherKey.priv, { role: "claim", device: "setup" })), /Refused: .*signature/);
    assert.match(await claimWith(mint(claimKey.priv, { role: "claim", device: "setup", ttl: "-2h" })), /Refused: .*expired/);
    assert.match(await claimWith(mint(claimKey.priv, { role: "till", device: "setup" })), /Refused: .*not a claim token/);
    assert.match(await claimWith(mint(claimKey.priv, { role: "claim", device: "setup" })), /Claimed for t-abc:s-001/);
    await page.screenshot({ path: path.join(ARTIFACTS, "setup-claimed.png") });

    // The hub restarts itself as the store's hub (same process id, exec).
    await until(async () => JSON.parse((await httpsGet(port, "/status", ca)).body).realms?.[0]?.storeId === "s-001", 20000, "the claimed realm");

    // A till connects and sends an event.
    const till = io(`https://localhost:${port}`, { transports: ["websocket"], ca, auth: { token: mint(claimKey.priv, { device: "till-7" }) }, reconnection: false });
    await new Promise((res, rej) => { till.on("connect", res); till.on("connect_error", (e) => rej(e)); });
    const ack = await till.timeout(5000).emitWithAck("event", { id: "sale-1", type: "order.paid", payload: { total: 9.5 } });
    assert.equal(ack.ok, true);

    // The status page, as the store admin: the admin token is kept by the page and sent
    // with every poll (from localhost the hub shows full detail even without it; on the
    // LAN the page asks for it).
    await page.goto(`https://localhost:${port}/`);
    await page.evaluate((t) => localStorage.setItem("poshub-admin", t), mint(claimKey.priv, { role: "admin", device: "owner" }));
    await page.reload();
    await page.waitForFunction(() => document.body.innerText.includes("till-7"), null, { timeout: 10000 });
    const text = await page.innerText("body");
    assert.match(text, /Store t-abc:s-001/);
    assert.match(text, /events today\s*1\b/);
    assert.match(text, /1 till/);
    assert.match(text, /download the CA certificate/);
    assert.match(text, new RegExp(fp0.slice(0, 20)));
    await page.screenshot({ path: path.join(ARTIFACTS, "status-page.png"), fullPage: true });
    till.close();
  } finally { await browser.close(); }

  // /metrics: localhost sees it, an anonymous LAN caller would not (checked via the token path).
  const metrics = await httpsGet(port, "/metrics", ca);
  assert.equal(metrics.status, 200);
  assert.match(metrics.body, /poshub_events_today\{tenant="t-abc",store="s-001"\} 1/);
  assert.match(metrics.body, /poshub_devices_connected/);

  // Factory reset of a stopped hub: back to unclaimed, empty log, same CA.
  assert.equal(await hub.stop(), 0);
  const noConfirm = spawnResult(HUB, ["reset", "--data-dir", dataDir]);
  assert.notEqual(noConfirm.code, 0);
  assert.match(noConfirm.out, /confirmation|--yes/);
  const r = spawnResult(HUB, ["reset", "--data-dir", dataDir, "--yes"]);
  assert.equal(r.code, 0, r.out);
  hub = await startHub({ dataDir, port, args });
  const st = JSON.parse((await httpsGet(port, "/status", ca)).body);
  assert.equal(st.realms.length, 0, "unclaimed again");
  assert.equal(st.caFingerprint, fp0, "the store CA survived the reset");
  assert.equal((await httpsGet(port, "/", ca)).status, 307);
  await hub.stop();
});

function spawnResult(cmd, args) {
  try {
    const out = execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    return { code: 0, out };
  } catch (e) { return { code: e.status ?? 1, out: `${e.stdout || ""}${e.stderr || ""}` }; }
}
function spawnOk(cmd, args) { return spawnResult(cmd, args).code === 0; }
