// Discovery in network namespaces (as tests/box does): the hub advertises _poshub._tcp over
// mDNS in one namespace; a till process in another finds it with no URL and no CA given,
// fetches /ca.crt, checks it against the TXT caFp, pins it, and delivers its events. Then a
// rogue advertiser points at the same hub with a CA fingerprint that does not match: refused.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { HUB, procs, tmp, run, startHub, sleep, mint, caPem, until, spawnNode } from "./helpers.mjs";
import { vethPair } from "../../../tests/lib/netns.mjs";

after(() => { for (const p of procs) try { p.kill("SIGKILL"); } catch {} });
const root = process.getuid?.() === 0 && run("ip", ["netns", "list"]).code === 0;

const netns = (tag) => vethPair(`poshub-sdka-${tag}`, `poshub-sdkb-${tag}`, "10.89.0");

function device(ns, dataDir, name, extra = {}) {
  const d = tmp(`sdk-mdns-${name}`);
  const o = { token: mint(dataDir, name), hubs: [], dir: path.join(d, "store"), resolved: path.join(d, "resolved.txt"), rx: path.join(d, "rx.txt"), count: 5, discovery: { timeout: 2000 }, exitWhenDrained: true, ...extra };
  const p = spawnNode("device.mjs", [JSON.stringify(o)], { netns: ns });
  p.dir = o.dir;
  return p;
}

test("mDNS: a till finds the hub, checks /ca.crt against caFp, pins it; a mismatched caFp is refused", { skip: !root && "needs root and ip netns" }, async () => {
  const n = netns(process.pid);
  try {
    let hub = await startHub({ netns: n.a, env: { MDNS: "on" } });
    const fp = run(HUB, ["ca", "fingerprint", "--data-dir", hub.dataDir]).out.trim();
    const ok = device(n.b, hub.dataDir, "till-mdns");
    await until(() => ok.messages.some((m) => m.drained), 30000, `discovered and drained (${ok.err} ${JSON.stringify(ok.messages)})`);
    const st = ok.messages.find((m) => m.drained).drained;
    assert.equal(st.state, "hub");
    assert.equal(st.hub, `https://10.89.0.1:${hub.port}`);
    assert.equal(st.outbox, 0);
    assert.equal(await ok.exited, 0);
    // Read once the till has stopped: the last working hub is written without holding up sends.
    const meta = JSON.parse(fs.readFileSync(path.join(ok.dir, "meta.json"), "utf8"));
    assert.equal(meta.ca.trim(), caPem(hub.dataDir).trim(), "the store CA is pinned");
    assert.deepEqual(meta.hubs, [st.hub], "remembered as the last working hub");
    await hub.stop();

    // The same hub, silent; a rogue advertiser with a fingerprint that is not the hub's CA.
    hub = await startHub({ netns: n.a, dataDir: hub.dataDir, port: hub.port, env: { MDNS: "off" } });
    const wrong = fp.split(":").map((x, i) => (i === 0 ? (x === "00" ? "01" : "00") : x)).join(":");
    const rogue = spawnNode("fake-advert.mjs", ["10.89.0.1", String(hub.port), wrong], { netns: n.a });
    await until(() => rogue.messages.length, 5000, "rogue advertiser up");
    const bad = device(n.b, hub.dataDir, "till-rogue");
    await until(() => bad.messages.some((m) => m.error === "ca_mismatch"), 20000, `ca_mismatch (${bad.err} ${JSON.stringify(bad.messages)})`);
    await sleep(2000);
    assert.ok(!bad.messages.some((m) => m.drained), "never delivered to a hub whose CA does not match");
    assert.ok(!fs.existsSync(path.join(bad.dir, "meta.json")) || !JSON.parse(fs.readFileSync(path.join(bad.dir, "meta.json"), "utf8")).ca, "nothing pinned");
    const msg = bad.messages.find((m) => m.error === "ca_mismatch").message;
    assert.match(msg, new RegExp(fp.replace(/:/g, ":")), "names the CA it was served");
    bad.kill("SIGKILL");
    rogue.kill("SIGKILL");
    await hub.stop();
  } finally { n.cleanup(); }
});
