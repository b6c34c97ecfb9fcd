"""The benchmark's CPU sampler (bench/common.py ``ProcSampler``) reads a long-lived process's CPU
from its threads' run times in nanoseconds (``children="threads"``): psutil's clock ticks (10 ms)
were a tenth of a push node's CPU in a throughput row.  A real child process burns CPU on two
threads; the reading follows it, counts a thread started after the first reading whole, and keeps
its last value once the process is gone.  (A thread that exits loses what it ran since the last
reading: the clock is for processes whose threads live on, as a node's.)"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
common = pytest.importorskip("common")

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="the threads' clock reads Linux's /proc")

BURNER = r"""
import sys, threading, time

def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass

sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()          # go: burn 0.3 s on the main thread and 0.3 s on a new thread, which lives on
done, leave = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (burn(0.3), done.set(), leave.wait()))
t.start(); burn(0.3); done.wait()
sys.stdout.write("burnt\n"); sys.stdout.flush()
sys.stdin.readline()          # burn 15 ms: between two clock ticks
burn(0.015)
sys.stdout.write("burnt\n"); sys.stdout.flush()
sys.stdin.readline()          # exit
leave.set(); t.join()
"""


def test_the_threads_clock_counts_every_thread_in_nanoseconds_and_keeps_its_last_value_once_the_process_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    sampler = common.ProcSampler(interval=3600)
    try:
        assert proc.stdout.readline() == "ready\n"
        sampler.add("burner", proc.pid, children="threads")
        sampler.start("burn")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "burnt\n"
        reading = sampler.end()["burner"]
        burnt = reading["cpu_s"]
        # the main thread's own share, and the times the kernel ran it
        assert 0.3 <= reading["main_s"] < 0.375, reading
        assert reading["main_runs"] >= 1
        # 0.6 s burnt on two threads, the second started after the first reading: counted whole;
        # the interpreter's own work around it is a few ms
        assert 0.6 <= burnt < 0.75, burnt

        sampler.start("15 ms")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "burnt\n"
        # in nanoseconds: psutil's ticks of 10 ms read 0.01 or 0.02 here
        assert abs(sampler.end()["burner"]["cpu_s"] - 0.015) < 0.004

        sampler.start("idle")
        time.sleep(0.2)
        assert sampler.end()["burner"]["cpu_s"] < 0.05  # a waiting process: no tick's worth

        sampler.start("exit")
        proc.stdin.write("bye\n")
        proc.stdin.flush()
        proc.wait(10)
        gone = sampler.end()
        assert "burner" in gone and gone["burner"]["cpu_s"] < 0.05  # its last reading stands, not psutil's clock
    finally:
        sampler.stop()
        proc.kill()
        proc.wait(10)
