"""Runs the trainer as trainer.main does, recording which train images each rank reads at which step.

For make_coded datasets (helpers.make_coded): every image is one solid colour whose red channel names it, so the
centre pixel of each augmented sample tells which file it came from. Each rank appends one JSON line per batch,
{"epoch", "step": the optimizer step it is read for, "codes": [...]}, to $RECORD_DIR/rank<r>.jsonl.
"""
import json
import os
import sys
from pathlib import Path

from data.config import DataConfig
from tests.helpers import decode_code
from trainer import distributed
from trainer.config import load_config
from trainer.trainer import Trainer


class RecordingLoader:
    """The trainer's train loader, with every batch it yields written down first."""

    def __init__(self, trainer: Trainer, out: Path):
        self.trainer, self.loader, self.out = trainer, trainer.train_loader, out

    def __len__(self):
        return len(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def __iter__(self):
        mean = DataConfig().mean[0]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            for images, labels in self.loader:
                red = images[:, 0, images.shape[2] // 2, images.shape[3] // 2].float() + mean
                # A step's micro-batches are all read before it runs. A partial group at an epoch's end is read
                # too, and never trained on: its step number is past the epoch's last.
                record = {"epoch": self.loader._epoch, "step": self.trainer.step + 1,
                          "codes": [decode_code(r) for r in red.tolist()]}
                f.write(json.dumps(record) + "\n")
                f.flush()
                yield images, labels


def main(argv) -> int:
    cfg = load_config(None, argv)
    d = distributed.init(cfg.distributed)
    try:
        with Trainer(cfg, d) as trainer:
            trainer.train_loader = RecordingLoader(trainer, Path(os.environ["RECORD_DIR"]) / f"rank{d.rank}.jsonl")
            return trainer.train()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
