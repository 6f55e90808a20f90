// System tests of the firmware image (issue 6): the image built by image/build, booted
// under qemu-system-aarch64 -M virt by scripts/run-qemu (which plays the Pi bootloader),
// driven from outside like a till would: /healthz and socket.io-client over WSS trusting
// the store CA, through the forwarded port. Each test boots its own copy of the image.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { IMAGE, cardFrom, boot, devTokens, connect, allIds, httpGet, httpsReq, sleep, claimKit } from "./qemu.mjs";

if (!IMAGE) throw new Error("POS_HUB_IMAGE is not set (scripts/test-image builds the image and sets it)");
const cleanup = [];
after(async () => { for (const b of cleanup) await b.stop(); });

const ev = (id) => ({ id, type: "order.created", payload: { total: 12.5, id } });

async function sendAcked(sock, ids) {
  const seqs = [];
  for (const id of ids) {
    const ack = await sock.timeout(10000).emitWithAck("event", ev(id));
    assert.equal(ack.ok, true, JSON.stringify(ack));
    seqs.push(ack.seq);
  }
  return seqs;
}

test("first boot: blank data partition formatted and grown, read-only root, /healthz and a WSS event round trip", async () => {
  const { card } = cardFrom(IMAGE, { sizeMiB: 384 });
  const box = await boot(card);
  cleanup.push(box);
  await box.waitFor(/data partition \S+ is blank: creating its filesystem/);
  await box.waitFor(/data partition grown to \d+ MiB/);
  await box.healthz(90000);
  const bootMs = Date.now() - box.startedAt;
  console.log(`# boot to /healthz ok: ${(bootMs / 1000).toFixed(1)} s wall (QEMU start included)`);
  await box.waitFor(/root filesystem is read-only/);
  await box.waitFor(/watchdog \S+.* armed/);
  const { device, admin } = await devTokens(box);
  const st = JSON.parse((await httpsReq(box, "/status", { headers: { authorization: `Bearer ${admin}` } })).body);
  assert.equal(st.system.appliance, true);
  assert.equal(st.system.rootReadOnly, true, "a write outside the data partition must fail");
  assert.equal(st.system.bootPartition, 2);
  // The image carries a 32 MiB data partition at 209 MiB; on a 384 MiB card it grows to ~175 MiB.
  assert.ok(st.system.dataBytesTotal > 150 * 1024 * 1024, `data partition fills the 384 MiB card: ${st.system.dataBytesTotal}`);
  assert.equal(st.realms[0].tenantId, "t-dev");
  // Issue 20: init's boot.log and the hub's hub.log over the admin API, one line format;
  // the dev tokens went to the console only.
  const logs = (await httpsReq(box, "/admin/logs?lines=1000", { headers: { authorization: `Bearer ${admin}` } })).body;
  const lines = logs.trimEnd().split("\n");
  for (const l of lines) assert.match(l, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (ERROR|WARN |INFO |DEBUG|TRACE) \S+ /, l);
  assert.ok(lines.some((l) => / init \[[\d.]+\] hub is up/.test(l)), `init's lines (boot.log):\n${logs}`);
  assert.ok(lines.some((l) => / hub\/serve pos-hub listening/.test(l)), `the hub's lines (hub.log):\n${logs}`);
  assert.ok(!logs.includes(device) && !logs.includes(admin), "a dev token reached the log files");

  const a = await connect(box, device);
  const [seq] = await sendAcked(a, ["img-1"]);
  assert.ok(seq >= 1);
  a.close();
  assert.deepEqual(await allIds(box, device), ["img-1"]);
  await box.stop();
});

test("acknowledged events survive a reboot and a power cut", async () => {
  const { card } = cardFrom(IMAGE, { sizeMiB: 256 });
  let box = await boot(card);
  cleanup.push(box);
  await box.healthz(90000);
  const { device, admin } = await devTokens(box);
  const s = await connect(box, device);
  await sendAcked(s, ["r-1", "r-2", "r-3"]);
  s.close();

  // Reboot through the admin API: init stops the hub, unmounts, reboots; the harness boots again.
  const r = await httpsReq(box, "/admin/reboot", { method: "POST", headers: { authorization: `Bearer ${admin}` } });
  assert.equal(r.status, 202, r.body);
  const mark = box.console.length;
  await box.waitFor(/guest rebooted/, 60000, mark);
  await box.waitFor(/boot 2: partition 2/, 30000, mark);
  await sleep(500);
  await box.healthz(90000);
  assert.doesNotMatch(box.console.slice(mark), /not cleanly unmounted/, "a reboot unmounts the data partition cleanly");
  assert.deepEqual(await allIds(box, device), ["r-1", "r-2", "r-3"]);

  // Power cut right after acks.
  const s2 = await connect(box, device);
  await sendAcked(s2, ["p-1", "p-2", "p-3", "p-4"]);
  await box.powerCut();
  box = await boot(card, { port: box.port });
  cleanup.push(box);
  await box.waitFor(/not cleanly unmounted: checking it/, 60000);
  await box.healthz(90000);
  assert.deepEqual(await allIds(box, device), ["r-1", "r-2", "r-3", "p-1", "p-2", "p-3", "p-4"]);
  await box.stop();
});

test("the watchdog resets a hub that hangs", async () => {
  const env = "DEV=on\nPORT=4001\nWATCHDOG_TIMEOUT=10\nTEST_HANG_AFTER=4s\n";
  const { card } = cardFrom(IMAGE, { hubEnv: env });
  const box = await boot(card);
  cleanup.push(box);
  await box.healthz(90000);
  await box.waitFor(/TEST_HANG_AFTER reached: freezing/, 30000);
  await box.waitFor(/no longer petting the watchdog/, 60000);
  await box.waitFor(/without a reboot message: watchdog reset/, 90000);
  await box.waitFor(/boot 2: partition 2/, 30000);
  await box.stop();
});

test("a garbled hub.env keeps the box up with the error on the console and in /status", async () => {
  const env = "DEV=on\nPORT=4001\nthis line is not a setting\n";
  const { card } = cardFrom(IMAGE, { hubEnv: env });
  const box = await boot(card);
  cleanup.push(box);
  await box.waitFor(/configuration error: .*line 3/, 90000);
  let h;
  for (let i = 0; i < 300; i++) {
    try { h = await httpGet(box.port, "/healthz"); break; } catch { await sleep(200); }
  }
  assert.equal(h.status, 503);
  assert.match(JSON.parse(h.body).configError, /hub\.env line 3/);
  const st = JSON.parse((await httpGet(box.port, "/status")).body);
  assert.match(st.configError, /line 3/);
  assert.equal(st.system.appliance, true);
  // No boot loop: well past the watchdog timeout and the hub's restart budget, still the first boot.
  await sleep(40000);
  assert.doesNotMatch(box.console, /boot 2:/);
  assert.equal((await httpGet(box.port, "/healthz")).status, 503);
  await box.stop();
});

test("an unclaimed box is claimed over /setup, then reset by the admin API and by a RESET file: unclaimed again, empty log, same CA", async () => {
  const { execFileSync } = await import("node:child_process");
  const fs = await import("node:fs");
  const path = await import("node:path");
  const { dir, mint, pubB64 } = claimKit();
  const env = `DEV=off\nPORT=4001\nCLAIM_PUBLIC_KEY_BASE64=${pubB64}\n`;
  const { card } = cardFrom(IMAGE, { hubEnv: env });
  let box = await boot(card);
  cleanup.push(box);
  await box.waitFor(/not claimed yet: open https/, 90000);
  await box.healthz(60000);
  const status = async () => JSON.parse((await httpsReq(box, "/status")).body);
  const fp = (await status()).caFingerprint;
  assert.equal((await status()).realms.length, 0);
  const claim = async () => {
    const r = await httpsReq(box, "/setup/claim", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token: mint("claim") }) });
    assert.equal(r.status, 200, r.body);
    for (let i = 0; i < 100; i++) {
      try { if ((await status()).realms[0]?.storeId === "s-001") return; } catch {}
      await sleep(200);
    }
    throw new Error("the claimed realm never appeared");
  };
  await claim();
  const s = await connect(box, mint("till", "till-1"));
  assert.equal((await s.timeout(10000).emitWithAck("event", ev("before-reset"))).ok, true);
  s.close();
  // Reset through the admin API: init wipes the data partition at the next boot.
  const r = await httpsReq(box, "/admin/reset", { method: "POST", headers: { authorization: `Bearer ${mint("admin", "owner")}`, "content-type": "application/json" }, body: JSON.stringify({ confirm: "RESET" }) });
  assert.equal(r.status, 202, r.body);
  const mark = box.console.length;
  await box.waitFor(/FACTORY RESET requested: wiping the data partition \(keeping the store CA\)/, 90000, mark);
  await box.waitFor(/not claimed yet/, 90000, mark);
  await box.healthz(60000);
  let st = await status();
  assert.equal(st.realms.length, 0, "unclaimed again");
  assert.equal(st.caFingerprint, fp, "same store CA");
  await claim();
  assert.equal((await status()).realms[0].lastSeq, 0, "the log is empty");
  await box.stop();
  // A RESET file put on the settings partition (a laptop) does the same, and is removed.
  const off = (await import("./qemu.mjs")).partOffset(card, 1);
  fs.writeFileSync(path.join(dir, "RESET"), "keep-ca\r\n");
  execFileSync("mcopy", ["-i", `${card}@@${off}`, path.join(dir, "RESET"), "::RESET"], { env: { ...process.env, MTOOLS_SKIP_CHECK: "1" } });
  box = await boot(card, { port: box.port });
  cleanup.push(box);
  await box.waitFor(/FACTORY RESET requested/, 90000);
  await box.healthz(60000);
  st = await status();
  assert.equal(st.realms.length, 0);
  assert.equal(st.caFingerprint, fp);
  await box.stop();
  const listing = execFileSync("mdir", ["-i", `${card}@@${off}`, "-b", "::"], { encoding: "utf8", env: { ...process.env, MTOOLS_SKIP_CHECK: "1" } });
  assert.doesNotMatch(listing, /RESET/, "init removed the RESET file");
});
