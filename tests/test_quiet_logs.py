"""torch's C++-extension helper (imported by ``--compile``) logs "No CUDA runtime is found, using
CUDA_HOME=..." on a CPU-only machine that has a CUDA toolkit: a line a newcomer cannot place.
``segcli.cli.main`` silences it (issue: nothing a user cannot act on)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

SCRIPT = """
import sys
sys.argv = ["segcli", "--version"]
if {through_main}:
    from segcli import cli
    try:
        cli.main()
    except SystemExit:
        pass
import torch.utils.cpp_extension  # what --compile imports
"""


def _stderr(tmp_path, through_main: bool) -> str:
    env = {"CUDA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(through_main=through_main)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is only logged without a CUDA runtime")
def test_cli_silences_the_cuda_home_message(tmp_path):
    assert "No CUDA runtime is found" in _stderr(tmp_path, through_main=False)  # torch does log it
    assert "No CUDA runtime is found" not in _stderr(tmp_path, through_main=True)
