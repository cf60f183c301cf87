"""The report protocol's file writes, shared by the Python test workloads."""
import os


def write_report(path, text):
    """Writes `text` to PATH.tmp and renames it to PATH, so a reader never sees a partial report."""
    with open(path + ".tmp", "w") as out:
        out.write(text)
    os.rename(path + ".tmp", path)
