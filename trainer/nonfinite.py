"""Skipping optimizer steps whose gradients are not finite, decided on the device so the loop never waits for it."""
import torch
from torch import nn


class NonFiniteGuard:
    """Tells whether this step's gradients are finite, as a 0-dim tensor, and undoes what a skipped step did.

    A skipped step must leave the model as it was. The optimizer skips the update itself (fused SGD and GradScaler
    take `found_inf`), but the bad forward pass has already written the BatchNorm running statistics: they are
    snapshotted before the forward and put back where the step was skipped. Counters stay on the device too; the
    host reads them only on logging and stop-check steps.
    """

    def __init__(self, model: nn.Module, device: torch.device):
        self.buffers = [b for b in model.buffers()]
        self.snapshot = [torch.empty_like(b) for b in self.buffers]
        self.skipped = torch.zeros((), device=device)
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int64, device=device)

    def before_forward(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.snapshot, self.buffers)

    @torch.no_grad()
    def check(self, parameters) -> torch.Tensor:
        """1.0 when any gradient is inf or NaN (all-reduced gradients: every rank decides alike), else 0.0."""
        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.skipped.device)
        self.skipped.copy_(~torch.isfinite(norm))
        return self.skipped

    @torch.no_grad()
    def after_step(self) -> None:
        """Restores the buffers a skipped step changed and counts it."""
        bad = self.skipped.bool()
        for buffer, saved in zip(self.buffers, self.snapshot):
            torch.where(bad, saved, buffer, out=buffer)
        self.consecutive.mul_(bad).add_(bad)
        self.total.add_(bad)

    def state_dict(self) -> dict:
        return {"total": int(self.total), "consecutive": int(self.consecutive)}

    def load_state_dict(self, state: dict) -> None:
        self.total.fill_(state["total"])
        self.consecutive.fill_(state["consecutive"])
