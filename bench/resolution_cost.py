"""`python -m bench.resolution_cost`: the CPU cost per training image of ResNet-50 at each train side, as a ratio
to 224 px, in one run.

Progressive resizing (data.resolution) buys its speed here: FFCV's rn50 recipe trains most epochs at 160 px and
ramps to 192. One fp32 training step (forward, loss, backward, SGD step) on a fixed random batch at each side,
the sides timed in turn (160, 176, 192, 224, 160, ...) so that load from other work hits them alike; the ratio to
224 px is the median of the paired per-repeat ratios. The pixel ratio (side / 224)^2 is printed beside it: the
convolutions' arithmetic grows with the pixels, so a measured ratio above it is cost that does not shrink with the
image (the classifier, the optimizer step, per-call overhead). The net is the same for every side: its global
average pool takes any. Figures, not assertions: a benchmark, not a test.
"""
import argparse
import json
import platform
import statistics
import sys

import torch

from bench.step_cost import interleaved, paired_ratio, train_step
from common import cli

BASELINE = 224


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.resolution_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 176, 192, 224],
                        help=f"train sides in pixels; {BASELINE} is added if absent (the baseline)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each side")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true", help="NHWC, as the trainer's default")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps PyTorch's default")
    parser.add_argument("--json", help="also write the figures here")
    return parser.parse_args(argv)


def resolution_cost_command(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sorted(set(args.sizes) | {BASELINE})

    steps = {size: train_step(args.model, batch=args.batch, size=size, channels_last=args.channels_last)
             for size in sizes}
    per_image = interleaved(steps, batch=args.batch, repeats=args.repeats, steps_per_repeat=args.steps,
                            warmup=args.warmup)
    rows = {}
    for size in sizes:
        ratio = paired_ratio(per_image, size, BASELINE)
        rows[size] = {"ms_per_image": 1e3 * statistics.median(per_image[size]),
                      "ratio_to_224": ratio["paired_median"], "ratio_of_medians": ratio["of_medians"],
                      "ratio_per_repeat": ratio["per_repeat"], "pixel_ratio": (size / BASELINE) ** 2}
    print(f"{args.model}, batch {args.batch}, fp32, {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} interleaved repeats of {args.steps} steps (median):")
    print("  side   ms/img   vs 224 px (paired)   per repeat      pixels vs 224")
    for size, row in rows.items():
        spread = f"{min(row['ratio_per_repeat']):.3f}-{max(row['ratio_per_repeat']):.3f}"
        print(f"  {size:4d}  {row['ms_per_image']:7.1f}   {row['ratio_to_224']:6.3f}              {spread:13s}  "
              f"{row['pixel_ratio']:.3f}")
    if args.json:
        result = {"model": args.model, "batch": args.batch, "channels_last": args.channels_last,
                  "threads": torch.get_num_threads(), "fp32": True, "steps_per_repeat": args.steps,
                  "repeats": args.repeats, "sizes": {str(k): v for k, v in rows.items()},
                  "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def main(argv=None) -> int:
    return cli.run(parse_args, resolution_cost_command, argv)


if __name__ == "__main__":
    sys.exit(main())
