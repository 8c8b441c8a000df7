from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import ROOT

pytestmark = pytest.mark.slow  # every test here trains a model or uses one trained for it


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.time() + timeout
    while needle not in seen and time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            seen += os.read(fd, 4096)
    return seen


def test_translate_prompts_and_answers_each_line_at_a_terminal(trained_run):
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "nmt.cli", "translate", "-m",
                             str(trained_run / "checkpoints" / "last.pt"), "--greedy"],
                            stdin=terminal, stdout=subprocess.PIPE, stderr=terminal, cwd=ROOT)
    os.close(terminal)
    try:
        assert b"> " in _read_until(controller, b"> ", 120)
        os.write(controller, b"A man is walking.\n")
        first = proc.stdout.readline()  # answered before stdin is closed: not batched until EOF
        assert first.endswith(b"\n")
        assert b"> " in _read_until(controller, b"> ", 60)
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(controller)
