// Issue 5, mDNS: the hub runs in one network namespace, a separate avahi-daemon (with its own
// D-Bus, in a private mount namespace) and `pos-hub discover` in another; a veth pair created
// by this test joins them. Nothing leaves the machine.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { HUB, tmp, run, startHub, sleep } from "../lib/hub.mjs";
import { vethPair } from "../lib/netns.mjs";

const haveAvahi = run("sh", ["-c", "command -v avahi-daemon && command -v avahi-browse && command -v dbus-daemon"]).code === 0;
const root = process.getuid?.() === 0 && run("ip", ["netns", "list"]).code === 0;

const netns = (tag) => vethPair(`poshub-ma-${tag}`, `poshub-mb-${tag}`, "10.88.0");

function avahiBrowse(ns) {
  const dir = tmp("avahi");
  const script = path.join(dir, "browse.sh");
  fs.writeFileSync(script, `set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/dbus /run/avahi-daemon
cat > ${dir}/avahi.conf <<CONF
[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=b0
enable-dbus=yes
[publish]
disable-publishing=yes
CONF
dbus-daemon --system --fork --nopidfile
avahi-daemon --no-drop-root --no-chroot --no-rlimits -f ${dir}/avahi.conf -D
sleep 2
timeout 10 avahi-browse -rpt _poshub._tcp
`);
  return spawnSync("ip", ["netns", "exec", ns, "unshare", "-m", "sh", script], { encoding: "utf8", timeout: 30000 }).stdout || "";
}

test("avahi-browse and pos-hub discover see the hub's _poshub._tcp service with its TXT records", { skip: (!root && "needs root and ip netns") || (!haveAvahi && "avahi-daemon/avahi-utils/dbus not installed") }, async () => {
  const n = netns(process.pid);
  try {
    const hub = await startHub({ netns: n.a, env: { MDNS: "on" } });
    try {
      const fp = run(HUB, ["ca", "fingerprint", "--data-dir", hub.dataDir]).out.trim();
      const out = avahiBrowse(n.b);
      const line = out.split("\n").find((l) => l.startsWith("=;b0;IPv4;"));
      assert.ok(line, `avahi-browse resolved nothing:\n${out}`);
      assert.match(line, /POS\\032Hub\\032-\\032/);
      assert.match(line, /;10\.88\.0\.1;/);
      assert.match(line, new RegExp(`;${hub.port};`));
      for (const kv of ["storeId=s-dev", "tenantId=t-dev", "version=1", "tls=1", `caFp=${fp}`]) assert.ok(line.includes(`"${kv}"`), `${kv} in ${line}`);
      const d = run("ip", ["netns", "exec", n.b, HUB, "discover", "--timeout", "3s", "--realm", "t-dev:s-dev"]);
      assert.equal(d.code, 0, d.out);
      assert.match(d.out, /t-dev:s-dev .*10\.88\.0\.1/);
      assert.match(d.out, /matches the advertised fingerprint/);
    } finally { assert.equal(await hub.stop(), 0); }
    // After a goodbye, nobody answers.
    await sleep(500);
    const gone = run("ip", ["netns", "exec", n.b, HUB, "discover", "--timeout", "2s"]);
    assert.equal(gone.code, 1, gone.out);
  } finally { n.cleanup(); }
});

test("MDNS=off advertises nothing", { skip: !root && "needs root and ip netns" }, async () => {
  const n = netns(`${process.pid}x`);
  try {
    const hub = await startHub({ netns: n.a, env: { MDNS: "off" } });
    try {
      const d = run("ip", ["netns", "exec", n.b, HUB, "discover", "--timeout", "2s"]);
      assert.equal(d.code, 1, d.out);
    } finally { await hub.stop(); }
  } finally { n.cleanup(); }
});
