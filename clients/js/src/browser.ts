// The browser build: the outbox in IndexedDB, known hub URLs only (browsers cannot browse
// mDNS), and the browser's own trust store: when a hub answers over plain HTTP but its WSS
// fails, the status says the store CA is not trusted and where to get it.
import { HubClientError, HubClientOptions } from "./common.js";
import { Candidate, HubClientCore, Platform } from "./core.js";
import { IdbStore } from "./idb-store.js";

export * from "./common.js";
export type { Candidate } from "./core.js";

const browserPlatform: Platform = {
  openStore(opts) {
    const s = opts.storage ?? {};
    return new IdbStore(s.name ?? "pos-hub", s.lockWait ?? 2000, s.allowUnlocked ?? false);
  },
  async prepare() {
    return {};
  },
  async explain(c: Candidate) {
    if (!c.url.startsWith("https:")) return null;
    const plain = c.url.replace(/^https:/, "http:");
    try {
      // The hub answers /healthz over plain HTTP on the same port; no-cors: only "did it answer".
      const ac = new AbortController();
      const t = setTimeout(() => ac.abort(), 3000);
      await fetch(`${plain}/healthz`, { mode: "no-cors", signal: ac.signal });
      clearTimeout(t);
    } catch {
      return null;
    }
    return new HubClientError("ca_not_trusted", `${c.url} answers, but this browser does not trust its certificate: install the store CA from ${plain}/ca.crt (compare its fingerprint with the hub's) as a trusted authority`);
  },
};

/** The pos-hub client for browsers (web tills, kitchen screens). */
export class HubClient extends HubClientCore {
  constructor(opts: HubClientOptions) {
    super(opts, browserPlatform);
  }
}
