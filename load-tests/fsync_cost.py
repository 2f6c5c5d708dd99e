#!/usr/bin/env python3
"""What one write + fdatasync of an audit-sized record costs on this disk, appending (the
file's size changes, so ext4 commits its journal) versus overwriting inside blocks already
written with zeros (no metadata change). Usage: fsync_cost.py [DIR] [SYNCS] [ROUNDS]."""
import os
import sys
import time

d = sys.argv[1] if len(sys.argv) > 1 else "."
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
rec = b"x" * 400 + b"\n"


def run(mode):
    p = os.path.join(d, "fsync-cost.tmp")
    if os.path.exists(p):
        os.remove(p)
    flags = os.O_CREAT | os.O_RDWR | (os.O_APPEND if mode == "append" else 0)
    fd = os.open(p, flags, 0o600)
    if mode == "zeroed":
        os.write(fd, b"\0" * (len(rec) * n + 4096))
        os.fsync(fd)
    off, ts = 0, []
    for _ in range(n):
        t = time.perf_counter()
        if mode == "append":
            os.write(fd, rec)
        else:
            os.pwrite(fd, rec, off)
        off += len(rec)
        os.fdatasync(fd)
        ts.append(time.perf_counter() - t)
    os.close(fd)
    os.remove(p)
    ts.sort()
    return sum(ts) / n * 1e3, ts[n // 2] * 1e3


for _ in range(rounds):
    a, z = run("append"), run("zeroed")
    print("append mean %.3f ms p50 %.3f ms | pre-zeroed mean %.3f ms p50 %.3f ms" % (a + z))
