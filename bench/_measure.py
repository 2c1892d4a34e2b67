"""Run a Python script or module in this process and append its wall time and peak RSS to a JSON file.

    python bench/_measure.py OUT.json (-m module | script.py) args...
"""
import json
import resource
import runpy
import sys
import threading
import time

peak_anon_kb = 0


def _sample_anonymous_memory() -> None:
    """Peak RssAnon: memory that is really the process's (mmap'd file pages excluded)."""
    global peak_anon_kb
    while True:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        peak_anon_kb = max(peak_anon_kb, int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.005)


def main() -> None:
    global peak_anon_kb
    threading.Thread(target=_sample_anonymous_memory, daemon=True).start()

    out = sys.argv[1]
    if sys.argv[2] == "-m":
        target, args, runner = sys.argv[3], sys.argv[4:], runpy.run_module
    else:
        target, args, runner = sys.argv[2], sys.argv[3:], runpy.run_path
    sys.argv = [target, *args]
    start = time.perf_counter()
    code = 0
    try:
        runner(target, run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    # The largest of the waited-for child processes (e.g. tokenising workers), each counted on its own.
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(out, "a") as fh:
        fh.write(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "peak_anon_mb": peak_anon_kb / 1024,
                             "peak_child_rss_mb": child_mb, "exit": code}) + "\n")
    sys.exit(code)


# Guarded: worker processes started with "spawn" import this file again as their main module.
if __name__ == "__main__":
    main()
