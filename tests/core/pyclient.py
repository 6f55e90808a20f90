"""python-socketio (the official Python client) against the real hub: connect with the
cluster token, an event with an ack, the fan-out to a second client, catch-up with
`since`, a refused token. Run by python.test.mjs with HUB_URL, TOKEN_A, TOKEN_B, BAD_TOKEN,
TRANSPORT (websocket | polling). Prints one JSON line with what it saw."""
import json
import os
import sys
import threading
import time

import socketio

url = os.environ["HUB_URL"]
transports = [os.environ.get("TRANSPORT", "websocket")]
out = {}

a = socketio.Client(reconnection=False)
b = socketio.Client(reconnection=False)
got_b = []
synced_b = threading.Event()
seen = threading.Event()


@b.on("synced")
def _synced(data):
    out["b_synced"] = data
    synced_b.set()


@b.on("event")
def _event(e):
    got_b.append(e)
    if e["id"] == "py-1":
        seen.set()


b.connect(url, auth={"token": os.environ["TOKEN_B"], "since": 0}, transports=transports, wait_timeout=10)
if not synced_b.wait(10):
    sys.exit("no synced for b")
a.connect(url, auth={"token": os.environ["TOKEN_A"]}, transports=transports, wait_timeout=10)
out["ack"] = a.call("event", {"id": "py-1", "type": "order.created", "payload": {"total": 1}}, timeout=10)
out["dup"] = a.call("event", {"id": "py-1", "type": "order.created", "payload": {"total": 1}}, timeout=10)
out["batch"] = a.call("events", [{"id": "py-2", "type": "t", "payload": 2}, {"id": "bad id", "type": "t", "payload": 3}], timeout=10)
out["b_got_fanout"] = seen.wait(10)
time.sleep(0.3)
out["sync"] = a.call("sync", {"since": 0}, timeout=10)
out["b_ids"] = [e["id"] for e in got_b]
a.disconnect()
b.disconnect()

c = socketio.Client(reconnection=False)


@c.event
def connect_error(data):
    out["refused"] = data


try:
    c.connect(url, auth={"token": os.environ["BAD_TOKEN"]}, transports=transports, wait_timeout=10)
    out["refused"] = "connected"
except socketio.exceptions.ConnectionError:
    pass
print(json.dumps(out))
