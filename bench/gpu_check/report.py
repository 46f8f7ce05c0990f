"""The GPU check's report: the targets against what was measured, gpu_check.json and gpu_check.md. Standard library
only, as bench.gpu_check.run."""
import json
from pathlib import Path

# One H200, ResNet-50 at batch 256 in bf16 + channels_last with the DALI loader (issue 6).
TARGET_TRAIN_IMG_PER_S = 4000.0
# The loader alone must outrun training by this much, so that it keeps up with room to spare.
TARGET_LOADER_OVER_TRAINING = 1.5

STATUSES = ("pass", "fail", "skipped", "partial")
"""A part's outcome; `partial`: a compiling part whose box ran out during the compile, with what it had measured
before it (the eager figures). Only `fail` fails the check."""


def _rate(parts: dict, name: str, run: str):
    """Images/s of a train part's `run` (eager or compiled), where it got that far."""
    result = parts.get(name, {})
    return result.get(run, {}).get("img_per_s") if result.get("status") in ("pass", "partial") else None


def targets(parts: dict, mode: str) -> dict:
    """The issue's H200 targets against what was measured; `applies` is false off a GPU."""
    rates = [(rate, run) for run in ("eager", "compiled") if (rate := _rate(parts, "train_dali", run))]
    train, train_from = max(rates) if rates else (None, None)
    loader_runs = parts.get("loader", {}).get("runs", [])
    default_load = parts.get("loader", {}).get("default_hw_decoder_load")
    at_default = [r for r in loader_runs if r["hw_decoder_load"] in (default_load, None)]
    loader = at_default[0]["img_per_s"] if at_default else None
    loader_target = TARGET_LOADER_OVER_TRAINING * TARGET_TRAIN_IMG_PER_S
    applies = mode == "gpu"
    result = {
        "applies": applies,
        "note": "targets for one H200 (ResNet-50, batch 256, bf16 + channels_last); reported, not enforced",
        "train_img_per_s_with_dali": {"target": TARGET_TRAIN_IMG_PER_S, "measured": train, "from": train_from,
                                      "met": applies and train is not None and train >= TARGET_TRAIN_IMG_PER_S},
        "loader_alone_img_per_s": {"target": loader_target, "measured": loader, "hw_decoder_load": default_load,
                                   "met": applies and loader is not None and loader >= loader_target},
        "loader_over_training": {"target": TARGET_LOADER_OVER_TRAINING,
                                 "measured": loader / train if loader and train else None},
    }
    # The loader keeps up when training on it runs as fast as on synthetic batches that cost nothing to make.
    for run in ("eager", "compiled"):
        dali, synthetic = _rate(parts, "train_dali", run), _rate(parts, "train_synthetic", run)
        if dali and synthetic:
            result[f"dali_over_synthetic_{run}"] = dali / synthetic
    return result


def tally(counts: dict) -> str:
    words = {"pass": "passed", "fail": "failed", "skipped": "skipped", "partial": "partial"}
    return ", ".join(f"{counts[s]} {words[s]}" for s in STATUSES)


def headline(result: dict) -> str:
    """The part's own summary line if it passed, else why not."""
    return result["headline"] if result["status"] == "pass" else result.get("reason", "")


def markdown(report: dict) -> str:
    """The report as the table docs/performance.md keeps, ready to paste."""
    env = report["env"]
    machine = (f"{env.get('gpu', 'no GPU')}, driver {env.get('driver', '-')}, {env.get('cpus')} CPUs; torch "
               f"{env.get('torch')}, DALI {env.get('dali')}")
    counts = report["counts"]
    summary = (f"`bench/gpu_check.sh` ({report['mode']}), {report['started']}, {machine}: {tally(counts)} in "
               f"{report['elapsed_s']:.0f} s"
               + ("" if report["complete"] else " (so far: the run had not finished)"))
    lines = [summary, "", "| part | status | s | estimate s | box s | result |", "|---|---|---:|---:|---:|---|"]
    for name, result in report["parts"].items():
        lines.append(f"| {name} | {result['status']} | {result.get('seconds', 0):.1f} | "
                     f"{report['estimates_s'][name]:.0f} | {report['time_boxes_s'][name]:.0f} | {headline(result)} |")
    t = report["targets"]
    for key in ("train_img_per_s_with_dali", "loader_alone_img_per_s"):
        measured = t[key]["measured"]
        status = "met" if t[key]["met"] else "not met" if t["applies"] else "n/a off a GPU"
        lines.append(f"| target {key} | {status} | | | | "
                     f"{'-' if measured is None else round(measured)} vs {t[key]['target']:.0f} |")
    if report["left_out"]:
        lines += ["", f"Not in this run (--parts runs them): {', '.join(report['left_out'])}."]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
