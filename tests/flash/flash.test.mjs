// System tests of `pos-hub flash` (issue 8): a small pos-hub-shaped image built here
// with truncate, sfdisk, mkfs.vfat and mtools, flashed to files, a loop device and
// (refused) the machine's own disk. Real files and real commands, no mocks.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.POS_HUB_BIN || path.resolve(here, "../../target/debug/pos-hub");
const MiB = 1024 * 1024;
const env = { ...process.env, MTOOLS_SKIP_CHECK: "1", LC_ALL: "C" };

let dir; // scratch directory
let IMG; // the test image
let P1; // { start, size } of partition 1, bytes
let KEY_PEM; // an Ed25519 public key, PEM
let KEY_FILE;
const cleanups = [];

const run = (cmd, args, opts = {}) => execFileSync(cmd, args, { env, encoding: "utf8", ...opts });
const sha = (file) => crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
const tmp = (name) => path.join(dir, name);
const ORIGINAL_ENV = [
  "# pos-hub store settings. Edit with any text editor (this partition is readable on",
  "# Windows and Mac), then put the card back and power the box on.",
  "#   TENANT_ID=t-abc",
  "DEV=on",
  "PORT=4001",
  "UPDATE_CHANNEL=stable",
  "",
].join("\n");

/** Runs `pos-hub flash ARGS`; stdin is a pipe (not a terminal) unless told otherwise. */
function flash(args, opts = {}) {
  const r = spawnSync(BIN, ["flash", ...args], {
    env,
    encoding: "utf8",
    input: opts.input ?? "",
    timeout: 120000,
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function hubEnv(file, start = P1.start) {
  // (mtools warns "Could not get geometry" on a loop device; only its output matters)
  return run("mtype", ["-i", `${file}@@${start}`, "::hub.env"], { stdio: ["ignore", "pipe", "pipe"] });
}

/** Parses hub.env into a map (KEY=VALUE lines). */
function envMap(text) {
  const m = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const i = line.indexOf("=");
    m[line.slice(0, i)] = line.slice(i + 1);
  }
  return m;
}

/** Asserts that `a` and `b` have the same bytes except in [skipStart, skipEnd). */
function sameOutside(a, b, skipStart, skipEnd, len) {
  const A = fs.readFileSync(a);
  const B = fs.readFileSync(b);
  assert.ok(A.length >= len && B.length >= len);
  assert.ok(A.subarray(0, skipStart).equals(B.subarray(0, skipStart)), "bytes before partition 1 differ");
  assert.ok(A.subarray(skipEnd, len).equals(B.subarray(skipEnd, len)), "bytes after partition 1 differ");
}

function assertRefused(r, re) {
  assert.notEqual(r.status, 0, `expected a refusal, got exit 0\n${r.stderr}`);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, re);
  assert.doesNotMatch(r.stderr, /writing\s+\d+%/, "it started writing");
}

before(() => {
  assert.ok(fs.existsSync(BIN), `${BIN} not found: build it (cargo build -p pos-hub) or set POS_HUB_BIN`);
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "pos-hub-flash-"));
  IMG = tmp("pos-hub-test.img");
  // 40 MiB, dos label, 4 partitions like the real image: settings, boot A, boot B, data.
  run("truncate", ["-s", "40M", IMG]);
  run("sfdisk", ["--quiet", IMG], {
    input: "label: dos\nsize=16MiB, type=e, bootable\nsize=8MiB, type=c\nsize=8MiB, type=c\nsize=4MiB, type=83\n",
  });
  const parts = JSON.parse(run("sfdisk", ["-J", IMG])).partitiontable.partitions;
  assert.equal(parts.length, 4);
  P1 = { start: parts[0].start * 512, size: parts[0].size * 512 };
  // Partition 1: FAT16 labelled POSHUB-CFG with a hub.env.
  const p1 = tmp("p1.img");
  run("mkfs.vfat", ["-C", p1, String(P1.size / 1024), "-n", "POSHUB-CFG", "-F", "16"]);
  fs.writeFileSync(tmp("hub.env.orig"), ORIGINAL_ENV);
  run("mcopy", ["-i", p1, tmp("hub.env.orig"), "::hub.env"]);
  run("dd", [`if=${p1}`, `of=${IMG}`, "bs=512", `seek=${parts[0].start}`, "conv=notrunc", "status=none"]);
  // Recognisable bytes in the other partitions, so "identical outside partition 1" means something.
  const fd = fs.openSync(IMG, "r+");
  for (const p of parts.slice(1)) fs.writeSync(fd, crypto.randomBytes(MiB), 0, MiB, p.start * 512 + 4096);
  fs.closeSync(fd);
  const { publicKey } = crypto.generateKeyPairSync("ed25519");
  KEY_PEM = publicKey.export({ type: "spki", format: "pem" });
  KEY_FILE = tmp("cluster.pub.pem");
  fs.writeFileSync(KEY_FILE, KEY_PEM);
});

after(() => {
  for (const c of cleanups.reverse()) {
    try {
      c();
    } catch (e) {
      console.error("cleanup:", e.message);
    }
  }
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const STORE = [
  "--realm", "t-abc:s-001",
  "--cloud-url", "https://cloud.example/v1/events/ingest",
  "--cloud-token", "tok-123.abc",
  "--update-channel", "canary",
  "--address", "192.168.1.20/24", "--gateway", "192.168.1.1", "--dns", "192.168.1.1,1.1.1.1",
];

test("flash to a new file: the image's bytes outside partition 1, verified, hub.env with the store", () => {
  const out = tmp("new.img");
  const before = sha(IMG);
  const r = flash([IMG, out, ...STORE, "--cluster-key-file", KEY_FILE, "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(sha(IMG), before, "the image changed");
  assert.equal(fs.statSync(out).size, fs.statSync(IMG).size);
  sameOutside(IMG, out, P1.start, P1.start + P1.size, fs.statSync(IMG).size);
  // Both hashes printed, equal to the image's.
  assert.match(r.stdout, new RegExp(`^image  sha256 ${before}$`, "m"));
  assert.match(r.stdout, new RegExp(`^target sha256 ${before}$`, "m"));
  // Progress: a line every 10% (stderr is not a terminal here).
  const pct = [...r.stderr.matchAll(/^writing\s+(\d+)%/gm)].map((m) => Number(m[1]));
  assert.deepEqual(pct, [10, 20, 30, 40, 50, 60, 70, 80, 90, 100], r.stderr);
  assert.match(r.stderr, /^verifying\s+100%.*MiB\/s/m);

  const text = hubEnv(out);
  const m = envMap(text);
  assert.equal(m.TENANT_ID, "t-abc");
  assert.equal(m.STORE_ID, "s-001");
  assert.equal(m.CLUSTER_PUBLIC_KEY_BASE64, Buffer.from(KEY_PEM).toString("base64"));
  assert.equal(m.CLOUD_BRIDGE_URL, "https://cloud.example/v1/events/ingest");
  assert.equal(m.CLOUD_BRIDGE_TOKEN, "tok-123.abc");
  assert.equal(m.UPDATE_CHANNEL, "canary");
  assert.equal(m.NET_ADDRESS, "192.168.1.20/24");
  assert.equal(m.NET_GATEWAY, "192.168.1.1");
  assert.equal(m.NET_DNS, "192.168.1.1,1.1.1.1");
  assert.equal(m.PORT, "4001");
  assert.equal(m.DEV, "off");
  // The image's comment header is kept; its old settings are not.
  assert.ok(text.startsWith(ORIGINAL_ENV.split("\n").slice(0, 3).join("\n") + "\n"), text);
  assert.doesNotMatch(text, /^DEV=on$/m);
  // The partition is still the settings partition (label), and the token is not printed.
  assert.match(run("mlabel", ["-s", "-i", `${out}@@${P1.start}`, "::"]), /POSHUB-CFG/);
  assert.doesNotMatch(r.stderr + r.stdout, /tok-123/);
});

test("flash to an existing bigger file (a fake device): written in place, its size and tail kept", () => {
  const dev = tmp("fake-device.bin");
  const size = 64 * MiB;
  const tail = crypto.randomBytes(MiB);
  fs.writeFileSync(dev, Buffer.alloc(size - MiB, 0xab));
  fs.appendFileSync(dev, tail);
  const b64 = Buffer.from(KEY_PEM).toString("base64");
  const r = flash([IMG, dev, "--realm", "t-x:s-9", "--cluster-key-base64", b64, "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(fs.statSync(dev).size, size);
  const imgSize = fs.statSync(IMG).size;
  sameOutside(IMG, dev, P1.start, P1.start + P1.size, imgSize);
  const D = fs.readFileSync(dev);
  assert.ok(D.subarray(size - MiB).equals(tail), "bytes past the image changed");
  assert.ok(D.subarray(imgSize, size - MiB).every((x) => x === 0xab), "bytes past the image changed");
  const m = envMap(hubEnv(dev));
  assert.equal(m.TENANT_ID, "t-x");
  assert.equal(m.STORE_ID, "s-9");
  assert.equal(m.CLUSTER_PUBLIC_KEY_BASE64, b64);
  assert.equal(m.UPDATE_CHANNEL, "stable");
  assert.equal(m.CLOUD_BRIDGE_URL, undefined);
});

test("no realm: the box is left unclaimed (PORT and UPDATE_CHANNEL only); --dev gives DEV=on", () => {
  const a = tmp("unclaimed.img");
  let r = flash([IMG, a, "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  let m = envMap(hubEnv(a));
  assert.deepEqual(Object.keys(m).sort(), ["PORT", "UPDATE_CHANNEL"]);
  assert.equal(m.PORT, "4001");
  const b = tmp("dev.img");
  r = flash([IMG, b, "--dev", "--update-channel", "1.4.2", "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  m = envMap(hubEnv(b));
  assert.equal(m.DEV, "on");
  assert.equal(m.UPDATE_CHANNEL, "1.4.2");
  assert.equal(m.TENANT_ID, undefined);
});

test("an .img.xz image is decompressed through xz", () => {
  const xz = tmp("pos-hub-test.img.xz");
  run("xz", ["-T1", "-c", IMG], { stdio: ["ignore", fs.openSync(xz, "w"), "inherit"] });
  const out = tmp("from-xz.img");
  const r = flash([xz, out, "--realm", "t-abc:s-002", "--cluster-key-file", KEY_FILE, "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  assert.equal(fs.statSync(out).size, fs.statSync(IMG).size);
  sameOutside(IMG, out, P1.start, P1.start + P1.size, fs.statSync(IMG).size);
  assert.match(r.stdout, new RegExp(`^target sha256 ${sha(IMG)}$`, "m"));
  assert.equal(envMap(hubEnv(out)).STORE_ID, "s-002");
});

test("the field tech's static binary (scripts/build-tools) flashes an .img.xz in an empty environment: no PATH, no xz, no mtools", (t) => {
  const TOOLS = process.env.POS_HUB_TOOLS_BIN; // out/tools/pos-hub-<version>-x86_64-linux
  if (!TOOLS) return t.skip("POS_HUB_TOOLS_BIN not set (scripts/build-tools builds it)");
  assert.match(run("file", ["-L", TOOLS]), /statically linked|static-pie linked/);
  const xz = tmp("tools.img.xz");
  run("xz", ["-T1", "-c", IMG], { stdio: ["ignore", fs.openSync(xz, "w"), "inherit"] });
  const out = tmp("tools-out.img");
  const r = spawnSync(TOOLS, ["flash", xz, out, "--realm", "t-abc:s-003", "--cluster-key-file", KEY_FILE, "--yes"], { env: {}, encoding: "utf8", input: "", timeout: 120000 });
  assert.equal(r.status, 0, r.stderr);
  sameOutside(IMG, out, P1.start, P1.start + P1.size, fs.statSync(IMG).size);
  assert.match(r.stdout, new RegExp(`^target sha256 ${sha(IMG)}$`, "m"));
  assert.equal(envMap(hubEnv(out)).STORE_ID, "s-003");
});

test("scripts/publish-imager: an Imager repository with the stable and canary entries, sizes and SHA-256s of the images", () => {
  const www = tmp("www");
  const stable = tmp("pos-hub-0.1.0-rpi.img.xz"), canary = tmp("pos-hub-0.2.0-rpi5.img.xz");
  for (const f of [stable, canary]) run("xz", ["-T1", "-c", IMG], { stdio: ["ignore", fs.openSync(f, "w"), "inherit"] });
  const PUBLISH = path.resolve(here, "../../scripts/publish-imager");
  run(PUBLISH, ["--dir", www, "--base-url", "https://updates.example/pos/", "--stable", stable, "--canary", canary]);
  const list = JSON.parse(fs.readFileSync(path.join(www, "os_list.json"), "utf8")).os_list;
  assert.deepEqual(list.map((e) => [e.name, e.url, e.devices]), [
    ["pos-hub 0.1.0 (stable)", "https://updates.example/pos/images/pos-hub-0.1.0-rpi.img.xz", ["pi4-64bit", "pi5-64bit"]],
    ["pos-hub 0.2.0 (canary)", "https://updates.example/pos/images/pos-hub-0.2.0-rpi5.img.xz", ["pi5-64bit"]],
  ]);
  for (const [e, f] of [[list[0], stable], [list[1], canary]]) {
    assert.equal(e.extract_size, fs.statSync(IMG).size);
    assert.equal(e.extract_sha256, sha(IMG));
    assert.equal(e.image_download_size, fs.statSync(f).size);
    assert.equal(e.image_download_sha256, sha(f));
    assert.ok(fs.readFileSync(path.join(www, "images", path.basename(f))).equals(fs.readFileSync(f)), "the image is copied as is");
  }
  // A later run for one channel keeps the other's entry.
  run(PUBLISH, ["--dir", www, "--base-url", "https://updates.example/pos", "--canary", stable]);
  const again = JSON.parse(fs.readFileSync(path.join(www, "os_list.json"), "utf8")).os_list;
  assert.deepEqual(again.map((e) => e.name), ["pos-hub 0.1.0 (stable)", "pos-hub 0.1.0 (canary)"]);
  // Refused: a raw image (Imager downloads the .img.xz), a name without version and board.
  assert.throws(() => run(PUBLISH, ["--dir", www, "--base-url", "https://x", "--stable", IMG], { stdio: "pipe" }), /not an \.img\.xz/);
  const odd = tmp("firmware.img.xz");
  fs.copyFileSync(stable, odd);
  assert.throws(() => run(PUBLISH, ["--dir", www, "--base-url", "https://x", "--stable", odd], { stdio: "pipe" }), /not named pos-hub-<version>-<board>/);
});

test("refused: a target smaller than the image, untouched", () => {
  const small = tmp("small.bin");
  fs.writeFileSync(small, crypto.randomBytes(20 * MiB));
  const before = sha(small);
  const r = flash([IMG, small, "--yes"]);
  assertRefused(r, /smaller than the image/);
  assert.equal(sha(small), before);
});

test("refused: the target is the image itself", () => {
  const before = sha(IMG);
  assertRefused(flash([IMG, IMG, "--yes"]), /is the image itself/);
  // Through another name (a hard link) too.
  const link = tmp("link.img");
  fs.linkSync(IMG, link);
  assertRefused(flash([IMG, link, "--yes"]), /is the image itself/);
  assert.equal(sha(IMG), before);
});

test("refused: bad settings, before anything is written", () => {
  const t = tmp("never.img");
  const existing = tmp("existing.bin");
  fs.writeFileSync(existing, crypto.randomBytes(48 * MiB));
  const before = sha(existing);
  const key = ["--cluster-key-file", KEY_FILE];
  const cases = [
    [["--realm", "t-abc", ...key], /--realm "t-abc": expected TENANT:STORE/],
    [["--realm", "t abc:s-001", ...key], /--realm .*expected TENANT:STORE/],
    [["--realm", "t-abc:", ...key], /--realm .*expected TENANT:STORE/],
    [["--realm", "t-abc:s-001"], /needs the cloud's public key/],
    [["--realm", "t-abc:s-001", "--cluster-key-base64", "bm90IGEga2V5"], /--cluster-key-base64/],
    [["--realm", "t-abc:s-001", ...key, "--address", "192.168.1.20"], /--address "192.168.1.20": expected an address with a prefix/],
    [["--realm", "t-abc:s-001", ...key, "--address", "300.1.2.3/24"], /--address "300.1.2.3\/24"/],
    [["--address", "192.168.1.20/24", "--gateway", "10.0.0.1"], /--gateway "10.0.0.1": not in the network/],
    [["--address", "192.168.1.20/24", "--dns", "1.1.1.1,dns.example"], /--dns/],
    [["--gateway", "192.168.1.1"], /need --address/],
    [["--realm", "t-abc:s-001", ...key, "--cloud-url", "ftp://cloud.example/x", "--cloud-token", "t"], /--cloud-url "ftp:\/\/cloud.example\/x" is not an http:\/\/ or https:\/\/ URL/],
    [["--realm", "t-abc:s-001", ...key, "--cloud-url", "https://cloud.example/x"], /--cloud-url needs --cloud-token/],
    [["--update-channel", "nightly!"], /--update-channel "nightly!"/],
  ];
  for (const [args, re] of cases) {
    for (const target of [t, existing]) {
      const r = flash([IMG, target, ...args, "--yes"]);
      assertRefused(r, re);
      assert.match(r.stderr, /^pos-hub flash: /m);
    }
    assert.ok(!fs.existsSync(t), `${args.join(" ")}: created the target`);
  }
  assert.equal(sha(existing), before);
});

test("refused: not a pos-hub image (no POSHUB-CFG partition 1)", () => {
  const other = tmp("other.img");
  run("truncate", ["-s", "20M", other]);
  run("sfdisk", ["--quiet", other], { input: "label: dos\nsize=8MiB, type=c\n" });
  const r = flash([other, tmp("never2.img"), "--yes"]);
  assertRefused(r, /is not a pos-hub image: partition 1 is not a FAT file system/);
  assert.ok(!fs.existsSync(tmp("never2.img")));
});

test("refused: no --yes and stdin is not a terminal", () => {
  const existing = tmp("noyes.bin");
  fs.writeFileSync(existing, crypto.randomBytes(48 * MiB));
  const before = sha(existing);
  const r = flash([IMG, existing], { input: "y\n" });
  assertRefused(r, /pass --yes to confirm/);
  assert.equal(sha(existing), before);
  assertRefused(flash([IMG, tmp("noyes-new.img")]), /pass --yes/);
  assert.ok(!fs.existsSync(tmp("noyes-new.img")));
});

test("on a terminal: asks first; 'n' writes nothing, 'y' flashes with a redrawn progress bar", (t) => {
  if (spawnSync("script", ["--version"]).status !== 0) return t.skip("no `script` (util-linux) to give it a terminal");
  const target = tmp("tty.img");
  const cmd = (answer) =>
    spawnSync("script", ["-qec", `${BIN} flash ${IMG} ${target}`, "/dev/null"], {
      env, encoding: "utf8", input: `${answer}\n`, timeout: 120000,
    });
  let r = cmd("n");
  assert.match(r.stdout, /Write .*pos-hub-test\.img to .*tty\.img \(40\.0 MiB\)\? all data on it will be lost \[y\/N\]/);
  assert.match(r.stdout, /not confirmed; nothing was written/);
  assert.equal(r.status, 2);
  assert.ok(!fs.existsSync(target));
  r = cmd("y");
  assert.equal(r.status, 0, r.stdout);
  assert.match(r.stdout, /\rwriting\s+\[#+\]\s+100%/);
  assert.equal(envMap(hubEnv(target)).PORT, "4001");
});

test("refused: the disk holding / (this machine's system disk), nothing written", (t) => {
  const src = spawnSync("findmnt", ["-no", "SOURCE", "/"], { encoding: "utf8" }).stdout?.trim();
  if (!src || !src.startsWith("/dev/") || !fs.existsSync(src) || !fs.statSync(src).isBlockDevice()) {
    return t.skip(`/ is not on a block device here (${src || "unknown"})`);
  }
  // Its whole disk too (e.g. /dev/sda for /dev/sda2), when it is a partition.
  const disk = spawnSync("lsblk", ["-no", "PKNAME", src], { encoding: "utf8" }).stdout?.trim();
  const targets = [src];
  if (disk) targets.push(`/dev/${disk.split("\n")[0]}`);
  for (const dev of targets) {
    // Without --yes on purpose: even if the checks were broken, a missing --yes would stop
    // it before writing. The message must be the system-disk/mounted refusal, not --yes.
    const r = flash([IMG, dev]);
    assertRefused(r, /system disk|is mounted|is a partition/);
    assert.doesNotMatch(r.stderr, /pass --yes/);
  }
});

/** A loop device over a file, or null when this machine cannot make one (not root, no loop). */
function loopDevice(file) {
  const r = spawnSync("losetup", ["-f", "--show", file], { encoding: "utf8" });
  if (r.status !== 0) return null;
  const dev = r.stdout.trim();
  cleanups.push(() => run("losetup", ["-d", dev]));
  return dev;
}

test("a real block device (a loop device): flashed, verified, hub.env written without mounting", (t) => {
  const backing = tmp("loop-card.bin");
  run("truncate", ["-s", "48M", backing]);
  const dev = loopDevice(backing);
  if (!dev) return t.skip("cannot create a loop device here");
  const r = flash([IMG, dev, "--realm", "t-abc:s-777", "--cluster-key-file", KEY_FILE, "--yes"]);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stderr, /block device, 48\.0 MiB/);
  assert.equal(envMap(hubEnv(dev)).STORE_ID, "s-777");
  sameOutside(IMG, backing, P1.start, P1.start + P1.size, fs.statSync(IMG).size);

  // The file behind a loop device is refused as a target.
  const before = sha(backing);
  assertRefused(flash([IMG, backing, "--yes"]), new RegExp(`attached to ${dev}.*losetup -d`));
  assert.equal(sha(backing), before);
});

test("refused: a mounted block device, even with --yes", (t) => {
  const backing = tmp("mounted.bin");
  run("truncate", ["-s", "48M", backing]);
  run("mkfs.ext4", ["-q", "-F", backing]);
  const dev = loopDevice(backing);
  if (!dev) return t.skip("cannot create a loop device here");
  const mnt = fs.mkdtempSync(path.join(dir, "mnt-"));
  if (spawnSync("mount", ["-o", "ro", dev, mnt]).status !== 0) return t.skip("cannot mount here");
  cleanups.push(() => run("umount", [mnt]));
  const before = sha(backing);
  const r = flash([IMG, dev, "--yes"]);
  assertRefused(r, new RegExp(`${dev} is mounted \\(${dev} is mounted on ${mnt}\\); unmount it first`));
  assert.equal(sha(backing), before);
});
