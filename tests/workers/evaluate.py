"""Evaluates a checkpoint on the val split with however many processes torchrun gives it; rank 0 prints JSON."""
import json
import sys

import torch

from data.build import build_loader
from data.config import DataConfig
from trainer import distributed
from trainer.evaluate import evaluate
from trainer.models import build_model


def main(checkpoint: str) -> None:
    d = distributed.init(distributed.DistributedConfig(timeout_s=120))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    data_cfg = DataConfig(**{k: v for k, v in state["config"]["data"].items()})
    loader = build_loader(data_cfg, "val", batch_size=3, rank=d.rank, world_size=d.world_size, device=d.device,
                          seed=0)
    model = build_model(state["config"]["model"]["name"], num_classes=len(state["classes"]))
    model.load_state_dict(state["model"])
    metrics = evaluate(model, loader, d.device)
    if d.is_main:
        print(json.dumps(metrics))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
