"""Accuracy and sums that reduce exactly across ranks: counts, not averages of averages."""
import torch

from trainer.distributed import all_reduce_


def correct_topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose label is among the k highest logits, for each k (as tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class Sums:
    """Named running sums kept on the device; `reduce()` adds them over all ranks in one collective."""

    def __init__(self, device: torch.device, *names: str):
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, **values) -> None:
        self.values += torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=self.values.device)
                                    for n in self.names])

    def reduce(self) -> dict:
        return dict(zip(self.names, all_reduce_(self.values.clone()).tolist()))

    def reset(self) -> None:
        self.values.zero_()
