"""`python -m bench.blurpool_cost`: the CPU cost per training image of model.blurpool, off against on.

One training step (forward, loss, backward, SGD step) on a fixed random batch, timed for the same net built with
blurpool off and on, in one process, repeats interleaved (off, on, off, on, ...) so that load from other work hits
both alike. The headline is the median of the paired per-repeat ratios (each pair a few seconds apart); the
ratio of the median times is printed beside it. It also counts the blur's multiply-adds against the net's convs',
to show how much of the cost is arithmetic. Figures, not assertions: a benchmark, not a test.
"""
import argparse
import json
import platform
import statistics
import sys

import torch

from bench.step_cost import interleaved, paired_ratio, train_step
from common import cli
from trainer.models import build_model
from trainer.models.blurpool import BlurPoolConv2d


def multiply_adds(model_name: str, size: int) -> tuple:
    """(the blur's, all convs' and the classifier's) multiply-adds per image, forward, counted from the shapes."""
    model = build_model(model_name, num_classes=1000, blurpool=True)
    counts = {"blur": 0, "conv": 0}

    def count(module, inputs, output):
        if isinstance(module, BlurPoolConv2d):
            counts["blur"] += inputs[0][0].numel() * 9  # depthwise 3x3 at stride 1: 9 per input element
        elif isinstance(module, torch.nn.Conv2d):
            counts["conv"] += output[0].numel() * module.weight[0].numel()
        elif isinstance(module, torch.nn.Linear):
            counts["conv"] += module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return counts["blur"], counts["conv"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.blurpool_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved repeats of each variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="NHWC, as the trainer's default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps PyTorch's default")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def blurpool_cost_command(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)

    steps = {v: train_step(args.model, batch=args.batch, size=args.image_size, channels_last=args.channels_last,
                           blurpool=v) for v in (False, True)}
    per_image = interleaved(steps, batch=args.batch, repeats=args.repeats, steps_per_repeat=args.steps,
                            warmup=args.warmup)
    off, on = (statistics.median(per_image[v]) for v in (False, True))
    ratio = paired_ratio(per_image, True, False)
    paired = ratio["per_repeat"]
    blur_macs, net_macs = multiply_adds(args.model, args.image_size)
    result = {"model": args.model, "batch": args.batch, "image_size": args.image_size,
              "channels_last": args.channels_last, "threads": torch.get_num_threads(), "fp32": True,
              "steps_per_repeat": args.steps, "repeats": args.repeats, "ms_per_image_off": 1e3 * off,
              "ms_per_image_on": 1e3 * on, "ratio_paired_median": ratio["paired_median"],
              "ratio_of_medians": ratio["of_medians"], "ratio_per_repeat": paired,
              "blur_macs_per_image": blur_macs, "net_macs_per_image": net_macs,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    print(f"{args.model}, batch {args.batch}, {args.image_size} px, fp32, "
          f"{'channels_last' if args.channels_last else 'NCHW'}, {result['threads']} thread(s), "
          f"{args.repeats} interleaved repeats of {args.steps} steps (median):")
    print(f"  blurpool off: {result['ms_per_image_off']:.1f} ms per training image")
    print(f"  blurpool on:  {result['ms_per_image_on']:.1f} ms per training image")
    print(f"  on / off: {result['ratio_paired_median']:.3f}, median of the paired repeats (ratio of the medians "
          f"{result['ratio_of_medians']:.3f}; per repeat {min(paired):.3f} to {max(paired):.3f})")
    print(f"  the blur's arithmetic: {blur_macs / 1e6:.1f} M multiply-adds per image forward, "
          f"{100 * blur_macs / net_macs:.2f}% of the net's {net_macs / 1e9:.2f} G")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv=None) -> int:
    return cli.run(parse_args, blurpool_cost_command, argv)


if __name__ == "__main__":
    sys.exit(main())
