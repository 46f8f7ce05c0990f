"""`python -m bench.export_agreement RUN_DIR [--data ROOT]`: exports the run's latest checkpoint for torchvision's
standard transforms and prints its val top-1 under them (PIL, Resize, CenterCrop, ToImage, ToDtype(scale=True),
Normalize(ImageNet mean, std)) beside the top-1 the trainer logged, and in how many images its prediction differs
from the checkpoint's own on the trainer's DALI pipeline: with torchvision's resize, and on DALI's pixels (the fold
alone)."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from common import cli
from data.build import build_loader
from data.folder import list_split
from trainer import saved_run
from trainer.export import export, to_torchvision_input


@torch.no_grad()
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.export_agreement", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", help="dataset root (default: the run's data.root)")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


def agreement_command(args: argparse.Namespace) -> int:

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.safetensors"
        record = export(args.run_dir, "safetensors", out)
        from safetensors.torch import load_file
        source = Path(record["source"]["checkpoint"])
        state = saved_run.load(source)
        cfg = saved_run.config_of(state, [])
        if record["builder"].startswith("torchvision."):  # torchvision's own model, where it has the net
            import torchvision
            model = getattr(torchvision.models, record["model"])(num_classes=record["num_classes"])
            model.load_state_dict(load_file(out))
            model.eval()
        else:
            model = saved_run.build(state, cfg, load_file(out), source)
    trained = saved_run.build(state, cfg, state["model"], source)
    pre = record["preprocessing"]
    transform = v2.Compose([v2.Resize(pre["val_resize"]), v2.CenterCrop(pre["image_size"]), v2.ToImage(),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre["mean"], pre["std"])])
    images = list_split(args.data or cfg.data.root, "val")
    paths, labels = images.paths(), torch.tensor(images.labels)
    predicted = []
    for start in range(0, len(paths), args.batch_size):
        batch = [transform(Image.open(p).convert("RGB")) for p in paths[start:start + args.batch_size]]
        predicted.append(model(torch.stack(batch)).argmax(1))
    predicted = torch.cat(predicted)
    top1 = 100 * (predicted == labels).double().mean().item()
    if args.data:
        cfg.data.root = args.data
    # One process reads the val split in file order: the trainer's pipeline, image for image.
    loader = build_loader(cfg.data, "val", batch_size=args.batch_size, rank=0, world_size=1,
                          device=torch.device("cpu"), seed=cfg.seed)
    ours, folded = [], []
    mean = torch.tensor(record["trained_preprocessing"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(record["trained_preprocessing"]["std"] or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    for images, _ in loader:
        ours.append(trained(images).argmax(1))
        folded.append(model(to_torchvision_input(images * std + mean)).argmax(1))  # the same pixels, refolded
    ours, folded = torch.cat(ours), torch.cat(folded)
    logged = record["val"]
    print(json.dumps({"run": str(args.run_dir), "model": record["builder"], "step": record["source"]["step"],
                      "images": len(paths), "torchvision_transforms_top1": top1,
                      "trainer_logged_top1": logged["top1"] if logged else None,
                      "difference_points": top1 - logged["top1"] if logged else None,
                      "checkpoint_on_dali_top1": 100 * (ours == labels).double().mean().item(),
                      "predictions_differing": int((ours != predicted).sum()),
                      "predictions_differing_on_dali_pixels": int((ours != folded).sum()),
                      "fold": record["fold"]}, indent=1))
    return 0



def main(argv=None) -> int:
    return cli.run(parse_args, agreement_command, argv)


if __name__ == "__main__":
    sys.exit(main())
