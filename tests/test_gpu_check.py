"""bench/gpu_check.sh --cpu-smoke: the GPU check's own code paths at tiny sizes on the CPU, as CI can run them;
its time boxes, budget and hard cap; and the CUDA-only parts' code on the CPU, where their mechanism runs there."""
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from bench.gpu_check import context, fast_preset, step, syncbn, throughput
from bench.gpu_check import images as images_part
from bench.gpu_check import part as part_module
from bench.gpu_check import run as gpu_check
from bench.gpu_check.context import CheckFailed, Context
from bench.gpu_check.images import check_images
from bench.images import SAMPLES_ARCHIVE
from data import dali
from data.folder import list_split
from tests.helpers import ROOT, shared_dataset
from trainer.models import build_model
from trainer.optim import EMA

CPU_PARTS = {"env", "images", "loader", "train_synthetic", "train_dali", "fast_preset", "bf16", "resume"}
CUDA_PARTS = {"fp16", "fp16_skip", "sync_free", "syncbn", "compile_ddp"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(out)],
                            check=False, env=env, capture_output=True, text=True, timeout=420)  # past its 380 s cap
    return result, json.loads((out / "gpu_check.json").read_text()), out


@pytest.mark.slow
def test_smoke_exits_zero_and_reports_every_part(smoke):
    result, report, out = smoke
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["mode"] == "cpu-smoke" and report["ok"] is True
    assert set(report["parts"]) == CPU_PARTS | CUDA_PARTS
    assert report["counts"] == {"pass": len(CPU_PARTS), "fail": 0, "skipped": len(CUDA_PARTS), "partial": 0}
    assert all(report["parts"][name] == {"status": "skipped", "reason": "no CUDA"} for name in CUDA_PARTS)
    counts = f"{len(CPU_PARTS)} passed, 0 failed, {len(CUDA_PARTS)} skipped, 0 partial"
    assert counts in result.stdout
    assert "===== resume" in (out / "gpu_check.log").read_text()
    table = (out / "gpu_check.md").read_text()
    assert counts in table and "so far" not in table
    assert all(f"| {name} | " in table for name in CPU_PARTS | CUDA_PARTS)
    assert report["complete"] is True and report["left_out"] == []  # the optional parts too, on the CPU
    assert report["time_boxes_s"]["resume"] == 42 * gpu_check.CPU_SMOKE_BOX_FACTOR


@pytest.mark.slow
def test_cpu_parts_carry_their_figures(smoke):
    _, report, _ = smoke
    parts = report["parts"]
    assert report["env"]["cuda_available"] is False and report["env"]["dali"]
    assert parts["images"]["train_images"] == 2 * parts["images"]["unique_train_images"]
    assert parts["images"]["source"] == ("imagenet-samples" if SAMPLES_ARCHIVE.is_file() else "generated")
    (run,) = parts["loader"]["runs"]
    assert run["decoder"] == "cpu" and run["img_per_s"] > 0 and run["batches"] > 0
    for name, backend in (("train_synthetic", "synthetic"), ("train_dali", "dali")):
        eager = parts[name]["eager"]
        assert parts[name]["backend"] == backend and eager["img_per_s"] > 0 and eager["measured_steps"] > 0
        assert "skipped" in parts[name]["compiled"]  # Inductor compiles on a GPU host only
    assert parts["bf16"]["loss_last3"] < parts["bf16"]["loss_first3"]
    assert parts["bf16"]["epochs_completed"] == 0  # no epoch-end checkpoint or pipeline rebuild
    resume = parts["resume"]
    assert resume["resumed_at"] == resume["steps"] // 2 and resume["differences"] == []
    assert resume["train_losses_equal"] is True and resume["tensors_compared"] > 0
    assert resume["deterministic"] is True and resume["checkpoint_tensors"] > resume["tensors_compared"]
    assert resume["checkpoint_tensors_off_cpu"] == []
    fast = parts["fast_preset"]
    assert fast["epoch_sides"]["16"] == [160] * 12 + [192] * 4 and fast["epoch_sides"]["32"] == [160] * 25 + [192] * 7
    assert len(fast["train_img_per_s"]) == 2 and all(rate > 0 for rate in fast["train_img_per_s"].values())
    assert 0 < fast["projected_minutes"]["16"] < fast["projected_minutes"]["32"]


def test_the_fast_preset_projection_prices_each_epoch_at_its_side():
    rates = {160: 2000.0, 192: 1000.0}
    one_160 = fast_preset.projected_minutes([160], rates, val_side=192, flip=False)
    one_192 = fast_preset.projected_minutes([192], rates, val_side=192, flip=False)
    val = fast_preset.VAL_IMAGES / (1000.0 / fast_preset.VAL_COST)
    scale = fast_preset.GPUS * fast_preset.SCALING * 60
    assert one_192 == pytest.approx((fast_preset.TRAIN_IMAGES / 1000.0 + val) / scale)
    assert one_160 == pytest.approx((fast_preset.TRAIN_IMAGES / 2000.0 + val) / scale)
    assert fast_preset.projected_minutes([160, 192], rates, 192, flip=True) > one_160 + one_192


@pytest.mark.slow
def test_targets_are_reported_but_do_not_apply_off_a_gpu(smoke):
    _, report, _ = smoke
    targets = report["targets"]
    assert targets["applies"] is False
    assert targets["train_img_per_s_with_dali"]["target"] == 4000
    assert targets["train_img_per_s_with_dali"]["measured"] == report["parts"]["train_dali"]["eager"]["img_per_s"]
    assert targets["train_img_per_s_with_dali"]["from"] == "eager"
    assert targets["loader_alone_img_per_s"]["target"] == 6000
    assert targets["train_img_per_s_with_dali"]["met"] is False and targets["loader_alone_img_per_s"]["met"] is False
    assert targets["dali_over_synthetic_eager"] > 0


@pytest.mark.slow
def test_gpu_mode_without_a_gpu_fails_with_a_clear_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    # The boxes are a GPU host's; this one is slower to start a part.
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--parts", "env,loader", "--box-factor",
                             "4", str(tmp_path)],
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


@pytest.mark.slow
def test_without_dali_its_parts_are_skipped_and_the_torch_parts_still_run(tmp_path):
    # The device image's case: no nvidia-dali at all. A package `nvidia` first on the path, without dali in it,
    # hides the installed one as its absence would.
    hide = tmp_path / "no_dali"
    (hide / "nvidia").mkdir(parents=True)
    (hide / "nvidia" / "__init__.py").write_text("")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import nvidia.dali"], env=env, capture_output=True, text=True)
    assert probe.returncode == 1 and "ModuleNotFoundError: No module named 'nvidia.dali'" in probe.stderr
    dali_parts = ["loader", "bf16", "resume", "train_dali"]
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", "--parts",
                             ",".join(["env", "fp16_skip", "train_synthetic", *dali_parts]), str(tmp_path / "out")],
                            check=False, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] is True and report["lacks"] == ["cuda", "dali"] and report["missing_packages"] == []
    assert {name: r["status"] for name, r in report["parts"].items()} == {
        "env": "pass", "fp16_skip": "skipped", "train_synthetic": "pass", **{name: "skipped" for name in dali_parts}}
    assert report["parts"]["env"]["dali"] == "not installed"
    assert all(report["parts"][name]["reason"] == gpu_check.NEEDS["dali"] for name in dali_parts)
    assert report["parts"]["fp16_skip"]["reason"] == "no CUDA"
    assert "476 MB wheel cannot be carried" in result.stdout
    # Skipped before they start: the log has only the parts that ran.
    assert re.findall(r"===== (\w+):", (tmp_path / "out" / "gpu_check.log").read_text()) == ["env", "train_synthetic"]


def test_every_box_is_half_again_its_estimate_and_a_gpu_run_fits_a_seven_minute_device_call():
    assert all(p.box_s >= 1.5 * p.estimate_s for p in gpu_check.PARTS)
    assert sum(p.box_s for p in gpu_check.PARTS if not p.optional) <= gpu_check.BUDGET_S
    assert sum(p.box_s for p in gpu_check.PARTS if p.optional) <= gpu_check.BUDGET_S  # a second call runs them
    compiles = [p for p in gpu_check.PARTS if p.compiles]
    assert gpu_check.PARTS[-len(compiles):] == tuple(compiles)
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    cap = re.search(r"timeout --foreground --preserve-status --kill-after=(\d+) (\d+) ", script)
    kill_after, term_after = int(cap[1]), int(cap[2])
    assert term_after + kill_after == gpu_check.HARD_CAP_S
    assert gpu_check.BUDGET_S + 10 <= term_after  # the runner's own start and report fit before the SIGTERM
    assert gpu_check.HARD_CAP_S + 40 <= 7 * 60  # and 40 s to install the wheels the call carries


def test_a_gpu_run_leaves_the_optional_parts_out_unless_named(tmp_path, monkeypatch):
    # A missing package fails every chosen part at once, without starting a process: the choice is what is tested.
    monkeypatch.setitem(gpu_check.REQUIRED, "nvidia_missing.dali", "nvidia-missing-wheel")
    optional = [p.name for p in gpu_check.PARTS if p.optional]
    assert optional == ["fp16", "fast_preset", "compile_ddp"]
    gpu_check.main(["--work", str(tmp_path / "work"), str(tmp_path / "default")])
    gpu_check.main(["--parts", ",".join(optional), "--work", str(tmp_path / "work"), str(tmp_path / "named")])
    default, named = (json.loads((tmp_path / d / "gpu_check.json").read_text()) for d in ("default", "named"))
    assert set(default["parts"]) == {p.name for p in gpu_check.PARTS} - set(optional)
    assert default["left_out"] == optional and set(named["parts"]) == set(optional)
    assert "Not in this run (--parts runs them): fp16, fast_preset, compile_ddp." in (
        tmp_path / "default" / "gpu_check.md").read_text()


@pytest.mark.parametrize("sizes", [context.GPU, context.CPU_SMOKE], ids=["gpu", "cpu-smoke"])
def test_the_fp16_bf16_and_resume_runs_stay_within_the_demo_sets_first_epoch(sizes):
    assert sizes.short_steps * sizes.short_batch <= sizes.demo.classes * sizes.demo.train_per_class
    assert sizes.resume_steps * sizes.resume_batch <= sizes.demo.classes * sizes.demo.train_per_class


REAL_SAMPLES = 1000


@pytest.mark.parametrize("sizes", [context.GPU, context.CPU_SMOKE], ids=["gpu", "cpu-smoke"])
@pytest.mark.parametrize("unique", ["generated", "imagenet-samples"])
def test_one_epoch_of_the_images_outlasts_the_loader_and_throughput_measurements(sizes, unique):
    # The real samples have 1000 classes of one file: on a GPU, fewer distinct images than the generator's 1024.
    distinct = sizes.unique_images if unique == "generated" else min(sizes.unique_images, REAL_SAMPLES)
    batches = distinct * sizes.copies // sizes.batch
    assert batches >= sizes.loader_warmup + sizes.loader_batches
    assert batches >= sizes.train_warmup + sizes.train_steps


def fake_part_process(tmp_path, monkeypatch, script: str) -> None:
    """The parts' processes run `script` (sh), with $RESULT their result file, instead of Python."""
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(f'#!/bin/sh\nRESULT="${{10}}"\n{script}\n')  # ... --result RESULT: the 10th argument
    fake_python.chmod(0o755)
    monkeypatch.setattr(gpu_check, "PYTHON", str(fake_python))


@pytest.fixture
def stuck_part(tmp_path, monkeypatch):
    """A part whose process never finishes."""
    fake_part_process(tmp_path, monkeypatch, "exec sleep 60")
    return gpu_check.Part("stuck", 1, 0.5, "never finishes", "bench.gpu_check.env:check_env")


def test_a_part_past_its_box_fails_but_one_the_budget_cut_is_skipped(stuck_part, tmp_path):
    with open(tmp_path / "log", "wb") as log:
        own_box = gpu_check.run_part(stuck_part, "gpu", tmp_path, log, box_s=1, budget_s=330)
        budget_cut = gpu_check.run_part(dataclasses.replace(stuck_part, box_s=30), "gpu", tmp_path, log, box_s=1,
                                        budget_s=330)
    assert own_box["status"] == "fail" and own_box["reason"] == "did not finish within its time box of 1 s"
    assert budget_cut["status"] == "skipped"
    assert budget_cut["reason"].startswith("cut by the 330 s budget after 1 s of its 30 s time box")


def test_what_a_part_records_is_what_the_runner_reads_back(tmp_path):
    ctx = Context("gpu", tmp_path, partial_file=tmp_path / "part.partial.json")
    ctx.record(eager={"img_per_s": 2950.0}, headline="eager")
    ctx.record(headline="eager 2950 img/s")
    assert gpu_check._measured(tmp_path / "part.partial.json") == {"eager": {"img_per_s": 2950.0},
                                                                   "headline": "eager 2950 img/s"}


def test_a_compiling_part_past_its_box_keeps_what_it_measured_and_says_how_long_it_compiled(stuck_part, tmp_path,
                                                                                            monkeypatch):
    part = dataclasses.replace(stuck_part, compiles=True)
    measured = json.dumps({"eager": {"img_per_s": 2950.0}, "headline": "eager 2950 img/s"})

    def killed_at(phase: str) -> dict:
        # What the part's Context writes: the eager figures, then the progress when the compiled run begins.
        fake_part_process(tmp_path, monkeypatch, f"""printf '%s' '{measured}' > "${{RESULT%.json}}.partial.json"
printf '{phase}\\n' > "${{RESULT%.json}}.progress"
exec sleep 60""")
        with open(tmp_path / "log", "ab") as log:
            return gpu_check.run_part(part, "gpu", tmp_path, log, box_s=2, budget_s=330)

    compiling, compiled = killed_at("compiling"), killed_at("compiled")
    assert compiling["status"] == "partial" and compiling["eager"] == {"img_per_s": 2950.0}
    assert 1 <= compiling["compile_s_at_least"] <= compiling["seconds"]
    assert re.fullmatch(r"eager 2950 img/s; torch.compile had not finished \d+ s after the compiled run began, at "
                        r"the part's time box of 2 s \(.*\)", compiling["reason"]), compiling["reason"]
    # Past the compile, running out of the box is the part's failure; its figures are still kept.
    assert compiled["status"] == "fail" and compiled["eager"] == {"img_per_s": 2950.0}
    assert compiled["reason"] == "did not finish within its time box of 2 s (it had reached: compiled)"


def crashing_compile(ctx: Context):
    """A train part whose compile raises after the eager run was recorded."""
    ctx.record(eager={"img_per_s": 2950.0}, headline="eager 2950 img/s")
    raise RuntimeError("Inductor: something went wrong\nBackendCompilerFailed: in the compile")


def test_a_part_that_raises_keeps_what_it_had_recorded(tmp_path, monkeypatch):
    crashing = gpu_check.Part("crashing", 5, 1, "compiles and crashes", "tests.test_gpu_check:crashing_compile")
    monkeypatch.setattr(part_module, "PARTS", (crashing,))
    result_file = tmp_path / "crashing.json"
    part_module.main(["--part", "crashing", "--mode", "gpu", "--work", str(tmp_path), "--result", str(result_file)])
    result = json.loads(result_file.read_text())
    assert result["status"] == "fail" and result["reason"] == "RuntimeError: BackendCompilerFailed: in the compile"
    assert result["eager"] == {"img_per_s": 2950.0}


def test_an_earlier_runs_result_in_the_work_folder_is_not_taken_for_this_ones(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "crash.json").write_text('{"status": "pass", "headline": "from yesterday"}')
    fake_part_process(tmp_path, monkeypatch, "exit 3")
    with open(tmp_path / "log", "wb") as log:
        result = gpu_check.run_part(gpu_check.Part("crash", 5, 1, "crashes", "bench.gpu_check.env:check_env"),
                                    "gpu", tmp_path, log, box_s=5, budget_s=330)
    assert result["status"] == "fail" and result["reason"].startswith("the part's process exited 3 without a result")


def test_on_a_gpu_the_loader_part_compares_no_hardware_decoding_with_the_presets_share(tmp_path, monkeypatch):
    loads = []

    def fake_rate(data_cfg, batch, device, warmup, batches, **_):
        loads.append(data_cfg.hw_decoder_load)
        return {"img_per_s": 4000.0 + 4000.0 * data_cfg.hw_decoder_load, "batches": batches}

    monkeypatch.setattr(throughput, "_loader_rate", fake_rate)
    passed = throughput.check_loader(Context("gpu", tmp_path, partial_file=tmp_path / "loader.partial.json"))
    assert loads == [0.0, 0.65] and passed.figures["default_hw_decoder_load"] == 0.65
    assert passed.figures["hw_decoder_speedup"] == pytest.approx(1.65)
    assert passed.headline == "mixed hw 0: 4000 img/s, mixed hw 0.65: 6600 img/s (x1.65 with the hardware decoder)"
    # Each run is kept as soon as it is measured, should the box run out during the next.
    assert len(json.loads((tmp_path / "loader.partial.json").read_text())["runs"]) == 2


def test_a_train_part_records_its_eager_figures_before_it_compiles(tmp_path, monkeypatch):
    partial = tmp_path / "train_synthetic.partial.json"
    ctx = Context("gpu", tmp_path, partial_file=partial)
    runs = []

    def fake_rate(ctx, backend, compiled):
        # What the runner would report, were the part killed now.
        runs.append((compiled, json.loads(partial.read_text()) if partial.is_file() else None))
        return {"img_per_s": 3000.0 if compiled else 2000.0, "data_wait": 0.0, "first_steps": 5,
                "first_steps_s": 60.0 if compiled else 4.0}

    monkeypatch.setattr(throughput, "trainer_rate", fake_rate)
    passed = throughput.check_train_synthetic(ctx)
    (_, before_eager), (_, before_compile) = runs
    assert [compiled for compiled, _ in runs] == [False, True] and before_eager is None
    assert before_compile["eager"]["img_per_s"] == 2000.0 and before_compile["headline"].startswith("eager 2000")
    assert passed.figures["compiled"]["img_per_s"] == 3000.0 and passed.figures["compiled_over_eager"] == 1.5
    assert passed.headline.startswith("eager 2000 img/s") and "; compiled 3000 img/s" in passed.headline


@pytest.mark.slow
def test_sigterm_stops_the_running_part_and_the_report_is_still_written(tmp_path):
    # What bench/gpu_check.sh's timeout sends at the hard cap.
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    runner = subprocess.Popen([sys.executable, "-m", "bench.gpu_check.run", "--cpu-smoke", "--parts",
                               "env,images,loader", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "===== images" not in ((out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""):
        assert time.monotonic() < deadline and runner.poll() is None, "the images part never started"
        time.sleep(0.1)
    runner.send_signal(signal.SIGTERM)
    stdout, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, stdout  # cut parts are skipped, not failed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] is True and report["parts"]["env"]["status"] == "pass"
    images = report["parts"]["images"]
    assert images["status"] == "skipped" and images["seconds"] >= 0
    assert images["reason"] == "stopped by the script's hard cap of 380 s (SIGTERM)"
    assert report["parts"]["loader"]["reason"] == "not started: the script's hard cap of 380 s was reached"
    assert "1 passed, 0 failed, 2 skipped, 0 partial" in stdout


@pytest.mark.slow
def test_fp16_skip_on_the_cpu(tmp_path):
    # torch runs fp16 autocast with a GradScaler on the CPU too; on a GPU the part checks the CUDA kernels.
    figures = step.check_fp16_skip(Context("cpu-smoke", tmp_path)).figures
    assert figures["skipped"] == 1 and figures["nonfinite_total_after"] == figures["nonfinite_total_before"] + 1
    assert figures["grad_scale_after"] < figures["grad_scale_before"]
    assert figures["changed"] == [] and figures["tensors_compared"] > 0


@pytest.fixture(scope="module")
def images_ctx(tmp_path_factory):
    ctx = Context("cpu-smoke", tmp_path_factory.mktemp("gpu_check_parts"))
    check_images(ctx)
    return ctx


def test_the_images_part_hard_links_the_real_samples_where_the_archive_is(images_ctx):
    shared_dataset("imagenet-samples.tar")  # skipped where absent
    train, val = list_split(str(images_ctx.images), "train"), list_split(str(images_ctx.images), "val")
    assert train.classes == val.classes and len(val) == len(val.classes) == context.CPU_SMOKE.unique_images
    assert len(train) == context.CPU_SMOKE.copies * len(val)
    # Links to the extracted files themselves: a link to train/'s relative symlink would point nowhere here.
    val_files = {os.stat(path).st_ino for path in val.paths()}
    assert all(not os.path.islink(path) and os.stat(path).st_ino in val_files for path in train.paths())


def test_without_the_archive_the_images_part_generates_them_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(images_part, "SAMPLES_ARCHIVE", tmp_path / "absent" / "imagenet-samples.tar")
    passed = check_images(Context("cpu-smoke", tmp_path / "work"))
    assert passed.figures["source"] == "generated" and "generated (bench.images; no " in passed.headline
    train = list_split(str(tmp_path / "work" / "images"), "train")
    assert len(train.classes) == 10 and len(train) == passed.figures["train_images"] >= 2 * 40


@pytest.mark.slow
def test_sync_free_names_where_the_loader_or_the_step_synced(images_ctx, monkeypatch):
    # The CPU has no sync debug mode: torch's error is raised by hand where a sync would be.
    figures = step.check_sync_free(images_ctx).figures
    assert figures["step_sync"] == figures["loader_sync"] == [] and figures["train_steps_checked"] == 2
    assert figures["ema_decay"] == step.EMA_DECAY > 0

    checking = []  # non-empty inside host_syncs' block, where torch's sync debug mode would be on
    unpatched = step.host_syncs

    @contextlib.contextmanager
    def host_syncs(device, mode):
        with unpatched(device, mode) as found:
            checking.append(mode)
            try:
                yield found
            finally:
                checking.pop()

    def syncing(function):
        def synced(*args):
            if checking == ["error"]:
                raise RuntimeError(step.SYNC_MESSAGE)
            return function(*args)
        return synced

    monkeypatch.setattr(step, "host_syncs", host_syncs)
    # The EMA update, as it synced before issue 29 (its lerp weight read back from the device), and the loader.
    monkeypatch.setattr(EMA, "update_parameters", syncing(EMA.update_parameters))
    monkeypatch.setattr(dali, "_to_torch", syncing(dali._to_torch))
    with pytest.raises(CheckFailed) as failed:
        step.check_sync_free(images_ctx)
    assert re.fullmatch(r"the train steps made the host wait for the GPU at tests/test_gpu_check.py:\d+ \(synced\) "
                        r"and the DALI loader made the host wait for the GPU at tests/test_gpu_check.py:\d+ "
                        r"\(synced\)", str(failed.value)), str(failed.value)
    assert failed.value.figures["step_sync"] and failed.value.figures["loader_sync"]


def test_the_syncbn_part_forces_every_layer_onto_the_synchronizing_path_in_a_one_rank_group(tmp_path, monkeypatch):
    # PyTorch's own SyncBatchNorm would fall back to plain BN here (world size 1); its kernels are CUDA-only, so the
    # synchronizing Function is stood in for, and what it is called with is the test.
    calls = []

    class Recorder:
        @staticmethod
        def apply(input, weight, bias, running_mean, running_var, eps, momentum, group, world_size):
            calls.append((group, world_size))
            return F.batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps)

    monkeypatch.setattr(syncbn, "SyncBatchNormFunction", Recorder)
    model = syncbn.sync_path_model(build_model("resnet20", num_classes=10))
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert layers and all(type(m) is syncbn.SyncPathBatchNorm for m in layers)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model(torch.randn(4, 3, 32, 32))
        assert calls == [(torch.distributed.group.WORLD, 1)] * len(layers)
        assert all(int(m.num_batches_tracked) == 1 for m in layers)
        model.eval()(torch.randn(4, 3, 32, 32))  # evaluation does not synchronize
        assert len(calls) == len(layers)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_compile_ddp_on_one_cpu_rank(tmp_path, monkeypatch):
    # aot_eager: Dynamo, DDPOptimizer and AOTAutograd as under Inductor, without its minutes of C++ compiles here.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    figures = step.check_compile_ddp(Context("cpu-smoke", tmp_path)).figures
    assert figures["wrappers"] == ["DistributedDataParallel", "OptimizedModule"] and figures["backend"] == "gloo"
    assert figures["graph_pieces"] and figures["steps"] == 2
