"""Parts loader and train_*: images/s of DALI's train pipeline alone, and of the real Trainer on synthetic data and
on the DALI loader, eager and then under torch.compile."""
import gc
import math
import time
from dataclasses import replace

import torch

from bench.gpu_check.context import CheckFailed, Context, Passed
from bench.throughput import throughput, train_records
from data.build import build_loader
from trainer.precision import INPUT_DTYPE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_problems(images: torch.Tensor, labels: torch.Tensor, shape: tuple, channels_last: bool,
                    dtype: torch.dtype, device: torch.device, classes: int) -> list:
    problems = []
    if tuple(images.shape) != shape:
        problems.append(f"images of shape {tuple(images.shape)}, expected {shape}")
    if images.dtype != dtype:
        problems.append(f"images of dtype {images.dtype}, expected {dtype}")
    if images.device.type != device.type or labels.device.type != device.type:
        problems.append(f"batch on {images.device}/{labels.device}, expected {device}")
    if channels_last and not images.is_contiguous(memory_format=torch.channels_last):
        problems.append("images are not channels_last")
    if labels.dtype != torch.int64 or int(labels.min()) < 0 or int(labels.max()) >= classes:
        problems.append(f"labels of dtype {labels.dtype} in [{int(labels.min())}, {int(labels.max())}]")
    if not torch.isfinite(images.float()).all():
        problems.append("non-finite pixels")
    return problems


def _loader_rate(data_cfg, batch: int, device: torch.device, warmup: int, batches: int, *, channels_last: bool,
                 dtype: torch.dtype) -> dict:
    loader = build_loader(data_cfg, "train", batch_size=batch, rank=0, world_size=1, device=device, seed=0,
                          channels_last=channels_last, dtype=dtype)
    measured = min(batches, len(loader) - warmup)
    if measured < 1:
        raise CheckFailed(f"the train split has {len(loader)} batches, fewer than {warmup + 1}")
    source = iter(loader)
    for _ in range(warmup):
        images, labels = next(source)
    shape = (batch, 3, data_cfg.image_size, data_cfg.image_size)
    problems = _batch_problems(images, labels, shape, channels_last, dtype, device, len(loader.classes))
    if problems:
        raise CheckFailed("bad batch from the loader: " + "; ".join(problems))
    _sync(device)
    start = time.perf_counter()
    for _ in range(measured):
        images, labels = next(source)
    _sync(device)
    return {"img_per_s": batch * measured / (time.perf_counter() - start), "batches": measured}


def _decoder(run: dict) -> str:
    return run["decoder"] + ("" if run["hw_decoder_load"] is None else f" hw {run['hw_decoder_load']:g}")


def check_loader(ctx: Context) -> Passed:
    """DALI's train pipeline alone, as the trainer builds it from the preset (channels_last, bf16, its crop); on a
    GPU at hw_decoder_load 0 and at the preset's, which shows whether the hardware JPEG decoder serves the
    random-crop (ROI) decode that fn.decoders.image_random_crop does, and so whether data.hw_decoder_load does
    anything on the training path.

    By the source it should. DALI 2.x decodes through nvImageCodec (dali/operators/imgcodec/decoder_schema.cc and
    the installed 2.4's docstring: "The implementation uses NVIDIA nvImageCodec ... For JPEG, a dedicated HW
    decoder will be used when available"). nvImageCodec's hardware decoder (extensions/nvjpeg/hw_decoder.cpp)
    takes an image with its region of interest wherever nvJPEG's nvjpegDecodeBatchedSupportedEx accepts the two
    together, a per-image decision made at run time, and decodes it with nvjpegDecodeBatchedEx; hw_decoder_load is
    that decoder's share of each batch (at 0 every image goes to the CUDA decoder, whose Huffman stage runs on
    the CPU threads). DALI's older nvJPEG decoder, fn.legacy.decoders now, did not: "ROI decoding is currently
    not compatible with hardware-based decoding" (dali/operators/decoder/image_decoder.cc). Equal rates would
    mean that nvJPEG declines these ROI decodes on this GPU, or that the CPU threads keep up without the hardware
    decoder; a higher rate at the preset's load means it serves them.
    """
    s = ctx.sizes
    cfg = ctx.config(f"data.root={ctx.images}")
    # The trainer's loader delivers batches in the model's memory format and precision.
    channels_last, dtype = cfg.train.channels_last, INPUT_DTYPE[cfg.train.precision]
    figures = {"batch": s.batch, "threads": cfg.data.num_threads, "channels_last": channels_last,
               "dtype": str(dtype).removeprefix("torch."), "image_size": cfg.data.image_size,
               "default_hw_decoder_load": cfg.data.hw_decoder_load, "runs": []}
    loads = (0.0, cfg.data.hw_decoder_load) if ctx.device.type == "cuda" else (None,)
    for load in loads:
        data_cfg = cfg.data if load is None else replace(cfg.data, hw_decoder_load=load)
        rate = _loader_rate(data_cfg, s.batch, ctx.device, s.loader_warmup, s.loader_batches,
                            channels_last=channels_last, dtype=dtype)
        figures["runs"].append({"decoder": "mixed" if load is not None else "cpu", "hw_decoder_load": load, **rate})
        headline = ", ".join(f"{_decoder(r)}: {r['img_per_s']:.0f} img/s" for r in figures["runs"])
        ctx.record(**figures, headline=headline)
    if len(figures["runs"]) == 2:
        without, at_default = (r["img_per_s"] for r in figures["runs"])
        figures["hw_decoder_speedup"] = at_default / without
        headline += f" (x{figures['hw_decoder_speedup']:.2f} with the hardware decoder)"
    return Passed(headline, figures)


def trainer_rate(ctx: Context, backend: str, compiled: bool, *extra: str, name: str = "") -> dict:
    """The real Trainer's images/s on the preset at this mode's sizes, `extra` overrides last, and what else its
    metrics say; runs in runs/`name` (by default train_<backend>[_compiled])."""
    s = ctx.sizes
    steps = s.train_warmup + s.train_steps
    data = (["data.backend=synthetic", f"data.synthetic_samples={s.batch * steps}"] if backend == "synthetic"
            else [f"data.root={ctx.images}"])
    name = name or f"train_{backend}{'_compiled' if compiled else ''}"
    run_dir, _ = ctx.run_trainer(name, *data, "model.num_classes=1000", f"train.max_steps={steps}",
                                 f"monitor.every_steps={s.train_warmup}", f"train.compile={compiled}", *extra)
    # One record per `train_warmup` steps; the first window (warm-up, compile) is left out.
    train = train_records(run_dir)
    rate = throughput(train, s.batch)
    figures = {"img_per_s": rate.img_per_s, "data_wait": rate.data_wait, "measured_steps": rate.steps,
               "max_mem_mb": train[-1]["max_mem_mb"], "final_loss": train[-1]["loss"],
               # The first window: cuDNN's autotuning, the loader's start and, under compile, Inductor's compile.
               "first_steps": train[0]["step"], "first_steps_s": train[0]["step_time_s"] * train[0]["step"]}
    if not math.isfinite(figures["final_loss"]):
        raise CheckFailed(f"non-finite training loss ({'compiled' if compiled else 'eager'})", **figures)
    return figures


def _line(rate: dict) -> str:
    return (f"{rate['img_per_s']:.0f} img/s (data wait {rate['data_wait']:.0%}; first {rate['first_steps']} steps "
            f"{rate['first_steps_s']:.0f} s)")


def train_rates(ctx: Context, backend: str) -> Passed:
    """The Trainer's images/s eager, then under torch.compile. The eager figures are recorded before the compile
    begins, so that a compile that outlasts the part's box still leaves them, and how long it had compiled, in
    the report (run.py reports the part `partial`). The compiled run's first steps hold Inductor's compile: cold
    in train_synthetic, from Inductor's on-disk caches in train_dali, which runs after it on the same graph."""
    s = ctx.sizes
    figures = {"backend": backend, "model": s.model, "batch": s.batch, "precision": "bf16", "channels_last": True}
    figures["eager"] = trainer_rate(ctx, backend, compiled=False)
    headline = f"eager {_line(figures['eager'])}"
    ctx.record(**figures, headline=headline)
    if ctx.device.type != "cuda":
        figures["compiled"] = {"skipped": "a GPU's only: Inductor's C++ compile of the model takes minutes on a "
                                          "small CPU host"}
        return Passed(f"{headline}; compiled: not on the CPU", figures)
    gc.collect()  # the eager run's DALI pipeline and device memory go before the compiled run builds its own
    figures["compiled"] = trainer_rate(ctx, backend, compiled=True)
    figures["compiled_over_eager"] = figures["compiled"]["img_per_s"] / figures["eager"]["img_per_s"]
    return Passed(f"{headline}; compiled {_line(figures['compiled'])}", figures)


def check_train_synthetic(ctx: Context) -> Passed:
    return train_rates(ctx, "synthetic")


def check_train_dali(ctx: Context) -> Passed:
    return train_rates(ctx, "dali")
