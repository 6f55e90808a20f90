// System tests of issue 3: the store CA and TLS/WSS on one port, with real clients that trust
// only the store CA: curl, openssl s_client, the official socket.io-client, headless Chromium
// with the CA in its NSS database. Every hub runs on loopback (or in a network namespace this
// test creates) with MDNS=off; every wait is bounded.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { io } from "socket.io-client";
import { HUB, procs, tmp, freePort, httpGet, run, startHub, sleep } from "../lib/hub.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

async function caOf(hub) {
  const r = await httpGet(hub.port, "/ca.crt");
  assert.equal(r.status, 200);
  assert.match(r.body, /-----BEGIN CERTIFICATE-----/);
  const f = path.join(hub.dataDir, "fetched-ca.crt");
  fs.writeFileSync(f, r.body);
  return f;
}

test("plain HTTP answers only /healthz and /ca.crt; everything else is redirected or refused", async () => {
  const hub = await startHub();
  try {
    const h = await httpGet(hub.port, "/healthz");
    assert.equal(h.status, 200); assert.equal(h.body.trim(), "ok");
    await caOf(hub);
    const s = await httpGet(hub.port, "/status");
    assert.equal(s.status, 308);
    assert.match(s.headers.location, /^https:\/\/127\.0\.0\.1:\d+\/status$/);
    assert.doesNotMatch(s.body, /realms|tenantId/);
    const p = await httpGet(hub.port, "/socket.io/?EIO=4&transport=polling");
    assert.equal(p.status, 308, "Socket.IO polling over plain HTTP must not be served");
    const post = await httpGet(hub.port, "/status", "127.0.0.1", "POST");
    assert.equal(post.status, 426);
    // curl http:// to the old runbook's health URL, exactly as before.
    assert.equal(run("curl", ["-sf", `http://localhost:${hub.port}/healthz`]).out.trim(), "ok");
  } finally { assert.equal(await hub.stop(), 0); }
});

test("curl and openssl trust the hub with only the store CA, and fail without it", async () => {
  const hub = await startHub();
  try {
    const ca = await caOf(hub);
    for (const host of ["127.0.0.1", "localhost", "[::1]"]) {
      const r = run("curl", ["-sS", "--cacert", ca, `https://${host}:${hub.port}/healthz`]);
      assert.equal(r.code, 0, `${host}: ${r.out}`); assert.equal(r.out.trim(), "ok");
    }
    const none = run("curl", ["-sS", `https://127.0.0.1:${hub.port}/healthz`]);
    assert.equal(none.code, 60, `curl without the CA must fail verification: ${none.out}`);
    const s = run("openssl", ["s_client", "-connect", `127.0.0.1:${hub.port}`, "-servername", "localhost", "-CAfile", ca, "-verify_return_error", "-verify_hostname", "localhost"], { input: "" });
    assert.match(s.out, /Verify return code: 0 \(ok\)/, s.out);
    const bad = run("openssl", ["s_client", "-connect", `127.0.0.1:${hub.port}`, "-servername", "localhost", "-verify_return_error", "-CApath", "/nonexistent"], { input: "" });
    assert.notEqual(bad.code, 0, "openssl without the CA must fail");
    // The leaf: serverAuth, at most 397 days, issued by the store CA.
    const leafPem = run("openssl", ["s_client", "-connect", `127.0.0.1:${hub.port}`, "-servername", "localhost", "-showcerts"], { input: "" }).out.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/)[0];
    const text = run("openssl", ["x509", "-noout", "-text", "-dates"], { input: leafPem }).out;
    assert.match(text, /TLS Web Server Authentication/);
    assert.match(text, /DNS:localhost/); assert.match(text, /IP Address:127\.0\.0\.1/);
    const days = (Date.parse(text.match(/notAfter=(.*)/)[1]) - Date.parse(text.match(/notBefore=(.*)/)[1])) / 86400000;
    assert.ok(days <= 397, `leaf valid ${days} days`);
    // The fingerprint agrees everywhere.
    const st = JSON.parse(run("curl", ["-sS", "--cacert", ca, `https://localhost:${hub.port}/status`]).out);
    const cli = execFileSync(HUB, ["ca", "fingerprint", "--data-dir", hub.dataDir], { encoding: "utf8" }).trim();
    const ossl = run("openssl", ["x509", "-noout", "-fingerprint", "-sha256", "-in", ca]).out.split("=")[1].trim();
    assert.equal(st.caFingerprint, cli); assert.equal(cli, ossl);
  } finally { assert.equal(await hub.stop(), 0); }
});

test("socket.io-client over wss:// trusting only the store CA does the event round trip", async () => {
  const hub = await startHub();
  try {
    const ca = fs.readFileSync(await caOf(hub));
    const opts = { transports: ["websocket"], auth: { token: hub.token }, ca, reconnection: false, timeout: 5000 };
    const a = io(`https://localhost:${hub.port}`, opts);
    const b = io(`https://localhost:${hub.port}`, { ...opts, auth: { token: hub.token, since: 0 } });
    // Listen for `synced` before it can arrive (it follows the connect at once).
    const bSynced = new Promise((res, rej) => { b.once("synced", res); setTimeout(() => rej(new Error("no synced")), 10000); });
    await Promise.all([a, b].map((s) => new Promise((res, rej) => { s.on("connect", res); s.on("connect_error", rej); })));
    await bSynced;
    const got = new Promise((r) => b.once("event", r));
    const ack = await a.timeout(5000).emitWithAck("event", { id: "wss-1", type: "order.created", payload: { total: 3 } });
    assert.deepEqual(ack, { ok: true, seq: 1, duplicate: false });
    const e = await got;
    assert.equal(e.id, "wss-1"); assert.equal(e.seq, 1); assert.equal(e.origin, "lan");
    a.close(); b.close();
    // The default transport (HTTP long-polling, then upgrade) works over HTTPS too.
    const p = io(`https://localhost:${hub.port}`, { auth: { token: hub.token }, ca, reconnection: false });
    await new Promise((res, rej) => { p.on("connect", res); p.on("connect_error", rej); });
    const ack2 = await p.timeout(5000).emitWithAck("event", { id: "poll-1", type: "t", payload: null });
    assert.equal(ack2.ok, true); p.close();
    // Without the CA the client refuses the hub.
    const c = io(`https://localhost:${hub.port}`, { transports: ["websocket"], auth: { token: hub.token }, reconnection: false, timeout: 5000 });
    const err = await new Promise((res) => { c.on("connect_error", res); c.on("connect", () => res(null)); });
    assert.ok(err, "must not connect without trusting the CA"); c.close();
  } finally { assert.equal(await hub.stop(), 0); }
});

test("a restarted hub keeps its CA and is still trusted; a corrupt CA stops it with a clear error", async () => {
  const hub = await startHub();
  const ca = await caOf(hub);
  const fp = execFileSync(HUB, ["ca", "fingerprint", "--data-dir", hub.dataDir], { encoding: "utf8" }).trim();
  assert.equal(await hub.stop(), 0);
  const again = await startHub({ dataDir: hub.dataDir, port: hub.port });
  try {
    const r = run("curl", ["-sS", "--cacert", ca, `https://localhost:${again.port}/healthz`]);
    assert.equal(r.out.trim(), "ok", r.out);
    assert.equal(execFileSync(HUB, ["ca", "fingerprint", "--data-dir", hub.dataDir], { encoding: "utf8" }).trim(), fp);
  } finally { assert.equal(await again.stop(), 0); }
  const crt = path.join(hub.dataDir, "ca", "store-ca.crt.pem");
  fs.writeFileSync(crt, "not a certificate\n");
  const r = spawnSync(HUB, ["serve", "--dev", "--data-dir", hub.dataDir, "--port", String(await freePort())], { env: { ...process.env, MDNS: "off" }, encoding: "utf8", timeout: 15000 });
  assert.notEqual(r.status, 0);
  assert.match(r.stderr, /store-ca\.crt\.pem/); assert.match(r.stderr, /will not silently make a new CA/);
  assert.equal(fs.readFileSync(crt, "utf8"), "not a certificate\n", "the CA file must not be replaced");
});

/** A leaf for localhost AND example.com signed by the store CA key: outside its name constraints. */
function forgeLeaf(dataDir) {
  const d = tmp("forge");
  const key = path.join(d, "leaf.key"), csr = path.join(d, "leaf.csr"), crt = path.join(d, "leaf.crt"), ext = path.join(d, "ext.cnf");
  fs.writeFileSync(ext, "subjectAltName=DNS:localhost,DNS:example.com\nextendedKeyUsage=serverAuth\n");
  execFileSync("openssl", ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=example.com"], { stdio: "ignore" });
  execFileSync("openssl", ["x509", "-req", "-in", csr, "-CA", path.join(dataDir, "ca", "store-ca.crt.pem"), "-CAkey", path.join(dataDir, "ca", "store-ca.key.pem"), "-CAcreateserial", "-out", crt, "-days", "30", "-extfile", ext], { stdio: "ignore" });
  return { key, crt };
}

test("name constraints: a leaf for example.com signed by the store CA is refused by openssl", async () => {
  const hub = await startHub();
  try {
    const ca = await caOf(hub);
    const { crt } = forgeLeaf(hub.dataDir);
    const v = run("openssl", ["verify", "-CAfile", ca, crt]);
    assert.notEqual(v.code, 0, v.out);
    assert.match(v.out, /permitted subtree violation/, v.out);
  } finally { assert.equal(await hub.stop(), 0); }
});

test("an address added to the box gets a new leaf that verifies, within the check interval", async (t) => {
  if (process.getuid?.() !== 0 || run("ip", ["netns", "list"]).code !== 0) return t.skip("needs root and ip netns");
  const ns = `poshub-tls-${process.pid}`;
  run("ip", ["netns", "del", ns]);
  assert.equal(run("ip", ["netns", "add", ns]).code, 0);
  try {
    run("ip", ["-n", ns, "link", "set", "lo", "up"]);
    const port = await freePort();
    const hub = await startHub({ port, netns: ns, env: { TLS_CHECK_INTERVAL: "1s" } });
    try {
      const ca = path.join(hub.dataDir, "ca", "store-ca.crt.pem");
      const verify = () => run("ip", ["netns", "exec", ns, "openssl", "s_client", "-connect", `10.77.0.1:${port}`, "-CAfile", ca, "-verify_return_error", "-verify_ip", "10.77.0.1"], { input: "" });
      assert.equal(run("ip", ["-n", ns, "addr", "add", "10.77.0.1/32", "dev", "lo"]).code, 0);
      let ok = false;
      for (let i = 0; i < 50 && !ok; i++) {
        ok = /Verify return code: 0 \(ok\)/.test(verify().out);
        if (!ok) await new Promise((r) => setTimeout(r, 200));
      }
      assert.ok(ok, `the new address was not certified: ${verify().out}\n${hub.log()}`);
      // The hub swaps the certificate, then logs it: the line can reach our pipe a moment
      // after openssl already saw the new leaf.
      for (let i = 0; i < 25 && !/renewed the hub's TLS certificate/.test(hub.log()); i++) await sleep(200);
      assert.match(hub.log(), /renewed the hub's TLS certificate/);
    } finally { await hub.stop(); }
  } finally { run("ip", ["netns", "del", ns]); }
});

test("headless Chromium with the CA in its NSS database: page and WSS Socket.IO, no certificate errors", async (t) => {
  if (!fs.existsSync(CHROMIUM) || run("which", ["certutil"]).code !== 0) return t.skip("chromium or certutil missing (scripts/install-test-deps installs them)");
  const { chromium } = await import("playwright-core");
  const hub = await startHub();
  const home = tmp("home");
  const ca = await caOf(hub);
  fs.mkdirSync(path.join(home, ".pki", "nssdb"), { recursive: true });
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-N", "--empty-password"]);
  execFileSync("certutil", ["-d", `sql:${home}/.pki/nssdb`, "-A", "-n", "pos-hub store CA", "-t", "C,,", "-i", ca]);
  const launch = (h) => chromium.launch({
    executablePath: CHROMIUM, headless: true, env: { ...process.env, HOME: h },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const browser = await launch(home);
  const forged = forgeLeaf(hub.dataDir);
  const sPort = await freePort();
  const sServer = spawn("openssl", ["s_server", "-accept", String(sPort), "-cert", forged.crt, "-key", forged.key, "-www", "-quiet"], { stdio: "ignore" });
  procs.add(sServer);
  try {
    const page = await browser.newPage();
    const resp = await page.goto(`https://localhost:${hub.port}/`);
    assert.equal(resp.status(), 200);
    assert.match(await page.title(), /pos-hub/);
    await page.addScriptTag({ path: path.resolve("node_modules/socket.io-client/dist/socket.io.min.js") });
    const result = await page.evaluate(async (token) => {
      const s = io({ transports: ["websocket"], auth: { token }, reconnection: false });
      await new Promise((res, rej) => { s.on("connect", res); s.on("connect_error", (e) => rej(new Error(e.message))); });
      const ack = await s.timeout(5000).emitWithAck("event", { id: "chromium-1", type: "t", payload: { from: "page" } });
      s.close();
      return ack;
    }, hub.token);
    assert.deepEqual(result, { ok: true, seq: 1, duplicate: false });
    await page.screenshot({ path: path.join(os.tmpdir(), "poshub-tls-chromium.png") });
    // The store CA's name constraints are enforced by Chromium: a leaf naming example.com is refused.
    await new Promise((r) => setTimeout(r, 300));
    await assert.rejects(page.goto(`https://localhost:${sPort}/`), /ERR_CERT/);
    // A browser that does not trust the CA refuses the hub.
    const other = await launch(tmp("home2"));
    try {
      await assert.rejects((await other.newPage()).goto(`https://localhost:${hub.port}/`), /ERR_CERT_AUTHORITY_INVALID/);
    } finally { await other.close(); }
  } finally {
    sServer.kill("SIGKILL");
    await browser.close();
    assert.equal(await hub.stop(), 0);
  }
});

test("tenant root mode: the tenant signs the store CA's CSR; clients trusting only the tenant root trust the hub", async () => {
  const hub = await startHub();
  const dir = tmp("tenant");
  try {
    const rootKey = path.join(dir, "root.key"), root = path.join(dir, "root.crt");
    execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", rootKey, "-out", root, "-days", "3650", "-subj", "/CN=Tenant Root t-dev", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"], { stdio: "ignore" });
    const csr = path.join(dir, "store.csr");
    fs.writeFileSync(csr, execFileSync(HUB, ["ca", "csr", "--data-dir", hub.dataDir], { encoding: "utf8" }));
    const ext = path.join(dir, "ext.cnf");
    fs.writeFileSync(ext, "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nnameConstraints=critical,permitted;DNS:local,permitted;DNS:localhost,permitted;IP:127.0.0.0/255.0.0.0,permitted;IP:0:0:0:0:0:0:0:1/FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF,permitted;IP:10.0.0.0/255.0.0.0,permitted;IP:172.16.0.0/255.240.0.0,permitted;IP:192.168.0.0/255.255.0.0,permitted;IP:169.254.0.0/255.255.0.0,permitted;IP:FD00:0:0:0:0:0:0:0/FF00:0:0:0:0:0:0:0,permitted;IP:FE80:0:0:0:0:0:0:0/FFC0:0:0:0:0:0:0:0\n");
    const signed = path.join(dir, "store-signed.crt");
    execFileSync("openssl", ["x509", "-req", "-in", csr, "-CA", root, "-CAkey", rootKey, "-CAcreateserial", "-out", signed, "-days", "3650", "-extfile", ext], { stdio: "ignore" });
    const chain = path.join(dir, "chain.pem");
    fs.writeFileSync(chain, fs.readFileSync(signed, "utf8") + fs.readFileSync(root, "utf8"));
    // A chain for another key is refused with a clear error, the CA untouched.
    const wrong = run(HUB, ["ca", "install-chain", root, "--data-dir", hub.dataDir]);
    assert.notEqual(wrong.code, 0); assert.match(wrong.out, /not for this hub's store CA key/);
    const ok = run(HUB, ["ca", "install-chain", chain, "--data-dir", hub.dataDir]);
    assert.equal(ok.code, 0, ok.out);
    assert.equal(await hub.stop(), 0);
    const again = await startHub({ dataDir: hub.dataDir, port: hub.port });
    try {
      const r = run("curl", ["-sS", "--cacert", root, `https://localhost:${again.port}/healthz`]);
      assert.equal(r.code, 0, r.out); assert.equal(r.out.trim(), "ok");
      const s = run("openssl", ["s_client", "-connect", `127.0.0.1:${again.port}`, "-servername", "localhost", "-CAfile", root, "-verify_return_error"], { input: "" });
      assert.match(s.out, /Verify return code: 0 \(ok\)/, s.out);
      // Devices that trust the store CA directly still trust the hub.
      const own = run("curl", ["-sS", "--cacert", path.join(hub.dataDir, "ca", "store-ca.crt.pem"), `https://localhost:${again.port}/healthz`]);
      assert.equal(own.out.trim(), "ok", own.out);
    } finally { assert.equal(await again.stop(), 0); }
  } finally { if (hub.child.exitCode === null) await hub.stop(); }
});
