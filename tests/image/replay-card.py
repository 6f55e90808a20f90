#!/usr/bin/env python3
"""Rebuilds an SD card as a power cut could have left it, from a write log.

QEMU's `blklogwrites` block driver records every write, flush and FUA request the guest
sends to its disk, in the dm-log-writes format: a super block (magic, version, entry
count, sector size) in the first log sector, then one entry per request, each a header
sector (sector, nr_sectors, flags, data_len) followed by the data, sector-aligned. The
entry count in the super block is only updated now and then, so a killed QEMU leaves it
behind: entries are read up to the first empty header.

A rebuilt card is the card as it was before the run (BASE) with, in order:
  - every request up to and including flush K (a flush makes what came before durable),
  - then a cut at a random request C between flush K and the next flush: of the
    requests after flush K and before C, each write is kept or dropped at random as a
    whole (a real card may persist volatile writes in any order or not at all), except
    FUA writes, which were durable when they completed; nothing from C on happened.
K = -1 cuts before the first flush.

Usage:
  replay-card.py info LOG
      JSON: sector size, entry count, and each flush's index and log offset (the log's
      size just after the flush entry: an ack sampled at a log size <= that offset was
      made durable by this flush or an earlier one).
  replay-card.py build BASE LOG OUT --flush K [--seed S] [--keep P]
      writes OUT (BASE copied, then replayed) and prints JSON of what was kept.
"""
import argparse
import json
import os
import random
import subprocess
import struct
import sys

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8


def read_log(path):
    """Returns (sector_size, entries); each entry is a dict with index, flags, sector,
    nr (sectors), data (log offset of its data) and end (log offset after it)."""
    with open(path, "rb") as f:
        sb = f.read(28)
        if len(sb) < 28:
            raise SystemExit(f"{path}: no log super block (empty log?)")
        magic, version, _nr, ss = struct.unpack("<QQQI", sb)
        if magic != MAGIC or version != 1:
            raise SystemExit(f"{path}: not a dm-log-writes log (magic {magic:#x}, version {version})")
        size = os.fstat(f.fileno()).st_size
        entries = []
        off = ss
        while off + 32 <= size:
            f.seek(off)
            sector, nr, flags, data_len = struct.unpack("<QQQQ", f.read(32))
            if sector == 0 and nr == 0 and flags == 0 and data_len == 0:
                break  # the first never-written header: end of the log
            data = off + ss
            if flags & (DISCARD):
                length = 0
            elif flags & MARK:
                length = (data_len + ss - 1) // ss * ss
            else:
                length = nr * ss
            end = data + length
            if end > size:
                break  # an entry cut short by the kill
            entries.append({"index": len(entries), "flags": flags, "sector": sector, "nr": nr, "data": data, "end": end})
            off = end
    return ss, entries


def flushes(entries):
    return [e for e in entries if e["flags"] & FLUSH]


def info(args):
    ss, entries = read_log(args.log)
    fl = flushes(entries)
    writes = [e for e in entries if e["nr"] and not e["flags"] & (DISCARD | MARK)]
    print(json.dumps({
        "sectorSize": ss,
        "entries": len(entries),
        "writes": len(writes),
        "bytesWritten": sum(e["nr"] for e in writes) * ss,
        "flushes": [{"index": e["index"], "logOffset": e["end"]} for e in fl],
    }))


def apply(out, log, ss, e):
    if e["flags"] & MARK or e["nr"] == 0:
        return
    out.seek(e["sector"] * ss)
    if e["flags"] & DISCARD:
        out.write(b"\0" * (e["nr"] * ss))  # what a discarded region reads back as here
        return
    log.seek(e["data"])
    left = e["nr"] * ss
    while left:
        chunk = log.read(min(left, 4 << 20))
        if not chunk:
            raise SystemExit("log ended inside an entry's data")
        out.write(chunk)
        left -= len(chunk)


def build(args):
    ss, entries = read_log(args.log)
    fl = flushes(entries)
    if args.flush < -1 or args.flush >= len(fl):
        raise SystemExit(f"--flush {args.flush}: the log has {len(fl)} flushes (0..{len(fl) - 1}, or -1)")
    rng = random.Random(args.seed)
    upto = fl[args.flush]["index"] if args.flush >= 0 else -1
    nxt = fl[args.flush + 1]["index"] if args.flush + 1 < len(fl) else len(entries)
    # The cut falls at a request in (flush K, next flush]: those from it on never happened.
    cut = rng.randint(upto + 1, nxt) if nxt > upto else upto + 1
    tmp = args.out + ".tmp"
    subprocess.run(["cp", "--sparse=always", args.base, tmp], check=True)  # cards are sparse
    kept = dropped = fua = 0
    with open(tmp, "r+b") as out, open(args.log, "rb") as log:
        for e in entries[: upto + 1]:
            apply(out, log, ss, e)
        for e in entries[upto + 1: cut]:
            if e["nr"] == 0:
                continue
            if e["flags"] & FUA:
                fua += 1
                apply(out, log, ss, e)
            elif rng.random() < args.keep:
                kept += 1
                apply(out, log, ss, e)
            else:
                dropped += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, args.out)
    print(json.dumps({
        "flush": args.flush,
        "flushes": len(fl),
        "flushLogOffset": fl[args.flush]["end"] if args.flush >= 0 else 0,
        "cutEntry": cut,
        "entries": len(entries),
        "keptAfterFlush": kept,
        "droppedAfterFlush": dropped,
        "fuaKept": fua,
        "neverIssued": len([e for e in entries[cut:] if e["nr"]]),
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("info")
    i.add_argument("log")
    b = sub.add_parser("build")
    b.add_argument("base")
    b.add_argument("log")
    b.add_argument("out")
    b.add_argument("--flush", type=int, required=True)
    b.add_argument("--seed", type=int, default=1)
    b.add_argument("--keep", type=float, default=0.5, help="chance that a write after the flush is kept")
    args = p.parse_args()
    {"info": info, "build": build}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
