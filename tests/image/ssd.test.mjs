// The box run from an SSD on USB instead of an SD card (issue 16): the same image on a
// disk QEMU attaches as qemu-xhci + usb-storage (scripts/run-qemu --disk usb), so the
// kernel reaches it through xhci_pci, usb-storage and sd_mod (/dev/sda) and init finds
// it by the settings partition's label. First boot (format + grow), a power cut right
// after acks, then an update uploaded to the admin API: install, trial boot, commit.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import { cardFrom, boot, devTokens, httpsReq, sendAcked, allIds } from "./qemu.mjs";

const V1 = process.env.POS_HUB_IMAGE;
const B2 = process.env.POS_HUB_BUNDLE_V2;
if (!V1 || !B2) throw new Error("scripts/test-image sets POS_HUB_IMAGE and POS_HUB_BUNDLE_V2");
const cleanup = [];
after(async () => { for (const b of cleanup) await b.stop(); });
const auth = (t) => ({ authorization: `Bearer ${t}` });


test("an SSD on USB (qemu-xhci + usb-storage): first boot, a power cut, an update to v2 and its commit", async () => {
  const { card } = cardFrom(V1, { sizeMiB: 512 });
  let box = await boot(card, { disk: "usb" });
  cleanup.push(box);
  await box.waitFor(/boot disk \/dev\/sd[a-z] /, 90000);
  await box.waitFor(/data partition \S+ is blank: creating its filesystem/);
  await box.waitFor(/data partition grown to \d+ MiB/);
  await box.healthz(90000);
  const { device, admin } = await devTokens(box);
  const st = JSON.parse((await httpsReq(box, "/status", { headers: auth(admin) })).body);
  assert.equal(st.system.rootReadOnly, true);
  assert.ok(st.system.dataBytesTotal > 250 * 1024 * 1024, `data partition fills the 512 MiB disk: ${st.system.dataBytesTotal}`);
  await sendAcked(box, device, ["ssd-1", "ssd-2", "ssd-3"]);

  // Power cut right after the acks; the next boot recovers the journal on /dev/sda4.
  await box.powerCut();
  box = await boot(card, { port: box.port, disk: "usb" });
  cleanup.push(box);
  await box.waitFor(/not cleanly unmounted: checking it/, 90000);
  await box.healthz(90000);
  assert.deepEqual(await allIds(box, device), ["ssd-1", "ssd-2", "ssd-3"]);

  // An update, uploaded: written to slot B on the USB disk, trial boot, commit.
  const r = await httpsReq(box, "/admin/update/install?now=1", { method: "POST", headers: auth(admin), body: fs.readFileSync(B2), timeout: 120000 });
  assert.equal(r.status, 202, r.body);
  await box.waitFor(/guest asked for a trial boot/, 120000);
  await box.waitFor(/boot 2: partition 3 \(tryboot\)[^\n]*usb disk/, 60000);
  const from = box.console.lastIndexOf("boot 2:");
  await box.waitFor(/update committed/, 90000, from);
  await box.healthz(30000);
  const st2 = JSON.parse((await httpsReq(box, "/status", { headers: auth(admin) })).body);
  assert.equal(st2.update.runningVersion, "0.2.0");
  assert.equal(st2.update.defaultSlot, "B");
  assert.deepEqual(await allIds(box, device), ["ssd-1", "ssd-2", "ssd-3"]);
  await box.stop();
});
