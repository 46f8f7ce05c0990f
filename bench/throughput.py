"""Images/s of a Trainer run, read back from its metrics.jsonl: the figure the trainer-overhead bench and the GPU
check both take, computed in one place."""
import itertools
import json
from dataclasses import dataclass
from pathlib import Path


def train_records(run_dir: Path) -> list:
    """The run's train records in order: one every monitor.every_steps steps and one at the last step."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@dataclass(frozen=True)
class Throughput:
    img_per_s: float
    data_wait: float
    """Share of the measured time spent waiting for the next batch."""
    steps: int
    """Steps measured."""


def throughput(records: list, batch: int) -> Throughput:
    """Over the windows between consecutive train records, each of which reports its window's mean step time and
    data-wait share; the steps up to the first record (warm-up, cuDNN autotuning, compile) are left out."""
    windows = [(r["step"] - prev["step"], r) for prev, r in itertools.pairwise(records)]
    if not windows:
        raise ValueError("the run logged no train record after the first, so nothing after the warm-up")
    steps = sum(n for n, _ in windows)
    seconds = sum(n * r["step_time_s"] for n, r in windows)
    data_wait = sum(n * r["step_time_s"] * r["data_wait"] for n, r in windows) / seconds
    return Throughput(img_per_s=batch * steps / seconds, data_wait=data_wait, steps=steps)
