"""Ctrl-C: exit status 130, one line saying how to resume, and a rerun that finishes the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from meshseg.models.meshnet import MeshNet, MeshNetConfig
from meshseg.models.weights import save_checkpoint
from tests.test_fuzz import nifti_bytes, valid_image

REPO = Path(__file__).resolve().parents[1]
SCANS = 12


def test_sigint_exits_130_and_a_rerun_resumes(tmp_path):
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
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, text=True)
    deadline = time.monotonic() + 300
    while not list(folder.glob("*_lesion.nii.gz")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "meshseg: interrupted; rerun the same command to resume (finished outputs are kept)")
    done = len(list(folder.glob("*_lesion.nii.gz")))
    assert 1 <= done < SCANS
    assert not [p for p in folder.iterdir() if ".part" in p.name]
    rerun = subprocess.run(command + ["-q"], capture_output=True, env=env, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(folder.glob("*_lesion.nii.gz"))) == SCANS
