// System tests of OTA A/B updates (issue 7) under QEMU: two builds of the image (v1 0.1.0
// and v2 0.2.0, plus a v2 built to fail its self-check, 0.2.1), bundles made by
// scripts/make-bundle, served by a local HTTP server the test starts (reached by the guest
// through one QEMU guestfwd rule) or uploaded to the admin API. scripts/run-qemu plays the
// Pi firmware's tryboot. Power cuts are QEMU killed at chosen moments.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { cardFrom, boot, devTokens, httpsReq, staticServer, sleep, sendAcked, allIds, ROOT, SCALE, scratchDir } from "./qemu.mjs";

const V1 = process.env.POS_HUB_IMAGE;
const V2 = process.env.POS_HUB_IMAGE_V2;
const V2BAD = process.env.POS_HUB_IMAGE_V2BAD;
const B1 = process.env.POS_HUB_BUNDLE_V1;
const B2 = process.env.POS_HUB_BUNDLE_V2;
const B2BAD = process.env.POS_HUB_BUNDLE_V2BAD;
const CUTS = Number(process.env.POWER_CUT_POINTS || 20);
if (!V1 || !V2 || !V2BAD || !B1 || !B2 || !B2BAD) throw new Error("scripts/test-image sets POS_HUB_IMAGE{,_V2,_V2BAD} and POS_HUB_BUNDLE_{V1,V2,V2BAD}");
const HUB = process.env.POS_HUB_BIN || path.join(ROOT, "target/debug/pos-hub");
const cleanup = [];
after(async () => { for (const b of cleanup) await b.stop(); });

const auth = (t) => ({ authorization: `Bearer ${t}` });

async function status(box, admin) {
  return JSON.parse((await httpsReq(box, "/status", { headers: auth(admin) })).body);
}
async function upload(box, admin, bundle, query = "now=1") {
  const r = await httpsReq(box, `/admin/update/install?${query}`, { method: "POST", headers: auth(admin), body: fs.readFileSync(bundle), timeout: 120000 });
  return { status: r.status, body: JSON.parse(r.body) };
}
/** Where an install was when the power went, from the console lines it printed since it began. */
function phaseOf(con) {
  if (/update committed/.test(con)) return "after commit";
  if (/trial boot: checking/.test(con)) return "trial self-check";
  if (/boot \d+: partition/.test(con)) return "trial boot (kernel, init)";
  if (/rebooting into the trial/.test(con)) return "reboot";
  if (/update written and verified/.test(con)) return "sync before reboot";
  if (/installing update/.test(con)) return "transfer and slot write";
  return "manifest check";
}
/** Waits for boot number `n` of this harness run to have a healthy hub. */
async function nextBoot(box, n, part) {
  await box.waitFor(new RegExp(`boot ${n}: partition ${part}`), 90000);
  const from = box.console.lastIndexOf(`boot ${n}:`);
  await box.waitFor(/hub is up/, 90000, from);
  await box.healthz(30000);
  return from;
}

test("v1 installs v2 (with a schema change) from the channel file, trial-boots, commits; v2 keeps v1's events; rollback by command still opens on v1", async () => {
  const www = scratchDir("www");
  execFileSync(path.join(ROOT, "scripts/publish-update"), ["--dir", www, "--channel", "stable", "--bundle", B2, "--rollout", "100"]);
  const srv = await staticServer(www);
  const env = "DEV=on\nPORT=4001\nUPDATE_CHANNEL=stable\nUPDATE_URL=http://10.0.2.100:8080\nUPDATE_INTERVAL=10s\n";
  const { card } = cardFrom(V1, { hubEnv: env });
  const box = await boot(card, { guestfwd: `10.0.2.100:8080=127.0.0.1:${srv.port}` });
  cleanup.push(box);
  await box.healthz(90000);
  const { device, admin } = await devTokens(box);
  await sendAcked(box, device, ["v1-a", "v1-b"]);
  assert.equal((await status(box, admin)).update.runningVersion, "0.1.0");
  // The first channel check comes 10 s after start: install, 0 tryboot, trial on slot B, commit.
  await box.waitFor(/installing update/, 120000);
  const t0 = Date.now();
  const written = await box.waitFor(/update written and verified[^\n]*?secs(?:\x1b\[[0-9;]*m)*=(?:\x1b\[[0-9;]*m)*([0-9.]+)/, 120000);
  await box.waitFor(/guest asked for a trial boot/, 120000);
  const t1 = Date.now();
  const from = await nextBoot(box, 2, 3);
  await box.waitFor(/update committed/, 60000, from);
  const t2 = Date.now();
  console.log(`# install (download, gunzip, hash, write the slot, sync): ${Number(written[1]).toFixed(1)} s in the hub's log; ${((t1 - t0) / 1000).toFixed(1)} s to the tryboot request`);
  console.log(`# reboot to committed (tryboot request, firmware, kernel, hub, self-check, autoboot.txt): ${((t2 - t1) / 1000).toFixed(1)} s`);
  const st = await status(box, admin);
  assert.equal(st.update.runningVersion, "0.2.0");
  assert.equal(st.version, "0.2.0");
  assert.equal(st.update.bootedSlot, "B");
  assert.equal(st.update.defaultSlot, "B");
  assert.equal(st.realms[0].schemaVersion, 2, "v2 migrated the log to its schema v2");
  assert.deepEqual(await allIds(box, device), ["v1-a", "v1-b"]);
  await sendAcked(box, device, ["v2-a"]);
  // The channel still offers 0.2.0: up to date, no new install.
  const chk = JSON.parse((await httpsReq(box, "/admin/update/check", { method: "POST", headers: auth(admin) })).body);
  assert.match(chk.result, /up to date/);

  // Rollback by command: back to slot A with 0.1.0, every event still there.
  const rb = JSON.parse((await httpsReq(box, "/admin/update/rollback", { method: "POST", headers: auth(admin) })).body);
  assert.equal(rb.rollingBackTo, "0.1.0");
  await nextBoot(box, 3, 2);
  const st2 = await status(box, admin);
  assert.equal(st2.update.runningVersion, "0.1.0");
  assert.equal(st2.update.defaultSlot, "A");
  assert.equal(st2.realms[0].schemaVersion, 2, "v1 opened the database v2 migrated");
  assert.deepEqual(await allIds(box, device), ["v1-a", "v1-b", "v2-a"]);
  await sendAcked(box, device, ["v1-after-rollback"]);
  assert.deepEqual(await allIds(box, device), ["v1-a", "v1-b", "v2-a", "v1-after-rollback"]);
  await box.stop();
  srv.close();
});

test("a v2 built to fail its self-check rolls back to v1 by itself, and v1 reports why", async () => {
  const www = scratchDir("www");
  const srv = await staticServer(www);
  const env = "DEV=on\nPORT=4001\nUPDATE_URL=http://10.0.2.100:8080\nUPDATE_INTERVAL=15s\n";
  const { card } = cardFrom(V1, { hubEnv: env });
  const box = await boot(card, { guestfwd: `10.0.2.100:8080=127.0.0.1:${srv.port}` });
  cleanup.push(box);
  await box.healthz(90000);
  const { device, admin } = await devTokens(box);
  await sendAcked(box, device, ["keep-1"]);
  const r = await upload(box, admin, B2BAD);
  assert.equal(r.status, 202, JSON.stringify(r.body));
  await nextBoot(box, 2, 3);
  await box.waitFor(/trial boot failed: going back/, 60000);
  await nextBoot(box, 3, 2);
  const st = await status(box, admin);
  assert.equal(st.update.runningVersion, "0.1.0");
  assert.equal(st.update.defaultSlot, "A");
  assert.equal(st.update.phase, "rolled_back");
  assert.equal(st.update.badVersions[0].version, "0.2.1");
  assert.match(st.update.badVersions[0].reason, /built to fail its self-check/);
  assert.deepEqual(await allIds(box, device), ["keep-1"]);
  // Not retried automatically: the same bundle is refused without force.
  const again = await upload(box, admin, B2BAD);
  assert.equal(again.status, 422);
  assert.match(again.body.error, /failed its trial on this box before/);
  // Reported to the update host (first channel check after start).
  for (let i = 0; i < 100 && !srv.reports.length; i++) await sleep(300);
  assert.equal(srv.reports.length >= 1, true, "a failure report reached the update host");
  assert.match(srv.reports[0].body, /0\.2\.1/);
  await box.stop();
  srv.close();
});

test("bad signature, wrong board, truncated or corrupt bundles are refused; v1 untouched", async () => {
  const dir = scratchDir("bad");
  const good = fs.readFileSync(B2);
  // Signature over another manifest: flip one character inside the base64 manifest.
  const nl = good.indexOf(10, 16);
  const badSig = Buffer.from(good);
  const i = badSig.indexOf(Buffer.from('"manifest":"')) + 20;
  badSig[i] = badSig[i] === 65 ? 66 : 65;
  const truncated = good.subarray(0, good.length - 100000);
  const corrupt = Buffer.from(good);
  corrupt[nl + 5000] ^= 0xff;
  const files = { badSig, truncated, corrupt };
  for (const [k, v] of Object.entries(files)) fs.writeFileSync(path.join(dir, k), v);
  // Wrong board: signed with the good key, for a Pi 3 only.
  const wrongBoard = path.join(dir, "wrongBoard");
  execFileSync(HUB, ["bundle", "create", "--image", V2, "--version", "0.2.0", "--board", "rpi3", "--compatible", "", "--key", path.join(ROOT, "certs/bundle-dev.key.pem"), "--out", wrongBoard]);
  // A key the image does not trust.
  const otherKey = path.join(dir, "other.pem");
  execFileSync("openssl", ["genpkey", "-algorithm", "ed25519", "-out", otherKey]);
  const untrusted = path.join(dir, "untrusted");
  execFileSync(HUB, ["bundle", "create", "--image", V2, "--version", "0.2.0", "--key", otherKey, "--out", untrusted]);

  const { card } = cardFrom(V1, {});
  const box = await boot(card);
  cleanup.push(box);
  await box.healthz(90000);
  const { admin } = await devTokens(box);
  const expect = {
    badSig: /bad signature/, untrusted: /bad signature/, wrongBoard: /for board rpi3/,
    truncated: /payload does not match|received \d+ payload bytes|decompressing/, corrupt: /payload does not match|decompressing/,
  };
  for (const [k, re] of Object.entries(expect)) {
    const r = await upload(box, admin, path.join(dir, k));
    assert.equal(r.status, 422, `${k}: ${JSON.stringify(r.body)}`);
    assert.match(r.body.error, re, k);
  }
  const st = await status(box, admin);
  assert.equal(st.update.runningVersion, "0.1.0");
  assert.equal(st.update.defaultSlot, "A");
  assert.equal(st.update.slots["3"], undefined, "slot B is not recorded as holding a version");
  assert.equal(st.update.pending, null);
  // Still healthy, and no reboot happened.
  assert.doesNotMatch(box.console, /boot 2:/);
  await box.stop();
});

test(`power cuts during download or upload, write, reboot, trial boot and commit (${CUTS} points): the hub always comes back with every acked event`, { timeout: Math.max(20, CUTS / 2) * 60000 * SCALE }, async () => {
  const { card } = cardFrom(V1, { sizeMiB: 256 });
  // Every other install is a download from a local HTTP server instead of an upload.
  const www = scratchDir("www");
  fs.copyFileSync(B1, path.join(www, "v1.bundle"));
  fs.copyFileSync(B2, path.join(www, "v2.bundle"));
  const srv = await staticServer(www);
  const guestfwd = `10.0.2.100:8080=127.0.0.1:${srv.port}`;
  const acked = [];
  let seed = Number(process.env.POWER_CUT_SEED || 20261124);
  const phases = {};
  const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const versions = [];
  for (let i = 0; i < CUTS; i++) {
    // A fresh host port each boot: one freed by a cut may be taken by then.
    const box = await boot(card, { guestfwd });
    cleanup.push(box);
    await box.healthz(120000);
    const { device, admin } = await devTokens(box);
    const ids = await allIds(box, device);
    assert.deepEqual(ids, acked, `cut ${i}: every acknowledged event is there`);
    const st = await status(box, admin);
    versions.push(st.update.runningVersion);
    const id = `cut-${i}`;
    await sendAcked(box, device, [id]);
    acked.push(id);
    // Install the other version (forced: a cut trial marks it failed), cut at a random moment
    // across the upload, the write, the reboot and the trial boot (about 0-12 s).
    const bundle = st.update.runningVersion === "0.2.0" ? B1 : B2;
    const delay = Math.floor(rand() * 12000);
    const from = box.console.length;
    const how = i % 2 ? "download" : "upload";
    const install = (how === "upload"
      ? upload(box, admin, bundle, "now=1&force=1")
      : httpsReq(box, `/admin/update/install?now=1&force=1&url=${encodeURIComponent(`http://10.0.2.100:8080/${bundle === B1 ? "v1" : "v2"}.bundle`)}`, { method: "POST", headers: auth(admin), timeout: 120000 })
    ).catch(() => null);
    await sleep(delay);
    await box.powerCut();
    await install;
    const phase = phaseOf(box.console.slice(from));
    phases[phase] = (phases[phase] || 0) + 1;
    console.log(`# cut ${i}: ${delay} ms after starting the ${how} of ${bundle === B1 ? "0.1.0" : "0.2.0"} on ${st.update.runningVersion}, during ${phase}`);
  }
  srv.close();
  const box = await boot(card);
  cleanup.push(box);
  await box.healthz(120000);
  const { device } = await devTokens(box);
  assert.deepEqual(await allIds(box, device), acked);
  console.log(`# versions seen across the cuts: ${versions.join(" ")}`);
  console.log(`# cuts by phase: ${JSON.stringify(phases)}`);
  await box.stop();
});
