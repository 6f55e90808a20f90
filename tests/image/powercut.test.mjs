// Faithful power cuts (issue 16). The card runs behind QEMU's blklogwrites driver
// (scripts/run-qemu --blklog), which logs every write, flush and FUA the guest sends.
// After the run, replay-card.py rebuilds the card as a power cut could have left it: at a
// random flush point, with the writes after it kept or dropped at random, each request
// whole or not at all (a real SD card may persist volatile writes in any order). Every
// rebuilt card is booted through scripts/run-qemu and must come up with a working hub
// holding every event acknowledged before its flush point.
//
// The run covers the first boot (partition grown, ext4 created, store CA, dev keys and
// tokens written), devices writing under load, a clean reboot (clock file and update
// state written on the way down and up) and more writes. An ack is tied to the log by
// the log's size when the ack arrived: the flush that made the event durable was logged
// before the guest saw it complete, so an ack sampled at log size S is durable in every
// card rebuilt at a flush whose log offset is >= S.
//
// Two more runs: through an OTA update (install, reboot into the trial, trial boot and
// self-check, the commit that rewrites autoboot.txt; a rebuilt box runs v1 or v2, never
// neither) and through a claim and a factory reset (a rebuilt box is unclaimed or holds
// one whole store: never half a wipe, never events from before a finished reset).
//
// POWER_CUT_CARDS (default 4), POWER_CUT_OTA_CARDS (default 3) and POWER_CUT_CLAIM_CARDS
// (default 3) rebuilt cards are booted; POWER_CUT_SEED picks them.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { IMAGE, cardFrom, boot, devTokens, connect, httpsReq, sleep, claimKit } from "./qemu.mjs";

if (!IMAGE) throw new Error("POS_HUB_IMAGE is not set (scripts/test-image builds the image and sets it)");
const here = path.dirname(fileURLToPath(import.meta.url));
const REPLAY = path.join(here, "replay-card.py");
const CARDS = Number(process.env.POWER_CUT_CARDS || 4);
const SEED = Number(process.env.POWER_CUT_SEED || 20261201);
const cleanup = [];
after(async () => { for (const b of cleanup) await b.stop(); });

/** A small seeded PRNG (mulberry32), so a failing run can be repeated. */
function rng(seed) {
  let a = seed >>> 0;
  return () => { a = (a + 0x6d2b79f5) >>> 0; let t = a; t = Math.imul(t ^ (t >>> 15), t | 1); t ^= t + Math.imul(t ^ (t >>> 7), t | 61); return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}

const logSize = (f) => { try { return fs.statSync(f).size; } catch { return 0; } };

/** Writes `n` events with `inFlight` outstanding; returns [{id, seq, logSize}] in ack order. */
async function writeUnderLoad(sock, prefix, n, inFlight, log) {
  const acked = [];
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const id = `${prefix}-${next++}`;
      const a = await sock.timeout(20000).emitWithAck("event", { id, type: "order.created", payload: { id, lines: [{ sku: "coffee", qty: 2 }], total: 6.8 } });
      assert.equal(a.ok, true, JSON.stringify(a));
      acked.push({ id, seq: a.seq, logSize: logSize(log) });
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  return acked;
}

/** The usual check of a rebuilt card: a working hub with every event acked before the
 * cut (log offset `cut`), same seqs, no gap; `versions`, when given, lists the versions
 * it may run. Returns the card's line for the report. */
function ackedCheck(acked, versions) {
  return async (b, cut, label) => {
    const durable = acked.filter((a) => a.logSize <= cut);
    const tok = await devTokens(b);
    const c = await connect(b, tok.device, { auth: { since: 0 } });
    const got = c.got.map((e) => e.id);
    c.close();
    const missing = durable.filter((a) => !got.includes(a.id));
    assert.deepEqual(missing, [], `${label}: acked events lost`);
    for (const a of durable) assert.equal(c.got.find((e) => e.id === a.id).seq, a.seq, `${label}: ${a.id} kept its seq`);
    assert.deepEqual(c.got.map((e) => e.seq), c.got.map((_, j) => j + 1), `${label}: seqs contiguous from 1`);
    let version = "";
    if (versions) {
      version = JSON.parse((await httpsReq(b, "/status", { headers: { authorization: `Bearer ${tok.admin}` } })).body).version;
      assert.ok(versions.includes(version), `${label}: runs ${version}, not one of ${versions}`);
      version = `, version ${version}`;
    }
    return `hub up${version}, ${durable.length} acked events required, ${got.length} present`;
  };
}

/** Rebuilds `cards` cards from the write log at seeded random flush points, boots each
 * and runs `check(box, cutOffset, label)` on it once /healthz answers. Card i cuts in
 * `windows[i % windows.length]`: null for anywhere, or [from, to) log offsets (the
 * phases a scenario is about, which hold few of the flushes). Prints where each fell. */
async function checkRebuilt({ dir, base, log, phases, cards, seed, windows = [null], check }) {
  const info = JSON.parse(execFileSync("python3", [REPLAY, "info", log], { encoding: "utf8" }));
  console.log(`# write log: ${info.entries} requests, ${info.writes} writes (${(info.bytesWritten / 1048576).toFixed(1)} MiB), ${info.flushes.length} flushes`);
  assert.ok(info.flushes.length > 20, "the guest flushes its disk");
  const pick = rng(seed);
  const byPhase = {};
  for (let i = 0; i < cards; i++) {
    const w = windows[i % windows.length];
    const inWindow = w ? info.flushes.filter((f) => f.logOffset >= w[0] && f.logOffset < w[1]) : [];
    const pool = inWindow.length ? inWindow : info.flushes;
    const k = info.flushes.indexOf(pool[Math.floor(pick() * pool.length)]);
    const f = info.flushes[k];
    const phase = [...phases].reverse().find((p) => f.logOffset >= p.at).name;
    const label = `card ${i} (flush ${k} of ${info.flushes.length}, ${phase})`;
    const rebuilt = path.join(dir, `cut-${i}.img`);
    const res = JSON.parse(execFileSync("python3", [REPLAY, "build", base, log, rebuilt, "--flush", String(k), "--seed", String(seed + i)], { encoding: "utf8" }));
    const b = await boot(rebuilt);
    cleanup.push(b);
    try {
      await b.healthz(150000);
      const line = await check(b, f.logOffset, label);
      console.log(`# card ${i}: flush ${k}/${info.flushes.length} (${phase}), ${res.keptAfterFlush} later writes kept, ${res.droppedAfterFlush} dropped, ${res.neverIssued} never issued: ${line}`);
      byPhase[phase] = (byPhase[phase] || 0) + 1;
    } catch (e) {
      throw new Error(`${e.message}\nrebuilt card kept at ${rebuilt} (replay: ${JSON.stringify(res)}); console tail:\n${b.console.slice(-3000)}`);
    } finally {
      await b.stop();
      cleanup.splice(cleanup.indexOf(b), 1);
    }
    fs.rmSync(rebuilt, { force: true });
  }
  console.log(`# cuts by phase: ${JSON.stringify(byPhase)}`);
  return byPhase;
}

/** Boots `card` once (the recording starts past the first boot, which has its own test),
 * keeps a copy as the base the cards are rebuilt from, then boots it again behind the
 * write log. `ready(box)` waits until a boot is up; `first` is what it gave the first time. */
async function recordFrom(card, dir, ready) {
  const once = await boot(card);
  const first = await ready(once);
  await once.stop();
  const base = path.join(dir, "base.img");
  execFileSync("cp", ["--sparse=always", card, base]);
  const log = path.join(dir, "writes.log");
  const box = await boot(card, { blklog: log });
  cleanup.push(box);
  await ready(box);
  return { box, base, log, first };
}

test(`faithful power cuts: ${CARDS} cards rebuilt from the write log at random flush points boot with every acked event`, { timeout: 60000 + CARDS * 120000 }, async () => {
  const { dir, card } = cardFrom(IMAGE, { sizeMiB: 320 });
  const base = path.join(dir, "base.img");
  execFileSync("cp", ["--sparse=always", card, base]);
  const log = path.join(dir, "writes.log");
  const phases = [{ at: 0, name: "first boot (grow, mkfs, CA, dev keys)" }];
  const box = await boot(card, { blklog: log });
  cleanup.push(box);
  await box.healthz(120000);
  const { device, admin } = await devTokens(box);
  phases.push({ at: logSize(log), name: "idle, device admitted" });
  let s = await connect(box, device);
  phases.push({ at: logSize(log), name: "devices writing (8 in flight)" });
  const acked = await writeUnderLoad(s, "a", 150, 8, log);
  s.close();
  // A clean reboot: the hub saves the clock file, init unmounts; the next boot checks the
  // file system and writes the update state of the running slot.
  phases.push({ at: logSize(log), name: "reboot (clock file, unmount, fsck, update state)" });
  const from = box.console.length;
  const r = await httpsReq(box, "/admin/reboot", { method: "POST", headers: { authorization: `Bearer ${admin}` } });
  assert.equal(r.status, 202, r.body);
  await box.waitFor(/hub is up/, 120000, from);
  await box.healthz(60000);
  s = await connect(box, device, { auth: { since: 0 } });
  phases.push({ at: logSize(log), name: "devices writing after the reboot" });
  acked.push(...(await writeUnderLoad(s, "b", 100, 8, log)));
  s.close();
  await box.powerCut();
  cleanup.splice(cleanup.indexOf(box), 1);

  await checkRebuilt({ dir, base, log, phases, cards: CARDS, seed: SEED, windows: [null, [phases[2].at, Infinity]], check: ackedCheck(acked) });
});


const B2 = process.env.POS_HUB_BUNDLE_V2;
const OTA_CARDS = Number(process.env.POWER_CUT_OTA_CARDS || 3);

test(`faithful power cuts through an OTA update: ${OTA_CARDS} rebuilt cards run v1 or v2, never neither`, { skip: !B2 && "POS_HUB_BUNDLE_V2 not set (scripts/test-image builds it)", timeout: 120000 + OTA_CARDS * 120000 }, async () => {
  const { dir, card } = cardFrom(IMAGE, { sizeMiB: 320 });
  const { box, base, log } = await recordFrom(card, dir, (b) => b.healthz(120000));
  const phases = [{ at: 0, name: "boot of v1" }];
  const { device, admin } = await devTokens(box);
  let s = await connect(box, device, { auth: { since: 0 } });
  const acked = await writeUnderLoad(s, "v1", 40, 4, log);
  s.close();
  phases.push({ at: logSize(log), name: "install (upload, slot write, sync)" });
  const from = box.console.length;
  const up = await httpsReq(box, "/admin/update/install?now=1", { method: "POST", headers: { authorization: `Bearer ${admin}` }, body: fs.readFileSync(B2), timeout: 180000 });
  assert.equal(up.status, 202, up.body);
  await box.waitFor(/rebooting into the trial/, 120000, from);
  phases.push({ at: logSize(log), name: "reboot into the trial" });
  await box.waitFor(/boot 2: partition/, 60000, from);
  phases.push({ at: logSize(log), name: "trial boot and self-check" });
  await box.waitFor(/update committed/, 120000, from);
  phases.push({ at: logSize(log), name: "after the commit (autoboot.txt rewritten)" });
  await box.healthz(60000);
  s = await connect(box, device, { auth: { since: 0 } });
  acked.push(...(await writeUnderLoad(s, "v2", 20, 4, log)));
  s.close();
  await box.powerCut();
  cleanup.splice(cleanup.indexOf(box), 1);
  await checkRebuilt({ dir, base, log, phases, cards: OTA_CARDS, seed: SEED + 1000, windows: [[phases[1].at, phases[2].at], [phases[2].at, phases[3].at], [phases[3].at, phases[4].at], [phases[4].at, Infinity], null], check: ackedCheck(acked, ["0.1.0", "0.2.0"]) });
});

const CLAIM_CARDS = Number(process.env.POWER_CUT_CLAIM_CARDS || 3);

test(`faithful power cuts through a claim and a factory reset: ${CLAIM_CARDS} rebuilt cards are unclaimed or hold one whole store, never half a reset`, { timeout: 240000 + CLAIM_CARDS * 120000 }, async () => {
  const { mint, pubB64 } = claimKit();
  const hubEnv = `DEV=off\nPORT=4001\nCLAIM_PUBLIC_KEY_BASE64=${pubB64}\n`;
  const { dir, card } = cardFrom(IMAGE, { sizeMiB: 320, hubEnv });
  const status = async (b) => JSON.parse((await httpsReq(b, "/status")).body);
  const up = async (b) => {
    await b.waitFor(/not claimed yet/, 120000);
    await b.healthz(60000);
    return (await status(b)).caFingerprint;
  };
  const { box, base, log, first: fp } = await recordFrom(card, dir, up);
  const phases = [{ at: 0, name: "boot, unclaimed" }];
  const claim = async () => {
    const r = await httpsReq(box, "/setup/claim", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token: mint("claim") }) });
    assert.equal(r.status, 200, r.body);
    for (let i = 0; i < 150; i++) {
      try { if ((await status(box)).realms[0]?.storeId === "s-001") return logSize(log); } catch {}
      await sleep(200);
    }
    throw new Error("the claimed realm never appeared");
  };
  phases.push({ at: logSize(log), name: "claim (claimed.env written, hub restarts)" });
  const claimedAt = await claim();
  phases.push({ at: claimedAt, name: "claimed, devices writing" });
  let s = await connect(box, mint("till", "till-1"));
  const acked1 = await writeUnderLoad(s, "c1", 60, 4, log);
  s.close();
  const resetAt = logSize(log);
  phases.push({ at: resetAt, name: "factory reset (marker, reboot, wipe)" });
  const from = box.console.length;
  const r = await httpsReq(box, "/admin/reset", { method: "POST", headers: { authorization: `Bearer ${mint("admin", "owner")}`, "content-type": "application/json" }, body: JSON.stringify({ confirm: "RESET" }) });
  assert.equal(r.status, 202, r.body);
  await box.waitFor(/factory reset done/, 120000, from);
  await box.waitFor(/not claimed yet/, 90000, from);
  await box.healthz(60000);
  const wipedAt = logSize(log);
  phases.push({ at: wipedAt, name: "unclaimed again, second claim" });
  const claimed2At = await claim();
  phases.push({ at: claimed2At, name: "claimed again, devices writing" });
  s = await connect(box, mint("till", "till-1"));
  const acked2 = await writeUnderLoad(s, "c2", 40, 4, log);
  s.close();
  await box.powerCut();
  cleanup.splice(cleanup.indexOf(box), 1);

  const check = async (b, cut, label) => {
    const st = await status(b);
    assert.equal(st.caFingerprint, fp, `${label}: the store CA survives (devices keep trusting the box)`);
    if (st.realms.length === 0) {
      assert.ok(cut < claimedAt || (cut >= resetAt && cut < claimed2At), `${label}: unclaimed, but a claim was acknowledged before the cut and no reset after it`);
      return "hub up, unclaimed";
    }
    assert.equal(st.realms[0].storeId, "s-001", `${label}: the claimed store`);
    const c = await connect(b, mint("till", "till-check"), { auth: { since: 0 } });
    const ids = c.got.map((e) => e.id);
    c.close();
    assert.deepEqual(c.got.map((e) => e.seq), c.got.map((_, j) => j + 1), `${label}: seqs contiguous from 1`);
    const before = ids.filter((id) => id.startsWith("c1-")).length, after = ids.filter((id) => id.startsWith("c2-")).length;
    assert.ok(!(before && after), `${label}: events from before and after the reset in one log`);
    assert.ok(!(cut >= wipedAt && before), `${label}: events wiped by a finished reset came back`);
    const lost = (acked) => acked.filter((a) => a.logSize <= cut && !ids.includes(a.id)).map((a) => a.id);
    // Before the reset was asked, or with the old store still there (the reset not begun,
    // or begun and redone at the next boot): every event acked before the cut.
    if (cut < resetAt || before) assert.deepEqual(lost(acked1), [], `${label}: acked events lost`);
    if (cut >= claimed2At) assert.deepEqual(lost(acked2), [], `${label}: acked events lost after the second claim`);
    return `hub up, claimed, ${ids.length} events (${before} from before the reset, ${after} after)`;
  };
  await checkRebuilt({ dir, base, log, phases, cards: CLAIM_CARDS, seed: SEED + 2000, windows: [[resetAt, wipedAt], [phases[1].at, claimedAt], null], check });
});
