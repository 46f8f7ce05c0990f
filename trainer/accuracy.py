"""Accuracy and sums that reduce exactly across ranks: counts, not averages of averages."""
import torch
from torch.distributed import ReduceOp

from trainer.distributed import all_reduce_


def correct_topk(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list:
    """Number of samples whose label is among the k highest logits, for each k (as tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, :k].any(dim=1).sum() for k in ks]


class Sums:
    """Named running sums; `reduce()` adds them over all ranks in one collective.

    Tensors (losses, correct counts) are summed where they are, on the device; plain numbers (sample counts,
    seconds) on the host, since copying one to the GPU every step would make the host wait for it.
    """

    def __init__(self, device: torch.device, *names: str):
        self.names = names
        self.device = device
        self.reset()

    def add(self, **values) -> None:
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                self.on_device[name] = self.on_device[name] + value.to(torch.float64)
            else:
                self.on_host[name] += value

    def reduce(self) -> dict:
        values = torch.stack([torch.as_tensor(self.on_device[n], dtype=torch.float64, device=self.device)
                              + self.on_host[n] for n in self.names])
        return dict(zip(self.names, all_reduce_(values).tolist()))

    def max_over_ranks(self, name: str) -> float:
        """The largest rank's sum of `name` (a second collective: for logging steps only)."""
        value = torch.as_tensor(self.on_device[name], dtype=torch.float64, device=self.device) + self.on_host[name]
        return all_reduce_(value.reshape(1), op=ReduceOp.MAX).item()

    def reset(self) -> None:
        self.on_device = dict.fromkeys(self.names, 0)
        self.on_host = dict.fromkeys(self.names, 0.0)
