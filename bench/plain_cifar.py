"""The plain loop that bench.real_cifar measures the service against: CIFAR-10 as a user writes it from
torchvision's and PyTorch's DDP tutorials, with nothing of this project but the model.

ImageFolder + RandomCrop(32, padding=4) + flip + per-channel mean/std, a DataLoader with one worker per rank, DDP
over gloo, nesterov SGD with OneCycleLR; rank 0 prints one JSON line: val top-1, train img/s, train seconds.

    torchrun --nproc_per_node=2 -m bench.plain_cifar --root DIR [--epochs 2]
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

from trainer.models import build_model

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's train set, per channel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="CIFAR-10 in ImageNet layout (train/<class>, val/<class>)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.1, help="OneCycle's peak")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train_set = datasets.ImageFolder(os.path.join(args.root, "train"), transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), *normalize]))
    val_set = datasets.ImageFolder(os.path.join(args.root, "val"), transforms.Compose(normalize))
    sampler = DistributedSampler(train_set, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=1, drop_last=True,
                              persistent_workers=True)
    val_loader = DataLoader(val_set, 256, sampler=DistributedSampler(val_set, shuffle=False), num_workers=1)

    model = DistributedDataParallel(build_model("resnet20", len(train_set.classes)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * len(train_loader))
    criterion = nn.CrossEntropyLoss()
    train_time = 0.0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        start = time.perf_counter()
        for images, labels in train_loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        train_time += time.perf_counter() - start

    model.eval()
    counts = torch.zeros(2)
    with torch.no_grad():
        for images, labels in val_loader:
            counts += torch.tensor([(model(images).argmax(1) == labels).sum().item(), len(labels)])
    dist.all_reduce(counts)
    images_trained = args.epochs * len(train_loader) * args.batch_size * world
    if rank == 0:
        print(json.dumps({"val_top1": 100 * counts[0].item() / counts[1].item(), "val_images": int(counts[1]),
                          "img_per_s": images_trained / train_time, "train_s": train_time}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
