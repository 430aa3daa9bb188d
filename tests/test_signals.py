"""Ctrl-C and SIGTERM: exit status 130 or 143, one line saying how to resume, nothing
half-written, and a rerun that finishes the job.

The child starts with the default disposition of both signals (a shell that starts a job in
the background, or a CI runner, may hand it SIGINT ignored, and Python then never raises
KeyboardInterrupt), and is signalled once its first record exists (records are written last),
not after a guessed delay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import save_checkpoint
from tests.test_fuzz import nifti_bytes, valid_image

REPO = Path(__file__).resolve().parents[1]
SCANS = 12


def default_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as a fresh process has them."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


@pytest.mark.parametrize(("number", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated")])
def test_a_signal_exits_with_its_code_and_a_rerun_resumes(tmp_path, number, code, word):
    torch.manual_seed(0)
    model = tmp_path / "tiny.safetensors"
    save_checkpoint(model, MeshNet(MeshNetConfig(channels=2, dilations=(1,))).eval())
    folder = tmp_path / "scans"
    folder.mkdir()
    scan = nifti_bytes(valid_image())
    for index in range(SCANS):
        (folder / f"s{index:02d}.nii").write_bytes(scan)
    command = [sys.executable, "-m", "meshseg", "predict", str(folder), "-m", str(model),
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 300
    while not list(folder.glob("*_lesion.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"meshseg: {word}; rerun the same command to resume (finished outputs are kept)")
    done = len(list(folder.glob("*_lesion.nii.gz")))
    assert 1 <= done < SCANS
    assert not [p for p in folder.iterdir() if ".part" in p.name]
    rerun = subprocess.run(command + ["-q"], capture_output=True, env=env, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(folder.glob("*_lesion.nii.gz"))) == SCANS
