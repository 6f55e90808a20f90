// Two network namespaces joined by a veth pair (a0 in the first, b0 in the second, addresses
// <subnet>.1 and <subnet>.2, multicast routed over the pair) for the mDNS tests; needs root.
// cleanup() kills what still runs inside them and deletes them.
import { run } from "./hub.mjs";

export function vethPair(a, b, subnet) {
  for (const n of [a, b]) run("ip", ["netns", "del", n]);
  const cmds = [
    ["netns", "add", a], ["netns", "add", b],
    ["link", "add", "a0", "netns", a, "type", "veth", "peer", "name", "b0", "netns", b],
    ["-n", a, "addr", "add", `${subnet}.1/24`, "dev", "a0"], ["-n", b, "addr", "add", `${subnet}.2/24`, "dev", "b0"],
    ["-n", a, "link", "set", "a0", "up"], ["-n", b, "link", "set", "b0", "up"],
    ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"],
    ["-n", a, "route", "add", "224.0.0.0/4", "dev", "a0"], ["-n", b, "route", "add", "224.0.0.0/4", "dev", "b0"],
  ];
  for (const c of cmds) {
    const r = run("ip", c);
    if (r.code !== 0) throw new Error(`ip ${c.join(" ")}: ${r.out}`);
  }
  return {
    a, b,
    cleanup: () => {
      for (const n of [a, b]) {
        for (const p of run("ip", ["netns", "pids", n]).out.split(/\s+/).filter(Boolean)) try { process.kill(Number(p), "SIGKILL"); } catch {}
        run("ip", ["netns", "del", n]);
      }
    },
  };
}
