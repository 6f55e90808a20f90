// The example till: one HubClient, buttons that record, a status line, and the events of the
// store's other devices. `window.till` is what the browser test and the bench drive.
import { HubClient } from "@pos-hub/client";

const q = new URLSearchParams(location.search);
const client = new HubClient({
  token: q.get("token"),
  hubs: (q.get("hub") ?? "").split(",").filter(Boolean),
  storage: { name: q.get("db") ?? "till" },
  timeout: 3000,
  backoffMax: 500,
});
const received = [];
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
client.on("error", (e) => errors.push({ code: e.code, message: e.message }));

let n = 0;
$("order").onclick = () => client.record("order.created", { total: 12.5, n: ++n });
$("paid").onclick = () => client.record("order.paid", { n });

window.till = {
  ready: client.start(),
  record: (type, payload) => client.record(type, payload).then((r) => r.id),
  status: () => client.status(),
  drained: () => client.drained(),
  received: () => received.map((e) => ({ seq: e.seq, id: e.id })),
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
