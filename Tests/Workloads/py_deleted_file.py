"""Keeps writing into a file it has already deleted.

    python3 py_deleted_file.py --report PATH --dir DIR

It creates DIR/scratch.bin, writes 256 KiB of a known pattern, unlinks the file and keeps its fd.
Every 5 ms it stores its counter (8 bytes) at offset 0 with pwrite, and keeps the counter in
memory too. On SIGUSR1 it checks, through the fd, that the file is still unlinked, that offset 0
holds the counter its memory holds, and that the pattern is intact, and writes one JSON line to
PATH (PATH.tmp + rename): {"ok":..,"progress":counter,"pid":..,"detail":..}.
"""
from report_file import write_report
import json, os, signal, struct, sys, time

report = sys.argv[sys.argv.index("--report") + 1]
directory = sys.argv[sys.argv.index("--dir") + 1]
path = os.path.join(directory, "scratch.bin")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
pattern = bytes((i * 7 + 3) % 251 for i in range(256 * 1024))
os.pwrite(fd, pattern, 8)
os.unlink(path)
counter = 0


def write(text):
    write_report(report, text)


def check(signum, frame):
    problems = []
    if os.fstat(fd).st_nlink != 0:
        problems.append("the file has a name again")
    stored = struct.unpack("Q", os.pread(fd, 8, 0))[0]
    if stored != counter:
        problems.append("the file holds counter %d, memory %d" % (stored, counter))
    if os.pread(fd, len(pattern), 8) != pattern:
        problems.append("the pattern in the deleted file changed")
    write(json.dumps({"ok": not problems, "progress": counter, "pid": os.getpid(),
                      "detail": "; ".join(problems) or "counter %d in the deleted file and in memory" % counter}))


signal.signal(signal.SIGUSR1, check)
while True:
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    counter += 1
    os.pwrite(fd, struct.pack("Q", counter), 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    if counter == 10:
        write("ready\n")
    time.sleep(0.005)
