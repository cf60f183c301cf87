#!/usr/bin/env python3
"""py_workload: a CPython process for checkpoint/restore tests (standard library only).

    python3 py_workload.py --report PATH

Builds a dict of 200,000 entries ("key-000123" -> tuple of ints derived from the
key) and starts a worker thread that increments a counter forever (sleeping 1 ms
every 100 increments) and appends the counter to a list every 1000 increments.
Writes "ready" to PATH once set up. On SIGUSR1 the main loop re-derives and
compares every dict entry, checks the worker's list, that the worker thread is
alive (and still in /proc/self/task), and that its counter advances (waiting up
to 2 s), then writes one JSON line:
    {"ok": true, "progress": COUNTER, "pid": P, "tids": [main, worker], "checks": K, "detail": "..."}
Both files are written to PATH.tmp and renamed. SIGTERM: exit 0.
"""
from report_file import write_report
import argparse
import json
import os
import signal
import threading
import time
import zlib

N = 200_000


def key(i):
    return f"key-{i:06d}"


def derive(k):
    n = int(k[4:])
    return (n, n * n % 1_000_003, zlib.crc32(k.encode()), len(k), sum(map(ord, k)))


class Worker(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True, name="py-worker")
        self.counter = 0
        self.appended = []
        self.tid = None

    def run(self):
        self.tid = threading.get_native_id()
        c = 0
        while True:
            c += 1
            self.counter = c
            if c % 1000 == 0:
                self.appended.append(c)
            if c % 100 == 0:
                time.sleep(0.001)


def write_atomic(path, text):
    write_report(path, text)


def check(table, worker, last_counter):
    problems = []
    if len(table) != N:
        problems.append(f"dict has {len(table)} entries, expected {N}")
    for i in range(N):
        k = key(i)
        v = table.get(k)
        want = derive(k)
        if v != want:
            problems.append(f"dict[{k!r}] is {v!r}, expected {want!r}")
            break
    if not worker.is_alive():
        problems.append("worker thread is not alive")
    elif not os.path.exists(f"/proc/self/task/{worker.tid}"):
        problems.append(f"worker tid {worker.tid} missing from /proc/self/task")
    c0 = worker.counter
    lst = list(worker.appended)
    c1 = worker.counter
    if not (c0 // 1000 - 1 <= len(lst) <= c1 // 1000):
        problems.append(f"worker list has {len(lst)} items for counter {c0}..{c1}")
    for j, x in enumerate(lst):
        if x != (j + 1) * 1000:
            problems.append(f"worker list item {j} is {x}, expected {(j + 1) * 1000}")
            break
    deadline = time.monotonic() + 2
    while worker.counter <= last_counter and time.monotonic() < deadline:
        time.sleep(0.01)
    if worker.counter <= last_counter:
        problems.append(f"worker counter stuck at {worker.counter} (was {last_counter} at the last check)")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", required=True)
    args = ap.parse_args()

    flags = {"usr1": False, "term": False}

    def on_usr1(signum, frame):
        flags["usr1"] = True

    def on_term(signum, frame):
        flags["term"] = True

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_term)

    table = {key(i): derive(key(i)) for i in range(N)}
    worker = Worker()
    worker.start()
    while worker.tid is None or worker.counter == 0:
        time.sleep(0.001)
    write_atomic(args.report, "ready\n")

    last_counter, checks = 0, 0
    while not flags["term"]:
        if flags["usr1"]:
            flags["usr1"] = False
            problems = check(table, worker, last_counter)
            progress = worker.counter
            last_counter = progress
            checks += 1
            report = {
                "ok": not problems,
                "progress": progress,
                "pid": os.getpid(),
                "tids": [threading.get_native_id(), worker.tid],
                "checks": checks,
                "detail": "; ".join(problems) or f"dict of {N} ok, worker alive at {progress}",
            }
            write_atomic(args.report, json.dumps(report) + "\n")
            continue
        time.sleep(0.01)
    raise SystemExit(0)


if __name__ == "__main__":
    main()
