// The Node build: the outbox in files (file-store.ts), the store CA trusted from `ca`, or
// fetched from the hub's plain-HTTP `/ca.crt`, checked against a SHA-256 fingerprint (the
// `caFingerprint` option or the `caFp` of the hub's mDNS record) and pinned in the
// storage directory; hubs found by browsing mDNS `_poshub._tcp`.
import http from "node:http";
import { X509Certificate } from "node:crypto";
import mdns from "multicast-dns";
import { Claims, HubClientError, HubClientOptions, normFp } from "./common.js";
import { Candidate, HubClientCore, Platform, PlatformContext } from "./core.js";
import { FileStore } from "./file-store.js";

export * from "./common.js";
export type { Candidate } from "./core.js";

/** GET http://host:port/ca.crt (the hub serves the store CA over plain HTTP for this). */
export function fetchCa(hubUrl: string, timeoutMs = 5000): Promise<string> {
  const u = new URL(hubUrl);
  return new Promise((resolve, reject) => {
    const req = http.get({ host: u.hostname.replace(/^\[|\]$/g, ""), port: u.port || 4001, path: "/ca.crt", timeout: timeoutMs }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => { body += d; if (body.length > 65536) req.destroy(new Error("/ca.crt larger than 64 KiB")); });
      res.on("end", () => (res.statusCode === 200 ? resolve(body) : reject(new Error(`/ca.crt answered ${res.statusCode}`))));
    });
    req.on("timeout", () => req.destroy(new Error("timeout fetching /ca.crt")));
    req.on("error", reject);
  });
}

/** SHA-256 fingerprint `AB:CD:...` of a PEM certificate (as `pos-hub ca fingerprint` prints it). */
export function caFingerprint(pem: string): string {
  return new X509Certificate(pem).fingerprint256;
}

const nodePlatform: Platform = {
  openStore(opts) {
    const dir = opts.storage?.dir;
    if (!dir) throw new HubClientError("invalid_option", "Node needs storage: {dir: '/var/lib/<app>/pos-hub'} for the outbox");
    return new FileStore(dir);
  },

  async prepare(c: Candidate, ctx: PlatformContext) {
    if (!c.url.startsWith("https:")) return {};
    if (ctx.opts.ca) return { ca: ctx.opts.ca };
    const want = c.caFp ?? ctx.opts.caFingerprint;
    const pinned = typeof ctx.meta.ca === "string" ? (ctx.meta.ca as string) : null;
    if (pinned && (!want || normFp(caFingerprint(pinned)) === normFp(want))) return { ca: pinned };
    if (!want) return {}; // the system's trust store (a hub with a publicly trusted certificate)
    let pem: string;
    try {
      pem = await fetchCa(c.url);
    } catch (e) {
      throw new HubClientError("hub_unreachable", `${c.url}: cannot fetch /ca.crt: ${(e as Error).message}`);
    }
    let got: string;
    try { got = caFingerprint(pem); } catch {
      throw new HubClientError("ca_mismatch", `${c.url}/ca.crt is not a PEM certificate; not trusted`);
    }
    if (normFp(got) !== normFp(want)) {
      throw new HubClientError("ca_mismatch", `${c.url}: the CA it serves (${got}) does not match the expected fingerprint ${want}; not trusted, not connecting`, { url: c.url, got, want });
    }
    await ctx.setMeta("ca", pem);
    return { ca: pem };
  },

  discover(claims: Claims, opts: HubClientOptions) {
    const d = typeof opts.discovery === "object" ? opts.discovery : {};
    return browse({ timeout: d.timeout ?? 3000, interface: d.interface }).then((found) =>
      found.filter((f) => f.tenantId === claims.tenantId && f.storeId === claims.storeId)
        .map((f) => ({ url: f.url, caFp: f.caFp })));
  },
};

export interface FoundHub { name: string; url: string; tenantId: string; storeId: string; caFp?: string; addresses: string[]; port: number }

/** Browses mDNS for `_poshub._tcp` hubs for `timeout` ms. */
export function browse({ timeout = 3000, interface: iface }: { timeout?: number; interface?: string } = {}): Promise<FoundHub[]> {
  const SERVICE = "_poshub._tcp.local";
  return new Promise((resolve, reject) => {
    let m: ReturnType<typeof mdns>;
    try {
      m = mdns({ reuseAddr: true, ...(iface ? { interface: iface } : {}) } as any);
    } catch (e) { reject(e); return; }
    const instances = new Set<string>();
    const srv = new Map<string, { port: number; target: string }>();
    const txt = new Map<string, Record<string, string>>();
    const addrs = new Map<string, Set<string>>();
    m.on("error", () => {});
    m.on("response", (res: any) => {
      for (const a of [...(res.answers ?? []), ...(res.additionals ?? [])]) {
        if (a.type === "PTR" && a.name === SERVICE) instances.add(a.data);
        else if (a.type === "SRV") srv.set(a.name, { port: a.data.port, target: a.data.target });
        else if (a.type === "TXT") {
          const kv: Record<string, string> = {};
          for (const b of [a.data].flat()) {
            const s = Buffer.isBuffer(b) ? b.toString("utf8") : String(b);
            const eq = s.indexOf("=");
            if (eq > 0) kv[s.slice(0, eq)] = s.slice(eq + 1);
          }
          txt.set(a.name, kv);
        } else if (a.type === "A" || a.type === "AAAA") {
          if (!addrs.has(a.name)) addrs.set(a.name, new Set());
          if (a.type === "A") addrs.get(a.name)!.add(a.data);
        }
      }
    });
    const ask = () => {
      const q: any[] = [{ name: SERVICE, type: "PTR" }];
      for (const i of instances) {
        if (!srv.has(i)) q.push({ name: i, type: "SRV" });
        if (!txt.has(i)) q.push({ name: i, type: "TXT" });
        const s = srv.get(i);
        if (s && !addrs.get(s.target)?.size) q.push({ name: s.target, type: "A" });
      }
      try { m.query(q); } catch {}
    };
    ask();
    const tick = setInterval(ask, 400);
    setTimeout(() => {
      clearInterval(tick);
      try { m.destroy(); } catch {}
      const out: FoundHub[] = [];
      for (const i of instances) {
        const s = srv.get(i);
        const kv = txt.get(i);
        if (!s || !kv) continue;
        const ips = [...(addrs.get(s.target) ?? [])].sort();
        const scheme = kv.tls === "0" ? "http" : "https";
        for (const ip of ips) {
          out.push({ name: i, url: `${scheme}://${ip}:${s.port}`, tenantId: kv.tenantId ?? "", storeId: kv.storeId ?? "", caFp: kv.caFp, addresses: ips, port: s.port });
        }
      }
      resolve(out);
    }, timeout);
  });
}

/** The pos-hub client for Node (and Electron's main process). */
export class HubClient extends HubClientCore {
  constructor(opts: HubClientOptions) {
    super(opts, nodePlatform);
  }
}
