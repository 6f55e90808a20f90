// A rogue mDNS advertiser for the discovery test: answers _poshub._tcp queries for the dev
// realm pointing at a real hub, but with a CA fingerprint that is not that hub's.
// Usage: node fake-advert.mjs IP PORT CAFP
import mdns from "multicast-dns";

const [ip, port, caFp] = process.argv.slice(2);
const SERVICE = "_poshub._tcp.local";
const inst = `POS Hub - rogue (s-dev/t-dev).${SERVICE}`;
const host = "rogue.local";
const m = mdns({ reuseAddr: true });
const records = [
  { name: SERVICE, type: "PTR", ttl: 120, data: inst },
  { name: inst, type: "SRV", ttl: 120, data: { port: Number(port), target: host, priority: 0, weight: 0 } },
  { name: inst, type: "TXT", ttl: 120, data: ["version=1", "tls=1", "tenantId=t-dev", "storeId=s-dev", `caFp=${caFp}`] },
  { name: host, type: "A", ttl: 120, data: ip },
];
m.on("query", (q) => {
  if (q.questions.some((x) => records.some((r) => r.name === x.name))) m.respond({ answers: records });
});
process.stdout.write(JSON.stringify({ advertising: inst }) + "\n");
