"""benchmarks/device_check.py without a GPU: its arguments, its refusal, and a CPU dry run."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import head

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(check):
    args = check.parse_args([])
    assert (args.device, args.precisions, args.forward_side) == ("cuda", ["fp32", "fp16", "bf16"],
                                                                 256)
    with pytest.raises(SystemExit):
        check.parse_args(["--precisions", "fp32,int8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_with_one_line(check, capsys):
    assert check.main(["--out", "unused"]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_cpu_dry_run_writes_the_summary(check, write_nifti, threshold_model, tmp_path):
    scan = write_nifti(head()[0])
    assert check.main(["--device", "cpu", "--scans", str(scan), "--model", threshold_model,
                       "--precisions", "fp32", "--forward-side", "20", "--skip-train",
                       "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "device_check.json").read_text())
    step = summary["predict"]["predict-fp32"]
    assert step["status"] == 0 and step["masks"][0]["dice"] == 1.0
    assert summary["forward"]["layers_fp32"]["max_abs_diff"] < 1e-3
    assert "| predict-fp32 | 0 |" in (tmp_path / "out" / "device_check.md").read_text()


def test_gpu_training_script_parses_and_needs_an_output_folder():
    """benchmarks/gpu_train.sh (run only where a GPU is lent): valid bash, and without
    arguments it stops with its usage before doing anything."""
    import subprocess

    script = SCRIPT.with_name("gpu_train.sh")
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode != 0 and "usage: gpu_train.sh OUT" in done.stderr
