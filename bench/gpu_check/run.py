"""`bench/gpu_check.sh OUT_DIR`: everything one GPU machine should show, in one run of at most 6 min 20 s.

Environment; DALI's mixed-decode train pipeline alone without and with the hardware JPEG decoder; ResNet-50
training images/s (the preset: batch 256, bf16, channels_last) on synthetic data and on the DALI loader, eager and
then under torch.compile; a bf16 run whose loss must come down; a non-finite fp16 step that must be skipped and
leave the model bit for bit as it was; train steps with EMA that must not make the host wait for the GPU; what
SyncBatchNorm costs a step; a deterministic checkpoint resume that must match an uninterrupted run bit for bit,
with a checkpoint of CPU tensors. `--parts` adds the optional ones: an fp16 run, the fast preset's projection, the
trainer compiled with DDP. Each part runs in its own process within its time box, on the real ImageNet samples of
../shared/datasets/imagenet-samples.tar (beside the repository) where that archive is, else on JPEGs generated at
the start: the images part says which. Writes OUT_DIR/gpu_check.json (every part's status and figures, the
targets), gpu_check.md (the same as a table) and gpu_check.log, after every part; exits 1 if any part failed.
Parts the budget or the hard cap cut are `skipped`, a compile its box cut `partial`, not failed. Targets are
reported, not enforced.

`--cpu-smoke` runs the same code at tiny sizes on the CPU (DALI CPU, ResNet-20), the optional parts too; parts
that need CUDA are skipped. Without nvidia-dali (the device image's case) the parts that read through DALI are
skipped, not failed, and the rest run. This module only imports the standard library, so that a missing package is
reported, not a traceback.
"""
import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.gpu_check.report import STATUSES, headline, tally, targets, write_report

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
"""The interpreter each part runs in."""
# The Python distributions behind each import, for the message when one is missing (no network on GPU machines).
# nvidia-dali is not among them: the parts that read through DALI are skipped without it (NEEDS).
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "omegaconf": "omegaconf", "tqdm": "tqdm",
            "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml"}
NEEDS = {"cuda": "no CUDA",
         "dali": "nvidia-dali is not installed (the device image has no DALI and its 476 MB wheel cannot be carried)"}
"""What a part may need beyond REQUIRED, and why a run without it skips the part."""

@dataclass(frozen=True)
class Part:
    name: str
    box_s: float
    """Most seconds it may take on a GPU machine, its process start included; killed after that. Running past its
    box fails a part, but a compiling part that had not finished compiling is `partial`, with its eager figures:
    Inductor's compile time is the host CPU's and its cache's, not the GPU's."""
    estimate_s: float
    """What it should take there, process start included (the arithmetic is beside PARTS); the box is at least
    BOX_MARGIN times this."""
    what: str
    check: str
    """`module:function` that runs it: takes a bench.gpu_check.context.Context, returns Passed (figures and headline)
    or raises CheckFailed. Named, not imported: this module imports only the standard library."""
    needs: tuple = ()
    """Of NEEDS: a run without one of them skips the part (a --cpu-smoke run has no CUDA)."""
    needs_images: bool = False
    compiles: bool = False
    """Runs torch.compile, after what it measures eager; it runs after the parts that do not compile."""
    optional: bool = False
    """Left out of a GPU run unless --parts names it, so that the rest fits the budget; --cpu-smoke runs it."""


# The estimates are for one H100/H200 on a 16-core host, none of them measured there yet; gpu_check.md puts the real
# seconds next to them. Their parts, in seconds:
#   start  5: interpreter and imports (torch, DALI, the project) 2.5, as measured on the 2-core CPU VM this was
#             written on (python -X importtime), then the CUDA context and cuDNN/cuBLAS handles 2.5; the first part
#             5 more, on a page cache still cold from the machine's start
#   build  1.5 a Trainer (model to the device, optimizer, run dir); 3 a DALI mixed train pipeline (16 threads'
#             nvJPEG buffers: 3.4 GB of device and 4.5 GB of pinned memory), 1.5 once DALI's pools hold them;
#             2 a val pipeline
#   tune   4: cuDNN's benchmark over ResNet-50's convolutions at 224 px and batch 256, 2 at 64 px and batch 32
#   step   85 ms: ResNet-50, batch 256, bf16, channels_last, eager (~3,000 img/s); 70 ms compiled; 25 ms at 64 px
#             and batch 32 (launch-bound)
#   end    a Trainer's final validation (its pipeline and a few batches) and checkpoint (~200 MB, 1 s)
#   compile 60: Inductor's first compile of ResNet-50's train step with 16 compile workers; 12 from its on-disk
#             caches (FX graph, AOTAutograd, Triton), as train_dali finds them after train_synthetic
# Correctness first, the compiles last. fp16, fast_preset and compile_ddp are optional: with them the boxes would
# pass the 7 minutes a device call can give the check, and they are the least informative for a first run: the
# preset trains in bf16 (bf16 learns, fp16_skip checks GradScaler's skip on the GPU); fast_preset projects a
# schedule rather than checking the service; compile_ddp's DDP wiring is tested on the CPU (aot_eager) and NCCL
# with DDP runs in syncbn, and its own cold compile would need a box of 68 s.
PARTS = (
    # start 5 + cold page cache 5 + nvidia-smi, DALI and torchvision imports 1
    Part("env", 17, 11, "GPU, driver, CUDA, cuDNN, NCCL, torch, DALI versions", "bench.gpu_check.env:check_env"),
    # start 2.5 (no CUDA) + 1,228 JPEGs at 13 ms each (measured here) in 8 processes 2 + demo set 1 + links 0.5;
    # extracting the real samples instead: 2
    Part("images", 12, 7, "the real ImageNet samples (../shared/datasets/) or generated JPEGs (bench.images), "
         "hard-linked into a big split; demo set", "bench.gpu_check.images:check_images"),
    # start 5 + 2 x (pipeline 3 + 3 warm-up batches 1 + 20 batches of 256 at >= 2,500 img/s 2) = 17
    Part("loader", 26, 17, "DALI train pipeline alone, images/s at hw_decoder_load 0 and at the preset's: whether "
         "the hardware decoder serves the random-crop decode", "bench.gpu_check.throughput:check_loader",
         needs=("dali",), needs_images=True),
    # start 5 + Trainer 1.5 + pipeline 3 + tune 2 + 30 steps 0.75 + end (val pipeline 2, 32 images, checkpoint 1)
    Part("fp16", 24, 16, "fp16 + GradScaler run on the demo set: the loss must come down",
         "bench.gpu_check.numerics:check_fp16", needs=("cuda", "dali"), needs_images=True, optional=True),
    Part("bf16", 24, 16, "bf16 run on the demo set: the loss must come down",
         "bench.gpu_check.numerics:check_bf16", needs=("dali",), needs_images=True),
    # start 5 + Trainer 1.5 + tune 2 + 9 steps 0.25 + copies and comparison 0.5
    Part("fp16_skip", 15, 10, "an fp16 step on an inf batch: skipped, counted, the model bitwise as before",
         "bench.gpu_check.step:check_fp16_skip", needs=("cuda",)),
    # start 5 + Trainer 1.5 + pipeline 3 + 16 batches 0.5 + tune 2 + 16 steps with EMA 0.5 + slack 0.5
    Part("sync_free", 20, 13, "train steps with EMA that neither log nor check for a stop, under sync debug mode "
         "\"error\": no host sync, loader and trainer", "bench.gpu_check.step:check_sync_free", needs=("cuda", "dali"),
         needs_images=True),
    # start 5 + NCCL 2 + 2 models 1 + tune 4 + 2 x (3 + 1 + 10 steps at ~90 ms) 2.8 + layer check 0.5 + slack 0.7
    Part("syncbn", 24, 16, "what train.sync_bn costs a ResNet-50 step (its synchronizing path forced in a 1-rank "
         "NCCL group, DDP), against BN; its kernels against BatchNorm2d", "bench.gpu_check.syncbn:check_syncbn",
         needs=("cuda",)),
    # start 5 + 3 Trainers x (1.5 + pipeline 3, 1.5, 1.5 + 4-8 steps 0.2 + end 3.1) + resume's load 1 + compare 1.5
    Part("resume", 42, 28, "N steps vs N/2 + resume + N/2, deterministic, compared bitwise; CPU tensors saved",
         "bench.gpu_check.resume:check_resume", needs=("dali",), needs_images=True),
    # start 5 + 2 sides x (Trainer 1.5 + tune 3 + 25 steps at ~55 ms 1.4 + synthetic val 0.5 + checkpoint 1)
    Part("fast_preset", 30, 20, "Trainer images/s at each train side of configs/resnet50_imagenet_fast.yaml; its 16 "
         "and 32 epochs projected to 8 GPUs, beside FFCV's 8 x A100 minutes",
         "bench.gpu_check.fast_preset:check_fast_preset", optional=True),
    # eager: start 5 + Trainer 1.5 + tune 4 + 25 steps 2.1 + synthetic val 0.75 + checkpoint 1 = 14.4;
    # compiled: Trainer 1.5 + compile 60 + 25 steps 1.75 + val 0.75 + checkpoint 1 = 65
    Part("train_synthetic", 120, 80, "Trainer images/s on synthetic data (the model's ceiling), eager, then under "
         "torch.compile (Inductor's first compile)", "bench.gpu_check.throughput:check_train_synthetic",
         compiles=True),
    # eager: start 5 + Trainer 1.5 + pipeline 3 + tune 4 + 25 steps 2.1 + end 3.3 = 18.9;
    # compiled: Trainer 1.5 + pipeline 1.5 + compile 12 + 25 steps 1.75 + end 3.3 = 20
    Part("train_dali", 59, 39, "Trainer images/s on the DALI loader, eager, then under torch.compile (from Inductor's "
         "cache)", "bench.gpu_check.throughput:check_train_dali", needs=("dali",), needs_images=True,
         compiles=True),
    # start 5 + NCCL 2 + Trainer 1.5 + Inductor's first compile of ResNet-18 at 64 px, cut by DDPOptimizer, 35 +
    # 8 steps 0.3 + end 1
    Part("compile_ddp", 68, 45, "the trainer compiled with DDP (DDPOptimizer) on a 1-rank NCCL group, grad_accum 2",
         "bench.gpu_check.step:check_compile_ddp", needs=("cuda",), compiles=True, optional=True),
)
BOX_MARGIN = 1.5
"""Every box is at least this many times its estimate."""
BUDGET_S = 360.0
"""The boxes of a GPU run's parts together (the optional ones left out): 359 s."""
HARD_CAP_S = 380.0
"""bench/gpu_check.sh's cap on the whole script: SIGTERM 10 s before it (this runner then stops the running part and
writes the report), SIGKILL at it. The 10 s between the budget and the SIGTERM are the runner's own. 6 min 20 s, so
that a device call of 7 minutes has 40 s left to install the wheels it carries (docs/performance.md)."""
assert all(p.box_s >= BOX_MARGIN * p.estimate_s for p in PARTS), f"every box must be {BOX_MARGIN} x its estimate"
assert sum(p.box_s for p in PARTS if not p.optional) <= BUDGET_S, "the parts' time boxes must fit the budget"
assert [p.compiles for p in PARTS] == sorted(p.compiles for p in PARTS), "the compiling parts come last"
assert all(set(p.needs) <= set(NEEDS) for p in PARTS), "a part needs only what NEEDS names"
MIN_START_S = 5.0
"""A part is not started with less than this left of the budget."""
CPU_SMOKE_BOX_FACTOR = 4.0
"""--cpu-smoke's --box-factor: a loaded 2-core CPU imports and builds slower than a GPU host, and there the boxes
only guard against hangs. The budget and the cap stay."""


class HardCap(Exception):
    """SIGTERM from bench/gpu_check.sh's timeout: the script's hard cap is near."""


def _on_sigterm(signum, frame):
    raise HardCap()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (the `nvidia` of nvidia.dali) is missing
        return False


def missing_modules() -> list:
    return [f"{module} ({dist})" for module, dist in REQUIRED.items() if not _importable(module)]


def lacking(mode: str) -> list:
    """The NEEDS this run cannot meet. Only whether DALI is installed is asked: one that is there but does not
    import fails the parts that use it, with the traceback in the log."""
    return [need for need, missing in (("cuda", mode == "cpu-smoke"), ("dali", not _importable("nvidia.dali")))
            if missing]


def _measured(partial_file: Path) -> dict:
    """What a killed part had recorded (Context.record), if anything."""
    try:
        return json.loads(partial_file.read_text())
    except (OSError, ValueError):
        return {}


def run_part(part: Part, mode: str, work: Path, log, box_s: float, budget_s: float) -> dict:
    """Runs one part in its own process group, killed as a whole if it outlasts `box_s`: its own time box, or
    what was left of the budget when that was less. A killed part's result keeps what it had measured."""
    result_file = work / "results" / f"{part.name}.json"
    progress_file, partial_file = result_file.with_suffix(".progress"), result_file.with_suffix(".partial.json")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    for stale in (result_file, progress_file, partial_file):  # an earlier run's, in a --work folder used again
        stale.unlink(missing_ok=True)
    log.write(f"\n===== {part.name}: {part.what} (time box {box_s:.0f} s) =====\n".encode())
    log.flush()
    command = [PYTHON, "-m", "bench.gpu_check.part", "--part", part.name, "--mode", mode,
               "--work", str(work), "--result", str(result_file)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        seconds = round(time.perf_counter() - start, 1)
        measured = _measured(partial_file)
        if box_s < part.box_s:
            return {**measured, "status": "skipped", "reason": f"cut by the {budget_s:.0f} s budget after "
                    f"{seconds:.0f} s of its {part.box_s:.0f} s time box", "seconds": seconds}
        progress = progress_file.read_text().strip() if progress_file.is_file() else ""
        if part.compiles and progress == "compiling":
            # The progress file was last written when the compile began.
            compile_s = round(time.time() - progress_file.stat().st_mtime, 1)
            return {**measured, "status": "partial", "reason": f"{measured.get('headline', 'nothing measured')}; "
                    f"torch.compile had not finished {compile_s:.0f} s after the compiled run began, at the part's "
                    f"time box of {box_s:.0f} s (compile time is the host CPU's and Inductor's cache's, not the GPU's)",
                    "compile_s_at_least": compile_s, "seconds": seconds}
        return {**measured, "status": "fail", "reason": f"did not finish within its time box of {box_s:.0f} s"
                + (f" (it had reached: {progress})" if progress else ""), "seconds": seconds}
    except BaseException:  # the hard cap's SIGTERM, Ctrl-C: the part's process group goes too
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if not result_file.is_file():
        return {"status": "fail", "reason": f"the part's process exited {process.returncode} without a result "
                f"(see gpu_check.log)", "seconds": round(time.perf_counter() - start, 1)}
    result = json.loads(result_file.read_text())
    # What counts against the box: the process's start (imports, CUDA context) as well as the check itself.
    result["check_s"], result["seconds"] = result.get("seconds"), round(time.perf_counter() - start, 1)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="gpu_check.json and gpu_check.log go here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU; CUDA parts are skipped")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="wall-clock budget of all parts together; parts it cuts are skipped")
    parser.add_argument("--box-factor", type=float,
                        help=f"multiply every part's time box, on a slower host (default 1, {CPU_SMOKE_BOX_FACTOR:g} "
                             f"with --cpu-smoke)")
    parser.add_argument("--parts", help="comma-separated subset of: " + ", ".join(p.name for p in PARTS) + " (by "
                        "default all but the optional " + ", ".join(p.name for p in PARTS if p.optional) + " on a GPU)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    box_factor = args.box_factor or (CPU_SMOKE_BOX_FACTOR if args.cpu_smoke else 1.0)
    chosen = set(args.parts.split(",")) if args.parts else {p.name for p in PARTS if args.cpu_smoke or not p.optional}
    unknown = chosen - {p.name for p in PARTS}
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)

    started, start = time.strftime("%Y-%m-%d %H:%M:%S"), time.monotonic()
    deadline = start + args.budget_s
    parts, missing, lacks = {}, missing_modules(), lacking(mode)

    def report(complete: bool) -> dict:
        counts = {s: sum(p["status"] == s for p in parts.values()) for s in STATUSES}
        return {"tool": "bench/gpu_check.sh", "mode": mode, "started": started, "complete": complete,
                "elapsed_s": round(time.monotonic() - start, 1), "budget_s": args.budget_s,
                "ok": counts["fail"] == 0, "counts": counts, "env": parts.get("env", {}), "parts": parts,
                "time_boxes_s": {p.name: p.box_s * box_factor for p in PARTS if p.name in chosen},
                "estimates_s": {p.name: p.estimate_s for p in PARTS if p.name in chosen},
                "left_out": [p.name for p in PARTS if p.name not in chosen],
                "targets": targets(parts, mode), "missing_packages": missing, "lacks": lacks}

    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with open(args.out_dir / "gpu_check.log", "wb") as log:
            for part in PARTS:
                if part.name not in chosen:
                    continue
                left = deadline - time.monotonic()
                if missing:
                    parts[part.name] = {"status": "fail", "reason": "missing Python packages: " + ", ".join(missing)}
                elif unmet := [need for need in part.needs if need in lacks]:
                    parts[part.name] = {"status": "skipped", "reason": "; ".join(NEEDS[need] for need in unmet)}
                elif parts.get("env", {}).get("status") == "fail":
                    parts[part.name] = {"status": "fail", "reason": "the environment check failed"}
                elif part.needs_images and parts.get("images", {}).get("status") != "pass":
                    parts[part.name] = {"status": "fail", "reason": "needs the images (part images)"}
                elif left < MIN_START_S:
                    parts[part.name] = {"status": "skipped", "reason": f"not started: the {args.budget_s:.0f} s "
                                        f"budget was spent"}
                else:
                    part, part_start = replace(part, box_s=part.box_s * box_factor), time.monotonic()
                    try:
                        parts[part.name] = run_part(part, mode, work, log, min(part.box_s, left), args.budget_s)
                    except HardCap:
                        parts[part.name] = {"status": "skipped", "reason": f"stopped by the script's hard cap of "
                                            f"{HARD_CAP_S:.0f} s (SIGTERM)",
                                            "seconds": round(time.monotonic() - part_start, 1)}
                        print(f"{part.name:<26} skipped: the hard cap", flush=True)
                        break
                print(f"{part.name:<26} {parts[part.name]['status']:<8} {parts[part.name].get('seconds', 0):>6.1f} s  "
                      f"{headline(parts[part.name])}", flush=True)
                write_report(args.out_dir, report(complete=False))
    except HardCap:  # between parts
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    for part in PARTS:
        if part.name in chosen and part.name not in parts:
            parts[part.name] = {"status": "skipped", "reason": f"not started: the script's hard cap of "
                                f"{HARD_CAP_S:.0f} s was reached"}

    final = report(complete=True)
    write_report(args.out_dir, final)
    t, counts = final["targets"], final["counts"]
    if t["applies"]:
        for key in ("train_img_per_s_with_dali", "loader_alone_img_per_s"):
            measured = t[key]["measured"]
            print(f"target {key}: {measured and round(measured)} vs {t[key]['target']:.0f} "
                  f"({'met' if t[key]['met'] else 'NOT met'})")
    print(f"{tally(counts)} in {final['elapsed_s']:.0f} s; report {args.out_dir / 'gpu_check.json'}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if final["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
