"""Appends numbered records to a file and keeps their count in memory.

    python3 py_records.py --report PATH --file FILE

Every 5 ms it appends "record N" (N = count + 1) to FILE, opened with O_APPEND, then counts it.
On SIGUSR1 it reads FILE and checks that it holds exactly the lines "record 1" … "record COUNT":
what the file says and what the memory says must agree (no record lost, none repeated, nothing
else). It writes one JSON line to PATH (PATH.tmp + rename): {"ok":..,"progress":COUNT,"pid":..,
"detail":..}; "ready" once ten records are written.
"""
from report_file import write_report
import json, os, signal, sys, time

report = sys.argv[sys.argv.index("--report") + 1]
path = sys.argv[sys.argv.index("--file") + 1]
records = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
count = 0
checking = False


def write(text):
    write_report(report, text)


def check(signum, frame):
    with open(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    expected = ["record %d" % n for n in range(1, count + 1)]
    problems = []
    if lines != expected:
        first = next((i for i, (a, b) in enumerate(zip(lines, expected)) if a != b), min(len(lines), len(expected)))
        problems.append("the file has %d lines, memory counts %d; first difference at line %d: %r"
                        % (len(lines), count, first + 1, lines[first] if first < len(lines) else None))
    write(json.dumps({"ok": not problems, "progress": count, "pid": os.getpid(),
                      "detail": "; ".join(problems) or "%d records in file and memory" % count}))


signal.signal(signal.SIGUSR1, check)
while True:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    os.write(records, b"record %d\n" % (count + 1))
    count += 1
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    if count == 10:
        write("ready\n")
    time.sleep(0.005)
