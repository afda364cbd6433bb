"""The dashboard's cluster driver: a child process that must not outlive the server that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import ROOT, process_running

SERVER = """
import threading, time
from quantlab.cluster_driver import driver_for

def start():  # from a thread that ends, as a sweep's thread does
    print(driver_for("127.0.0.1:1").pid, flush=True)

thread = threading.Thread(target=start)
thread.start()
thread.join()
time.sleep(60)
"""


def test_the_driver_lives_past_the_thread_that_started_it_and_ends_with_its_server():
    server = subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    driver = int(server.stdout.readline())
    time.sleep(2)
    assert process_running(driver)  # its starting thread has ended: it still serves the server
    server.kill()  # no atexit, no clean-up: as an out-of-memory kill
    server.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process_running(driver):
        time.sleep(0.1)
    assert not process_running(driver)
