"""A parent and a child sharing a memfd mapping; the child runs as another user.

    python3 py_memfd_tree.py --report PATH

The parent creates a memfd, maps it MAP_SHARED and forks; the child drops to uid/gid 65534 and
adds 1 to a counter in the shared page every millisecond. On SIGUSR1 the parent checks that the
counter it sees through its own mapping advances (so the two processes still share one object),
that reading the memfd through its fd gives the same counter (fd and mapping are one object), and
that the child still runs as 65534, then writes one JSON line to PATH (PATH.tmp + rename):
{"ok":..,"progress":counter,"pid":..,"detail":..}. "ready" once the child has counted.
"""
from report_file import write_report
import json, mmap, os, signal, struct, sys, time

report = sys.argv[sys.argv.index("--report") + 1]
fd = os.memfd_create("stasis-shared")
os.ftruncate(fd, 4096)
shared = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
child = os.fork()
if child == 0:
    os.setgid(65534)
    os.setuid(65534)
    while True:
        value = struct.unpack_from("Q", shared, 0)[0]
        struct.pack_into("Q", shared, 0, value + 1)
        time.sleep(0.001)


def write(text):
    write_report(report, text)


def check(signum, frame):
    problems = []
    first = struct.unpack_from("Q", shared, 0)[0]
    time.sleep(0.3)
    second = struct.unpack_from("Q", shared, 0)[0]
    through_fd = struct.unpack("Q", os.pread(fd, 8, 0))[0]
    if second <= first:
        problems.append("the counter does not advance in the parent's mapping (%d -> %d)" % (first, second))
    if through_fd < second:
        problems.append("the memfd read through its fd (%d) lags its mapping (%d)" % (through_fd, second))
    with open("/proc/%d/status" % child) as status:
        uid = next(line for line in status if line.startswith("Uid:")).split()[1:]
    if uid != ["65534"] * 4:
        problems.append("the child runs as uid %s" % uid)
    write(json.dumps({"ok": not problems, "progress": second, "pid": os.getpid(),
                      "detail": "; ".join(problems) or "shared counter %d, child uid 65534" % second}))


signal.signal(signal.SIGUSR1, check)
while struct.unpack_from("Q", shared, 0)[0] < 10:
    time.sleep(0.01)
write("ready\n")
while True:
    time.sleep(1)
