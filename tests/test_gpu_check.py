"""bench/gpu_check.sh --cpu-smoke: the GPU check's own code paths at tiny sizes on the CPU, as CI can run them."""
import json
import os
import subprocess
import sys

import pytest

from bench.gpu_check import run as gpu_check
from tests.helpers import ROOT

CPU_PARTS = {"env", "images", "loader", "train_synthetic", "train_dali", "bf16", "resume"}
CUDA_PARTS = {"fp16", "syncbn", "train_synthetic_compiled", "train_dali_compiled"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(out)],
                            check=False, env=env, capture_output=True, text=True, timeout=300)
    return result, json.loads((out / "gpu_check.json").read_text()), out


@pytest.mark.slow
def test_smoke_exits_zero_and_reports_every_part(smoke):
    result, report, out = smoke
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["mode"] == "cpu-smoke" and report["ok"] is True
    assert set(report["parts"]) == CPU_PARTS | CUDA_PARTS
    assert report["counts"] == {"pass": len(CPU_PARTS), "fail": 0, "skipped": len(CUDA_PARTS)}
    assert all(report["parts"][name] == {"status": "skipped", "reason": "no CUDA"} for name in CUDA_PARTS)
    assert "7 passed, 0 failed, 4 skipped" in result.stdout
    assert "===== resume" in (out / "gpu_check.log").read_text()
    table = (out / "gpu_check.md").read_text()
    assert "7 passed, 0 failed, 4 skipped" in table
    assert all(f"| {name} | " in table for name in CPU_PARTS | CUDA_PARTS)


@pytest.mark.slow
def test_cpu_parts_carry_their_figures(smoke):
    _, report, _ = smoke
    parts = report["parts"]
    assert report["env"]["cuda_available"] is False and report["env"]["dali"]
    assert parts["images"]["train_images"] == 2 * parts["images"]["unique_train_images"]
    (run,) = parts["loader"]["runs"]
    assert run["decoder"] == "cpu" and run["img_per_s"] > 0 and run["batches"] > 0
    for name, backend in (("train_synthetic", "synthetic"), ("train_dali", "dali")):
        assert parts[name]["backend"] == backend and parts[name]["img_per_s"] > 0 and parts[name]["measured_steps"] > 0
    assert parts["bf16"]["loss_last3"] < parts["bf16"]["loss_first3"]
    resume = parts["resume"]
    assert resume["resumed_at"] == resume["steps"] // 2 and resume["differences"] == []
    assert resume["train_losses_equal"] is True and resume["tensors_compared"] > 0


@pytest.mark.slow
def test_targets_are_reported_but_do_not_apply_off_a_gpu(smoke):
    _, report, _ = smoke
    targets = report["targets"]
    assert targets["applies"] is False
    assert targets["train_img_per_s_with_dali"]["target"] == 4000
    assert targets["train_img_per_s_with_dali"]["measured"] == report["parts"]["train_dali"]["img_per_s"]
    assert targets["loader_alone_img_per_s"]["target"] == 6000
    assert targets["train_img_per_s_with_dali"]["met"] is False and targets["loader_alone_img_per_s"]["met"] is False
    assert targets["dali_over_synthetic_eager"] > 0


@pytest.mark.slow
def test_gpu_mode_without_a_gpu_fails_with_a_clear_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--parts", "env,loader", str(tmp_path)],
                            check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "gpu" and report["ok"] is False
    assert "no CUDA device" in report["parts"]["env"]["reason"] and "--cpu-smoke" in report["parts"]["env"]["reason"]
    assert report["parts"]["loader"] == {"status": "fail", "reason": "the environment check failed"}


def test_missing_packages_fail_every_part_and_name_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_check.REQUIRED, "nvidia_missing.dali", "nvidia-missing-wheel")
    assert gpu_check.main(["--cpu-smoke", "--parts", "env,images", "--work", str(tmp_path / "work"),
                           str(tmp_path / "out")]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["missing_packages"] == ["nvidia_missing.dali (nvidia-missing-wheel)"]
    assert {p["status"] for p in report["parts"].values()} == {"fail"}
    assert "nvidia-missing-wheel" in report["parts"]["images"]["reason"]
