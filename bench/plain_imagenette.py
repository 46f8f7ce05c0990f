"""The plain loop that bench.imagenette measures the service against: Imagenette as a user writes it from
torchvision's and PyTorch's DDP tutorials, with nothing of this project but the model (the service's net, so that
the two differ only in how they train it, as bench.plain_cifar does).

ImageFolder + RandomResizedCrop(size, scale=(min_scale, 1)) + flip + ImageNet mean/std (val: Resize(val_resize) +
CenterCrop(val_size)), a DataLoader with one persistent worker per rank, DDP over gloo, the ResNet (torchvision's with
no options; --deep-stem and --shortcut D make it the Bag of Tricks' ResNet-C/D, timm's resnet50d), nesterov
SGD with OneCycleLR, label smoothing; bf16 through torch.autocast when asked. Validates after every epoch; rank 0
prints one JSON line per epoch (epoch, val_top1, train_s: cumulative training seconds without validation,
img_per_s), then one for the run.

    torchrun --nproc_per_node=2 -m bench.plain_imagenette --root DIR [--epochs 5] [--precision bf16]
"""
import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from trainer.models import build_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's references use
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.plain_imagenette", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a folder with train/<class> and val/<class>")
    parser.add_argument("--arch", choices=ARCHS, default="resnet50", help="the net, random weights")
    parser.add_argument("--deep-stem", action="store_true", help="ResNet-C's stem (model.deep_stem)")
    parser.add_argument("--shortcut", choices=("A", "B", "C", "D"), default="B", help="model.shortcut; D: ResNet-D's")
    parser.add_argument("--zero-init-residual", action="store_true", help="each block's last BN scale starts at 0")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=0.1, help="OneCycle's peak")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="torchvision's ImageNet reference")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--size", type=int, default=128, help="side of the train crop")
    parser.add_argument("--val-size", type=int, help="side of the val centre crop (default: --size)")
    parser.add_argument("--val-resize", type=int, default=146, help="val: shorter side before the centre crop")
    parser.add_argument("--min-scale", type=float, default=0.35, help="RandomResizedCrop's least area (fast.ai's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def evaluate(model, loader, autocast) -> torch.Tensor:
    """(correct, seen) summed over the ranks."""
    model.eval()
    counts = torch.zeros(2)
    with torch.no_grad(), autocast():
        for images, labels in loader:
            counts += torch.tensor([(model(images).argmax(1) == labels).sum().item(), len(labels)])
    dist.all_reduce(counts)
    return counts


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train_set = datasets.ImageFolder(os.path.join(args.root, "train"), transforms.Compose([
        transforms.RandomResizedCrop(args.size, scale=(args.min_scale, 1.0)), transforms.RandomHorizontalFlip(),
        *normalize]))
    val_set = datasets.ImageFolder(os.path.join(args.root, "val"), transforms.Compose([
        transforms.Resize(args.val_resize), transforms.CenterCrop(args.val_size or args.size), *normalize]))
    sampler = DistributedSampler(train_set, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=1, drop_last=True,
                              persistent_workers=True)
    # Every val image once: DistributedSampler would pad 3,925 images to 3,926 with a repeat.
    val_loader = DataLoader(Subset(val_set, range(rank, len(val_set), world)), 100, num_workers=1,
                            persistent_workers=True)

    model = DistributedDataParallel(build_model(args.arch, len(train_set.classes), deep_stem=args.deep_stem,
                                                shortcut=args.shortcut, zero_init_residual=args.zero_init_residual))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    def autocast():
        if args.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    train_time, images_trained = 0.0, 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        for images, labels in train_loader:
            with autocast():
                loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_time += time.perf_counter() - start
        images_trained += len(train_loader) * args.batch_size * world
        correct, seen = evaluate(model, val_loader, autocast).tolist()
        if rank == 0:
            print(json.dumps({"epoch": epoch + 1, "val_top1": 100 * correct / seen, "train_s": train_time,
                              "img_per_s": images_trained / train_time}), flush=True)
    if rank == 0:
        print(json.dumps({"val_top1": 100 * correct / seen, "val_images": int(seen), "train_s": train_time,
                          "img_per_s": images_trained / train_time, "arch": args.arch, "lr": args.lr,
                          "precision": args.precision}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
