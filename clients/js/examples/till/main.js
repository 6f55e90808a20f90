// The example till: one HubClient, buttons that record, a status line, and the events of the
// store's other devices. `window.till` is what the browser test and the bench drive.
import { HubClient } from "@pos-hub/client";

const q = new URLSearchParams(location.search);
const client = new HubClient({
  token: q.get("token"),
  hubs: (q.get("hub") ?? "").split(",").filter(Boolean),
  storage: { name: q.get("db") ?? "till", lockWait: q.has("lockWait") ? Number(q.get("lockWait")) : undefined, allowUnlocked: q.has("allowUnlocked") },
  timeout: 3000,
  backoffMax: 500,
});
const received = [];
const gaps = [];
const errors = [];
const $ = (id) => document.getElementById(id);

client.on("status", (s) => {
  $("status").dataset.state = s.state;
  $("status").textContent = `${s.state}${s.hub ? " " + s.hub : ""} · outbox ${s.outbox} · cursor ${s.cursor}` +
    (s.lastError ? ` · ${s.lastError.code}: ${s.lastError.message}` : "");
});
client.on("event", (e) => {
  received.push(e);
  const li = document.createElement("li");
  li.textContent = `#${e.seq} ${e.deviceId} ${e.type} ${JSON.stringify(e.payload)}`;
  $("events").append(li);
});
// The hub's log retention deleted events this screen never got (cursor_expired): here is
// where a real app fetches them from the cloud or rebuilds its state. Events from
// g.oldestSeq on follow this handler.
client.on("gap", (g) => {
  gaps.push(g);
  const li = document.createElement("li");
  li.textContent = `events #${g.from}-#${g.to} are missing (deleted by the hub's retention)`;
  $("events").append(li);
});
client.on("error", (e) => errors.push({ code: e.code, message: e.message, data: e.data }));

let n = 0;
$("order").onclick = () => client.record("order.created", { total: 12.5, n: ++n });
$("paid").onclick = () => client.record("order.paid", { n });

const outcome = (p) => p.then((r) => r ?? "ok", (e) => ({ code: e.code, name: e.name, message: e.message }));
const ready = client.start();
ready.catch((e) => { $("status").dataset.state = "offline"; $("status").textContent = `${e.code}: ${e.message}`; });
window.till = {
  ready,
  /** start() again (e.g. once another tab let go of this storage): "ok" or the error. */
  start: () => outcome(client.start()),
  stop: () => client.stop(),
  record: (type, payload) => client.record(type, payload).then((r) => r.id),
  /** record(): {id} or the error's {code, name, message}. */
  tryRecord: (type, payload) => outcome(client.record(type, payload)),
  status: () => client.status(),
  drained: () => client.drained(),
  received: () => received.map((e) => ({ seq: e.seq, id: e.id })),
  gaps: () => gaps,
  errors: () => errors,
  /** record() to durable latencies in ms (for the bench). */
  bench: async (count) => {
    const t = [];
    for (let i = 0; i < count; i++) {
      const t0 = performance.now();
      await client.record("bench.event", { i });
      t.push(performance.now() - t0);
    }
    return t;
  },
};
