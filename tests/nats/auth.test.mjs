// Logging in to NATS as deployments do (issue 15), each against a real single-node
// nats-server started here: a creds file (user JWT + NKey seed) with the server in
// operator/JWT mode (operator, accounts and users made by ./jwt.mjs), user/password
// over `tls://` with the server's certificate from a CA that openssl makes here
// (CLOUD_NATS_CA), and a token. For each: the hub logs in and pushes, every event once
// and in order; a wrong CA / wrong creds / wrong password / wrong token gives one clear
// log line and the reason in /status, while /healthz stays 200 and devices' events are
// acknowledged as usual.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { io } from "socket.io-client";
import { credsAuthenticator } from "nats";
import { procs, httpGet, startHub, sleep, tmp } from "../lib/hub.mjs";
import { startServer, countOn, readSubject } from "./cluster.mjs";
import { operatorSetup, userCreds, account } from "./jwt.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });

const UP = "poshub.t-dev.s-dev.up";
const env = (url, extra = {}) => ({
  TLS: "off", CLOUD_BRIDGE_URL: url, CLOUD_TIMEOUT: "2s", CLOUD_BACKOFF_MAX: "500ms", CLOUD_FEED_WAIT: "1s", ...extra,
});
const status = async (hub) => JSON.parse((await httpGet(hub.port, "/status")).body).realms[0];

async function until(pred, ms, what) {
  const end = Date.now() + ms;
  while (Date.now() < end) { if (await pred()) return; await sleep(100); }
  throw new Error(`timed out: ${what}`);
}

/** Connects a device, writes n events, returns their ids in seq order. */
async function write(hub, prefix, n) {
  const s = io(`http://127.0.0.1:${hub.port}`, { transports: ["websocket"], auth: { token: hub.token }, reconnection: false });
  try {
    await new Promise((res, rej) => { s.on("synced", res); s.on("connect_error", rej); setTimeout(() => rej(new Error("no synced")), 10000); });
    const evs = Array.from({ length: n }, (_, i) => ({ id: `${prefix}-${i}`, type: "order.created", payload: { i } }));
    const t0 = Date.now();
    const a = await s.timeout(10000).emitWithAck("events", evs);
    assert.equal(a.ok, true);
    assert.ok(a.results.every((r) => r.ok), "every event acknowledged");
    assert.ok(Date.now() - t0 < 5000, "LAN acks never wait for the cluster");
    return evs.map((e) => e.id);
  } finally { s.close(); }
}

/** The hub logs in and pushes: the stream holds exactly `ids` on the realm's subject. */
async function pushes(server, hub, ids) {
  await until(async () => (await countOn(server, UP)) >= ids.length, 30000, `${ids.length} events in the stream`)
    .catch((e) => { throw new Error(`${e.message}; the hub said:\n${hub.log().split("\n").slice(-15).join("\n")}`); });
  const msgs = await readSubject(server, UP);
  assert.deepEqual(msgs.map((m) => m.msgId), ids.map((id) => `t-dev:s-dev:${id}`), "every event once, in seq order");
  await until(async () => (await status(hub)).outboxDepth === 0, 10000, "outbox drained");
  const st = await status(hub);
  assert.equal(st.bridge.state, "online");
  assert.equal(st.bridge.lastError, null);
  assert.match(st.bridge.nats.connectedServer, /^solo \(127\.0\.0\.1:\d+, nats-server 2\./);
  assert.equal(st.bridge.nats.replicas, 1, "one server: the stream falls back from 3 replicas to 1");
  return st;
}

/**
 * The hub cannot log in: /status shows `why` as the last error, the log says it once
 * per change (not once per retry), /healthz is 200 and devices are served.
 */
async function refused(hub, why, what) {
  await until(async () => why.test((await status(hub)).bridge.lastError ?? ""), 15000, `lastError for ${what}`);
  const st = await status(hub);
  assert.equal(st.bridge.state, "offline", what);
  assert.equal(st.bridge.nats.connectedServer, null, what);
  assert.equal((await httpGet(hub.port, "/healthz")).status, 200, what);
  await write(hub, "while-refused", 20);
  assert.equal((await status(hub)).outboxDepth, 20, "the events wait in the outbox");
  // Retries every 500 ms for at least 2 s by now: still one line for the up and one for
  // the down connection, each naming the reason.
  await sleep(1500);
  const lines = hub.log().split("\n").filter((l) => /cloud bridge/.test(l) && why.test(l));
  if (process.env.VERBOSE) console.log(`--- ${what}: ${st.bridge.lastError}\n${lines.join("\n")}`);
  assert.ok(lines.length >= 1 && lines.length <= 2, `${what}: one log line per connection, got ${lines.length}:\n${lines.join("\n")}`);
  return st;
}

test("creds file (user JWT + NKey seed) with the server in operator/JWT mode; wrong creds refused", async () => {
  const dir = tmp("nats-jwt");
  const setup = operatorSetup();
  fs.writeFileSync(path.join(dir, "operator.jwt"), setup.opJwt);
  const creds = userCreds(setup.app, "store-hub");
  const server = await startServer({ auth: setup.config(path.join(dir, "operator.jwt")), clientOpts: { authenticator: credsAuthenticator(new TextEncoder().encode(userCreds(setup.app, "chain-reader"))) } });
  const file = (name, text) => { const p = path.join(dir, name); fs.writeFileSync(p, text, { mode: 0o600 }); return p; };
  const good = file("hub.creds", creds);
  // A user of an account this server does not know, and a good JWT with another seed.
  const stranger = file("stranger.creds", userCreds(account(setup.op, "ELSEWHERE", { jetstream: true }), "x"));
  const wrongSeed = file("wrong-seed.creds", userCreds(setup.app, "store-hub", { seedOf: setup.sys.kp }));
  const hubs = [];
  try {
    const [ok, s1, s2] = await Promise.all([good, stranger, wrongSeed].map((f) => startHub({ env: env(server.url(), { CLOUD_NATS_CREDS: f }) })));
    hubs.push(ok, s1, s2);
    const ids = await write(ok, "jwt", 120);
    await pushes(server, ok, ids);
    await refused(s1, /authorization violation.*CLOUD_NATS_CREDS/i, "an unknown account");
    await refused(s2, /authorization violation.*CLOUD_NATS_CREDS/i, "a seed that does not match the JWT");
    assert.equal((await readSubject(server, UP)).length, ids.length, "nothing from the refused hubs");
  } finally { await Promise.all(hubs.map((h) => h.stop())); await server.stopAll(); }
});

/** A CA and a server certificate for 127.0.0.1 signed by it (openssl). */
function makeCa(dir, name) {
  const f = (x) => path.join(dir, `${name}-${x}`);
  const ossl = (...a) => execFileSync("openssl", a, { stdio: ["ignore", "ignore", "pipe"] });
  ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", `/CN=${name} test CA`,
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", f("ca.key"), "-out", f("ca.pem"));
  ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", f("server.key"), "-out", f("server.csr"));
  fs.writeFileSync(f("ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n");
  ossl("x509", "-req", "-in", f("server.csr"), "-CA", f("ca.pem"), "-CAkey", f("ca.key"), "-CAcreateserial", "-days", "2", "-extfile", f("ext"), "-out", f("server.pem"));
  return { ca: f("ca.pem"), cert: f("server.pem"), key: f("server.key") };
}

test("tls:// with CLOUD_NATS_CA and user/password; a wrong CA and a wrong password refused", async () => {
  const dir = tmp("nats-tls");
  const right = makeCa(dir, "right");
  const wrong = makeCa(dir, "wrong");
  const server = await startServer({
    auth: `tls { cert_file: "${right.cert}", key_file: "${right.key}", timeout: 2 }\nauthorization { user: "store-hub", password: "s3cret pass" }`,
    clientOpts: { user: "store-hub", pass: "s3cret pass", tls: { caFile: right.ca } },
  });
  const url = (pass) => `tls://store-hub:${encodeURIComponent(pass)}@127.0.0.1:${server.nodes[0].port}`;
  const hubs = [];
  try {
    const [ok, badCa, badPass] = await Promise.all([
      startHub({ env: env(url("s3cret pass"), { CLOUD_NATS_CA: right.ca }) }),
      startHub({ env: env(url("s3cret pass"), { CLOUD_NATS_CA: wrong.ca }) }),
      startHub({ env: env(url("guess"), { CLOUD_NATS_CA: right.ca }) }),
    ]);
    hubs.push(ok, badCa, badPass);
    const ids = await write(ok, "tls", 120);
    const st = await pushes(server, ok, ids);
    assert.equal(st.bridge.nats.servers, `tls://store-hub:***@127.0.0.1:${server.nodes[0].port}`, "the password is masked");
    const stCa = await refused(badCa, /TLS.*certificate.*CLOUD_NATS_CA/i, "a CA that did not sign the server's certificate");
    assert.doesNotMatch(JSON.stringify(stCa), /s3cret/, "no password in /status");
    await refused(badPass, /authorization violation.*user:password/i, "a wrong password");
    assert.doesNotMatch(badPass.log() + badCa.log(), /s3cret|guess/, "no password in the log");
    assert.equal((await readSubject(server, UP)).length, ids.length, "nothing from the refused hubs");
  } finally { await Promise.all(hubs.map((h) => h.stop())); await server.stopAll(); }
});

test("token login (CLOUD_BRIDGE_TOKEN); a wrong token refused", async () => {
  const server = await startServer({ auth: `authorization { token: "chain-token" }`, clientOpts: { token: "chain-token" } });
  const hubs = [];
  try {
    const [ok, bad] = await Promise.all([
      startHub({ env: env(server.url(), { CLOUD_BRIDGE_TOKEN: "chain-token" }) }),
      startHub({ env: env(server.url(), { CLOUD_BRIDGE_TOKEN: "not-the-token" }) }),
    ]);
    hubs.push(ok, bad);
    const ids = await write(ok, "tok", 120);
    await pushes(server, ok, ids);
    await refused(bad, /authorization violation.*CLOUD_BRIDGE_TOKEN/i, "a wrong token");
    assert.doesNotMatch(bad.log(), /not-the-token/, "no token in the log");
  } finally { await Promise.all(hubs.map((h) => h.stop())); await server.stopAll(); }
});
