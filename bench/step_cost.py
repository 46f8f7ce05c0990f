"""What the CPU cost benchmarks share: one training step on a fixed random batch, and timing of several variants
interleaved (a, b, c, a, b, c, ...) so that load from other work hits them alike."""
import statistics
import time
from typing import Callable, Dict, Hashable, List

import torch
import torch.nn.functional as F

from trainer.models import build_model


def train_step(model_name: str, *, batch: int, size: int, channels_last: bool, blurpool: bool = False) -> Callable:
    """A closure running one fp32 training step (forward, loss, backward, SGD step) of a fresh net."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=1000, blurpool=blurpool)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(1000, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _time_steps(step: Callable, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def interleaved(steps: Dict[Hashable, Callable], *, batch: int, repeats: int, steps_per_repeat: int,
                warmup: int) -> Dict[Hashable, List[float]]:
    """Seconds per training image of each variant, one figure per repeat, the variants timed in turn."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    per_image = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, step in steps.items():
            per_image[variant].append(_time_steps(step, steps_per_repeat) / batch)
    return per_image


def paired_ratio(per_image: Dict[Hashable, List[float]], variant: Hashable, baseline: Hashable) -> dict:
    """variant / baseline: the median of the per-repeat ratios (each pair seconds apart), beside the ratio of the
    medians and the spread of the per-repeat ratios."""
    paired = [b / a for a, b in zip(per_image[baseline], per_image[variant])]
    return {"paired_median": statistics.median(paired),
            "of_medians": statistics.median(per_image[variant]) / statistics.median(per_image[baseline]),
            "per_repeat": paired}
