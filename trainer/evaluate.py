"""Exact evaluation on the val split, over however many ranks hold a shard of it; and the tool
`python -m trainer.evaluate RUN_DIR_OR_CHECKPOINT [key=value ...] [--ema] [--json PATH]`, alone or under torchrun,
which evaluates a checkpoint with its own recorded config (key=value overrides it, as for trainer.main)."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from common import cli
from common.errors import UserInputError
from data.build import build_loader
from data.config import preprocessing
from trainer import distributed, saved_run
from trainer.accuracy import Sums, correct_topk
from trainer.config import loader_options
from trainer.precision import autocast, check_device


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32", flip: bool = False) -> dict:
    """Exact over all ranks: each val image is seen once, and counts (not means) are summed. `flip`
    (train.eval_flip): the logits are the mean of the image's and its left-right flip's."""
    was_training = model.training
    model.eval()
    sums = Sums(device, "loss", "top1", "top5", "samples")
    for images, labels in loader:
        with autocast(device, precision):
            logits = model(images)
            if flip:
                logits = (logits + model(images.flip(3))) / 2
        top1, top5 = correct_topk(logits, labels)
        sums.add(loss=F.cross_entropy(logits.float(), labels, reduction="sum"), top1=top1, top5=top5,
                 samples=len(labels))
    model.train(was_training)
    r = sums.reduce()
    n = max(r["samples"], 1)
    return {"loss": r["loss"] / n, "top1": 100 * r["top1"] / n, "top5": 100 * r["top5"] / n,
            "samples": int(r["samples"])}


def evaluate_checkpoint(source: Path, state: dict, cfg, d, ema: bool = False) -> dict:
    """`state`'s model (or EMA) on cfg's val split, as the trainer evaluates it: the same loader, batch size,
    memory format, input dtype and autocast."""
    model = saved_run.build(state, cfg, saved_run.weights_of(state, ema, source), source).to(d.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = distributed.agree(lambda: build_loader(cfg.data, "val", **loader_options(cfg, d)), d)
    if list(loader.classes) != list(state["classes"]):
        raise UserInputError(f"{source} was trained on other classes than the val split of {cfg.data.root}")
    metrics = evaluate(model, loader, d.device, cfg.train.precision, flip=cfg.train.eval_flip)
    logged = saved_run.logged_val(source, state["step"], ema)
    return {"checkpoint": str(source.resolve()), "step": state["step"], "epoch": state.get("epoch"),
            "weights": "ema" if ema else "model", "split": "val", **metrics, "world_size": d.world_size,
            "device": d.device.type, "precision": cfg.train.precision, "data_root": cfg.data.root,
            "preprocessing": preprocessing(cfg.data), "eval_flip": cfg.train.eval_flip,
            "logged": {k: logged[k] for k in ("top1", "top5", "loss", "samples") if k in logged} if logged else None}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__)
    parser.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a checkpoint file, or a run dir (its checkpoints/latest is evaluated)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the checkpoint's config, e.g. data.root=/data/imagenet train.batch_size=64")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (runs with optim.ema_decay)")
    parser.add_argument("--json", type=Path, help="where to write the result (default: beside the checkpoint, "
                                                  "ckpt-<step>.eval[-ema].json)")
    return parser.parse_args(argv)


def _report(result: dict) -> str:
    line = (f"{Path(result['checkpoint']).name} (step {result['step']}, {result['weights']}): val top1 "
            f"{result['top1']:.2f}% top5 {result['top5']:.2f}% loss {result['loss']:.4f} on {result['samples']} "
            f"images, {result['world_size']} process(es) on {result['device']}")
    logged = result["logged"]
    if logged:
        line += f"\nthe trainer logged at this step: top1 {logged['top1']:.2f}% top5 {logged['top5']:.2f}%"
    return line


def evaluate_command(args: argparse.Namespace) -> int:
    source = saved_run.resolve(args.checkpoint)
    state = saved_run.load(source)
    cfg = saved_run.config_of(state, args.overrides)
    check_device(cfg.train.precision)
    d = distributed.init(cfg.distributed)
    result = evaluate_checkpoint(source, state, cfg, d, ema=args.ema)
    if d.is_main:
        out = args.json or source.with_name(f"{source.stem}.eval{'-ema' if args.ema else ''}.json")
        print(_report(result))
        try:
            out.write_text(json.dumps(result, indent=1) + "\n")
        except OSError as e:
            raise UserInputError(f"--json: cannot write {out}: {e.strerror or e}; choose another place") from None
        print(f"written to {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, evaluate_command, argv, close=distributed.shutdown)


if __name__ == "__main__":
    sys.exit(main())
