"""Exact evaluation on the val split, over however many ranks hold a shard of it."""
import torch
import torch.nn.functional as F
from torch import nn

from trainer.metrics import Sums, correct_topk


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast) -> dict:
    """Exact over all ranks: each val image is seen once, and counts (not means) are summed."""
    was_training = model.training
    model.eval()
    sums = Sums(device, "loss", "top1", "top5", "samples")
    for images, labels in loader:
        with autocast():
            logits = model(images)
        top1, top5 = correct_topk(logits, labels)
        sums.add(loss=F.cross_entropy(logits.float(), labels, reduction="sum"), top1=top1, top5=top5,
                 samples=len(labels))
    model.train(was_training)
    r = sums.reduce()
    n = max(r["samples"], 1)
    return {"loss": r["loss"] / n, "top1": 100 * r["top1"] / n, "top5": 100 * r["top5"] / n,
            "samples": int(r["samples"])}
