"""`python -m trainer.export RUN_DIR_OR_CHECKPOINT --format {torchvision,safetensors,onnx} --out PATH`: a
checkpoint's weights for use elsewhere, with a JSON beside them (PATH.json: model, builder, classes, the
preprocessing they expect, source step, val top-1).

By default the exported weights take torchvision's standard input (Resize, CenterCrop, ToTensor() to [0, 1],
Normalize(ImageNet mean, std)). A run trained on other inputs (the seed's recipe: 0-255 pixels minus a mean, no
std) has that difference folded into its first convolution and BN; `--input trained` keeps its own input instead.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from common import cli
from common.errors import UserInputError
from data.config import preprocessing
from trainer import saved_run

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("torchvision", "safetensors", "onnx")
ONNX_OPSET = 18
CHECK_BATCH = 4


def input_affine(preprocessing: dict) -> tuple:
    """(a, b), per channel: the trained net's input is a * x + b when x is torchvision's normalised input.
    x = (p / 255 - m) / s for pixels p, and the net was trained on (p - mean) / std, so
    a = 255 s / std and b = (255 m - mean) / std."""
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float64)
    std = torch.tensor(preprocessing["std"] or [1.0, 1.0, 1.0], dtype=torch.float64)
    m, s = torch.tensor(IMAGENET_MEAN, dtype=torch.float64), torch.tensor(IMAGENET_STD, dtype=torch.float64)
    return 255 * s / std, (255 * m - mean) / std


def fold_input(weights: dict, preprocessing: dict) -> tuple:
    """Weights that compute on torchvision's input what `weights` computed on the trained input, and a record
    of what was folded.

    The first conv has no bias and feeds a BN (conv1 and bn1; with model.deep_stem, conv1.0 and conv1.1), so the
    scale goes into the conv's weights and the shift, which the conv turns into a constant per output channel,
    into the BN's running mean. That is exact wherever the conv's window lies inside the image. At the border it
    is not: the conv zero-pads its input, and a zero of torchvision's input is 255 m gray levels, not the trained
    net's zero (`mean`). The border ring thus sees padding that is
    255 m - mean gray levels off (-0.005, -0.5, -0.41 for the seed's means): far below the quantisation of
    the pixels themselves.
    """
    a, b = input_affine(preprocessing)
    if torch.allclose(a, torch.ones_like(a)) and torch.allclose(b, torch.zeros_like(b)):
        return weights, {"applied": False}
    conv_key, bn_key = ("conv1.0.weight", "conv1.1") if "conv1.0.weight" in weights else ("conv1.weight", "bn1")
    conv = weights[conv_key].to(torch.float64)
    folded = dict(weights)
    folded[conv_key] = (conv * a.view(1, 3, 1, 1)).to(weights[conv_key].dtype)
    constant = (conv * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))
    mean = weights[f"{bn_key}.running_mean"]
    folded[f"{bn_key}.running_mean"] = (mean.to(torch.float64) - constant).to(mean.dtype)
    std = torch.tensor(preprocessing["std"] or [1.0, 1.0, 1.0], dtype=torch.float64)
    return folded, {"applied": True, "scale": a.tolist(), "shift": b.tolist(),
                    "border_padding_error_gray_levels": (b * std).tolist()}


def torchvision_preprocessing(image_size: int, val_resize: int) -> dict:
    return {"pixel_range": [0, 1], "channels": "RGB", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "image_size": image_size, "val_resize": val_resize,
            "transforms": f"Resize({val_resize}), CenterCrop({image_size}), ToTensor(), "
                          f"Normalize(mean={list(IMAGENET_MEAN)}, std={list(IMAGENET_STD)})"}


def to_trained_input(pixels: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"] or [1.0, 1.0, 1.0]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def to_torchvision_input(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@torch.no_grad()
def fold_difference(trained: nn.Module, exported: nn.Module, preprocessing: dict, image_size: int) -> dict:
    """How far the logits of the exported net on torchvision's input are from the trained net's on its own, for
    the same random 0-255 pixels."""
    pixels = torch.rand(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 255
    reference = trained(to_trained_input(pixels, preprocessing))
    difference = reference - exported(to_torchvision_input(pixels))
    return {"max_abs_logit_diff": difference.abs().max().item(), "max_abs_logit": reference.abs().max().item()}


def builder(cfg, num_classes: int) -> str:
    if saved_run.torchvision_compatible(cfg) is None:
        return f"torchvision.models.{cfg.model.name}(num_classes={num_classes})"
    options = ", ".join(f"{k}={v!r}" for k, v in saved_run.builder_options(cfg).items())
    return f"trainer.models.build_model({cfg.model.name!r}, num_classes={num_classes}, {options})"


@torch.no_grad()
def export_onnx(model: nn.Module, out: Path, image_size: int) -> dict:
    """Exports with torch's (dynamo) exporter, batch size dynamic, and compares onnxruntime's logits with
    torch's on a random batch of another size than the traced one."""
    import onnxruntime

    example = torch.randn(2, 3, image_size, image_size)
    torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=ONNX_OPSET, input_names=["images"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                      external_data=False)  # one file: the weights of every net here are far below protobuf's 2 GB
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = torch.randn(CHECK_BATCH + 1, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    logits, reference = torch.from_numpy(session.run(["logits"], {"images": batch.numpy()})[0]), model(batch)
    return {"opset": ONNX_OPSET, "input": "images", "output": "logits", "check_batch": len(batch),
            "max_abs_diff_onnxruntime": (logits - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item()}


def export(checkpoint: Path, fmt: str, out: Path, *, ema: bool = False, input_kind: str = "torchvision") -> dict:
    """Writes `out` and `out`.json; returns the JSON's record."""
    source = saved_run.resolve(checkpoint)
    state = saved_run.load(source)
    cfg = saved_run.config_of(state, [])
    num_classes = saved_run.num_classes_of(state, cfg)
    why_not = saved_run.torchvision_compatible(cfg)
    if fmt == "torchvision" and why_not:
        raise UserInputError(f"{source}: {why_not}; export it with --format safetensors or onnx, which the "
                             f"builder named in the JSON loads")
    trained_pre = state.get("preprocessing") or preprocessing(cfg.data)
    weights = saved_run.weights_of(state, ema, source)
    trained = saved_run.build(state, cfg, weights, source)
    if input_kind == "torchvision":
        weights, fold = fold_input(weights, trained_pre)
        pre = torchvision_preprocessing(cfg.data.val_crop, cfg.data.val_resize)
    else:
        fold, pre = {"applied": False}, trained_pre
    model = saved_run.build(state, cfg, weights, source)
    if fold["applied"]:
        fold.update(fold_difference(trained, model, trained_pre, cfg.data.val_crop))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": fmt, "file": out.name, "model": cfg.model.name, "num_classes": num_classes,
              "builder": builder(cfg, num_classes), "torchvision": why_not or "loads as it is",
              "classes": list(state["classes"]), "preprocessing": pre, "trained_preprocessing": trained_pre,
              "fold": fold, "source": {"checkpoint": str(source.resolve()), "step": state["step"],
                                       "epoch": state.get("epoch"), "weights": "ema" if ema else "model"},
              "val": _val(source, state, ema)}
    if fmt == "torchvision":
        import torchvision
        getattr(torchvision.models, cfg.model.name)(num_classes=num_classes).load_state_dict(weights)
        torch.save(weights, out)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(weights, str(out), metadata={"format": "pt", "export": json.dumps(record)})
    else:
        record["onnx"] = export_onnx(model, out, cfg.data.val_crop)
    Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _val(source: Path, state: dict, ema: bool) -> Optional[dict]:
    """The val figures the trainer logged for these weights at the checkpoint's step, if it evaluated there."""
    logged = saved_run.logged_val(source, state["step"], ema)
    if logged is None and not ema and state.get("last_val", {}).get("step") == state["step"]:
        logged = state["last_val"]
    return {k: logged[k] for k in ("top1", "top5", "loss", "samples") if k in logged} if logged else None


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a checkpoint file, or a run dir (its checkpoints/latest is exported)")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="torchvision: a state dict for torchvision.models.<name> (torch.load, weights_only); "
                             "safetensors: the same tensors; onnx: the whole net, checked with onnxruntime")
    parser.add_argument("--out", required=True, type=Path, help="the file to write; its JSON goes to OUT.json")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (runs with optim.ema_decay)")
    parser.add_argument("--input", dest="input_kind", choices=("torchvision", "trained"), default="torchvision",
                        help="the input the exported weights take: torchvision's standard transforms (default) or "
                             "the run's own preprocessing, unchanged")
    return parser.parse_args(argv)


def export_command(args: argparse.Namespace) -> int:
    try:
        record = export(args.checkpoint, args.format, args.out, ema=args.ema, input_kind=args.input_kind)
    except ImportError as e:  # an optional package of the [export] extra
        raise UserInputError(f"--format {args.format}: {e} (pip install '.[export]')") from None
    except OSError as e:  # --out in a folder that cannot be written
        raise UserInputError(f"--out {args.out}: cannot write: {e.strerror or e}") from None
    val, pre = record["val"], record["preprocessing"]
    print(f"{args.out}: {record['model']} ({record['source']['weights']}) of step {record['source']['step']}, "
          f"{record['num_classes']} classes; input: {pre.get('transforms', 'as trained')}"
          + (f"; logged val top1 {val['top1']:.2f}%" if val else ""))
    if record["fold"]["applied"]:
        print(f"input normalisation folded into conv1 and bn1: logits differ by at most "
              f"{record['fold']['max_abs_logit_diff']:.2e} (of {record['fold']['max_abs_logit']:.2e}) on random "
              f"images, from the border padding")
    if "onnx" in record:
        print(f"onnxruntime vs torch on a batch of {record['onnx']['check_batch']}: max abs difference "
              f"{record['onnx']['max_abs_diff_onnxruntime']:.2e} (of {record['onnx']['max_abs_logit']:.2e})")
    print(f"written: {args.out} and {args.out}.json")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli.run(parse_args, export_command, argv)


if __name__ == "__main__":
    sys.exit(main())
