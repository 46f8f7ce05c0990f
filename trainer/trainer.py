"""The training loop: `train()` is the schedule, `train_one_epoch()` the steps, `train_step()` one update."""
import contextlib
import enum
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.errors import ConfigError
from data.loader import build_loader
from trainer import distributed
from trainer.checkpoint import Checkpointer
from trainer.config import Config, to_dict, to_yaml
from trainer.distributed import Dist
from trainer.errors import Diverged, UserInputError
from trainer.metrics import Sums, correct_topk
from trainer.models import build_model
from trainer.monitor import Monitor
from trainer.optim import build_ema, build_optimizer, build_scheduler, scaled_lr
from trainer.preemption import StopFlag
from trainer.rng import rng_state, seed_everything, set_rng_state

CHECKPOINT_VERSION = 2
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The images the loader hands over: fp32 for fp32 training, the autocast dtype otherwise (half the bytes moved,
# and the first convolution would cast them anyway).
INPUT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class EpochEnd(enum.Enum):
    """Why `train_one_epoch` returned."""

    EPOCH = "the epoch's batches ran out"
    LAST_STEP = "the run reached its last step"
    STOP = "the ranks agreed to stop on a signal"


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast) -> dict:
    """Exact over all ranks: each val image is seen once, and counts (not means) are summed."""
    was_training = model.training
    model.eval()
    sums = Sums(device, "loss", "top1", "top5", "samples")
    for images, labels in loader:
        with autocast():
            logits = model(images)
        top1, top5 = correct_topk(logits, labels)
        sums.add(loss=F.cross_entropy(logits.float(), labels, reduction="sum"), top1=top1, top5=top5,
                 samples=len(labels))
    model.train(was_training)
    r = sums.reduce()
    n = max(r["samples"], 1)
    return {"loss": r["loss"] / n, "top1": 100 * r["top1"] / n, "top5": 100 * r["top5"] / n,
            "samples": int(r["samples"])}


def accumulation_groups(batches, size: int):
    """Lists of `size` consecutive batches, one per optimizer step. A partial group at the epoch's end is read
    (so the epoch completes) but not yielded: it is not a step."""
    batches = iter(batches)
    while len(group := list(itertools.islice(batches, size))) == size:
        yield group


class Trainer:
    """A run: built from the config, restored from run.dir's latest checkpoint, trained by `train()`.

    `self.model` is what the step calls (DDP- and compile-wrapped when enabled); `self.raw_model` is the plain
    module whose weights are saved, averaged (EMA) and evaluated.
    """

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.dist, self.device = cfg, d, d.device
        self.run_dir = Path(cfg.run.dir)
        # Installed when training starts: worker pools forked during setup must keep the default SIGTERM.
        self.stop = StopFlag()
        self.started = time.perf_counter()
        self.step = self.epoch = self.images_seen = self.nonfinite_steps = 0
        self.last_val = {}
        self.monitor = None
        self._configure_torch()

        self._on_main(self._prepare_run_dir)
        self._on_main(self._ensure_demo_data)
        self.train_loader, self.val_loader = self._build_loaders()
        self.classes = list(self.train_loader.classes)
        self._size_schedule()

        self.raw_model = self._build_model()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, scaled_lr(cfg.optim, self.global_batch))
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        # Disabled outside fp16: scale() and update() are then no-ops and step() is optimizer.step().
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.ema = build_ema(self.raw_model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None

        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         cfg.checkpoint.every_steps, d)
        wandb_id = self._resume()
        self.model = self._wrap(self.raw_model)
        self.monitor = Monitor(cfg.monitor, self.run_dir, d.is_main, total_steps=self.last_step,
                               start_step=self.step, config=to_dict(cfg), wandb_id=wandb_id)
        self.monitor.print(f"run dir: {self.run_dir.resolve()}  ({d.world_size} process(es) on {self.device.type}, "
                           f"global batch {self.global_batch}, {self.steps_per_epoch} steps/epoch, "
                           f"{'resuming at step ' + str(self.step) if self.step else 'starting'})")

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finishes the metrics file and the W&B run; safe to call on any exit, more than once."""
        if self.monitor is not None:
            self.monitor.close()

    def _configure_torch(self) -> None:
        seed_everything(self.cfg.seed)
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        torch.backends.cudnn.benchmark = self.cfg.train.cudnn_benchmark

    def _agree(self, fn):
        return distributed.agree(fn, self.dist)

    def _on_main(self, fn):
        return self._agree(lambda: fn() if self.dist.is_main else None)

    def _prepare_run_dir(self) -> None:
        try:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".writable"
            probe.write_text("")
            probe.unlink()
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        except OSError as e:
            raise UserInputError(f"run.dir: cannot write to {self.run_dir}: {e.strerror or e}") from None

    def _ensure_demo_data(self) -> None:
        if self.cfg.data.demo:
            from data.make_demo_dataset import ensure_demo_dataset
            ensure_demo_dataset(Path(self.cfg.data.root), seed=0)

    def _build_loaders(self) -> tuple:
        cfg, d = self.cfg, self.dist
        options = dict(batch_size=cfg.train.batch_size, rank=d.rank, world_size=d.world_size, device=self.device,
                       seed=cfg.seed, channels_last=cfg.train.channels_last, dtype=INPUT_DTYPE[cfg.train.precision])
        return (self._agree(lambda: build_loader(cfg.data, "train", **options)),
                self._agree(lambda: build_loader(cfg.data, "val", **options)))

    def _size_schedule(self) -> None:
        train, world_size = self.cfg.train, self.dist.world_size
        self.steps_per_epoch = len(self.train_loader) // train.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError("train.batch_size", f"the train split is smaller than one global batch "
                            f"(train.batch_size={train.batch_size} x {world_size} ranks x "
                            f"train.grad_accum={train.grad_accum})")
        self.total_steps = train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, train.max_steps or self.total_steps)
        self.global_batch = train.batch_size * world_size * train.grad_accum

    def _build_model(self) -> nn.Module:
        mc = self.cfg.model
        num_classes = mc.num_classes or len(self.classes)
        if num_classes < len(self.classes):
            raise ConfigError("model.num_classes", f"{num_classes} is fewer than the dataset's {len(self.classes)}")
        model = build_model(mc.name, num_classes=num_classes, shortcut=mc.shortcut,
                            stride_in_1x1=mc.stride_in_1x1, zero_init_residual=mc.zero_init_residual)
        if self.cfg.train.sync_bn and self.dist.world_size > 1:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.dist.is_main:
                print("warning: train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                      "training with per-process BN", file=sys.stderr)
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.cfg.train.channels_last else model

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.train.compile:
            model = torch.compile(model)
        if self.dist.world_size > 1:
            # Buckets fill in reverse layer order while backward runs, so all-reduce overlaps the backward pass;
            # gradients as bucket views save one copy of every gradient.
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        return model

    def state_dict(self) -> dict:
        """What the trainer itself owns: its counters and the last validation."""
        return {"step": self.step, "epoch": self.epoch, "images_seen": self.images_seen,
                "nonfinite_steps": self.nonfinite_steps, "last_val": self.last_val}

    def checkpoint_state(self) -> dict:
        """The checkpoint: the union of every stateful part. Collective: every rank must call it."""
        return {
            "version": CHECKPOINT_VERSION, **self.state_dict(), "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "loader": distributed.all_gather(self.train_loader.state_dict(), self.dist),
            "rng": distributed.all_gather(rng_state(), self.dist),
            "world_size": self.dist.world_size, "classes": self.classes, "config": to_dict(self.cfg),
            "wandb_id": self.monitor.wandb_id,
        }

    def load_checkpoint_state(self, state: dict, source: Path) -> None:
        def mismatch(key, theirs, ours):
            return UserInputError(f"checkpoint {source} was written with {key}={theirs}, this run has {key}={ours}; "
                                  f"use another run.dir to start afresh")

        if state.get("version") != CHECKPOINT_VERSION:
            raise UserInputError(f"checkpoint {source} has format version {state.get('version')}, "
                                 f"this trainer reads {CHECKPOINT_VERSION}")
        if state["config"]["model"]["name"] != self.cfg.model.name:
            raise mismatch("model.name", state["config"]["model"]["name"], self.cfg.model.name)
        if state["world_size"] != self.dist.world_size:
            raise mismatch("world size", state["world_size"], self.dist.world_size)
        if state["classes"] != self.classes:
            raise UserInputError(f"checkpoint {source} was trained on other classes than {self.cfg.data.root}")
        try:
            self.raw_model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserInputError(f"checkpoint {source} does not fit model.name={self.cfg.model.name}: "
                                 f"{str(e).splitlines()[1].strip()}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.images_seen = state["step"], state["epoch"], state["images_seen"]
        self.nonfinite_steps, self.last_val = state["nonfinite_steps"], state["last_val"]
        self.train_loader.load_state_dict(state["loader"][self.dist.rank])
        set_rng_state(state["rng"][self.dist.rank])

    def _resume(self):
        """Loads the latest complete checkpoint of run.dir, if any; returns the W&B run id to continue."""
        found = self._on_main(self.checkpointer.load_latest)
        path = distributed.broadcast_from_main(str(found[0]) if found else None, self.dist)
        if path is None:
            return None
        state = found[1] if found else torch.load(path, map_location="cpu", weights_only=True)
        self._agree(lambda: self.load_checkpoint_state(state, Path(path)))
        return state["wandb_id"]

    def save(self, **when) -> None:
        """Saves if the checkpointer's cadence says so (see Checkpointer.save for `when`)."""
        self.checkpointer.save(self.step, self.checkpoint_state, **when)

    def autocast(self):
        dtype = AUTOCAST[self.cfg.train.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def train(self) -> int:
        """The schedule: epochs of steps, validation every train.eval_every_epochs and at the end, a checkpoint
        at every epoch end; returns the process exit code."""
        self.stop.install()
        if self.dist.is_main:
            (self.run_dir / "classes.json").write_text(json.dumps(self.classes))
        trained_from, train_time = self.step, 0.0
        while self.step < self.last_step:
            epoch_start = time.perf_counter()
            end = self.train_one_epoch()
            train_time += time.perf_counter() - epoch_start
            if end is EpochEnd.STOP:
                self.save(force=True)
                self.monitor.print(f"stopping on a signal at step {self.step}; checkpoint saved")
                return self.stop.exit_code()
            if end is EpochEnd.EPOCH:
                if self.epoch % self.cfg.train.eval_every_epochs == 0 or self.epoch == self.cfg.train.epochs:
                    self.validate()
                self.save(epoch_end=True)
        if self.last_val.get("step") != self.step:
            self.validate()
            self.save(force=True)
        self._summary((self.step - trained_from) * self.global_batch, train_time)
        return 0

    def train_one_epoch(self) -> EpochEnd:
        """Steps through the rest of the current epoch; stops early at the last step or on an agreed signal."""
        cfg = self.cfg.train
        self.model.train()
        window = Sums(self.device, "loss", "correct", "samples", "data_wait")
        window_start, window_steps, consecutive_bad = time.perf_counter(), 0, 0
        groups = accumulation_groups(self.train_loader, cfg.grad_accum)
        while True:
            fetch_start = time.perf_counter()
            micro_batches = next(groups, None)
            if micro_batches is None:
                self.epoch += 1
                return EpochEnd.EPOCH
            data_wait = time.perf_counter() - fetch_start
            loss_sum, correct, samples, finite = self.train_step(micro_batches)
            self.step += 1
            self.images_seen += samples * self.dist.world_size
            consecutive_bad = 0 if finite else consecutive_bad + 1
            self.nonfinite_steps += not finite
            if consecutive_bad >= cfg.max_nonfinite_steps:
                raise Diverged(f"the loss or gradients were non-finite for {consecutive_bad} consecutive steps "
                               f"(up to step {self.step}); stopping without saving. Lower optim.lr, use "
                               f"train.precision=fp32, or check the data; the last good checkpoint is kept in "
                               f"{self.checkpointer.dir}")
            window.add(loss=loss_sum, correct=correct, samples=samples, data_wait=data_wait)
            window_steps += 1
            self.monitor.advance()
            last_step = self.step >= self.last_step
            if self.step % self.cfg.monitor.every_steps == 0 or last_step:
                self._log_train(window, window_start, window_steps)
                window.reset()
                window_start, window_steps = time.perf_counter(), 0
            if self.step % cfg.stop_check_every == 0 and distributed.any_rank(self.stop.raised, self.dist):
                return EpochEnd.STOP
            if last_step:
                return EpochEnd.LAST_STEP
            self.save()

    def train_step(self, micro_batches: list) -> tuple:
        """One optimizer step over `micro_batches`; returns (summed loss, correct, samples, finite), the first
        two as tensors, so that nothing waits for the device here."""
        loss_sum = correct = samples = 0
        for i, (images, labels) in enumerate(micro_batches):
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                with self.autocast():
                    output = self.model(images)
                    loss = self.criterion(output, labels)
                self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum = loss_sum + loss.detach() * len(labels)
            correct = correct + correct_topk(output.detach(), labels, ks=(1,))[0]
            samples += len(labels)
        finite = self._optimizer_step()
        return loss_sum, correct, samples, finite

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients in backward; micro-batches before the last only accumulate locally."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _optimizer_step(self) -> bool:
        """Applies the update unless the gradients are non-finite; returns whether it was applied."""
        if self.scaler.is_enabled():
            # GradScaler skips the update itself when it finds inf/NaN gradients, and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = True
        else:
            # Gradients are all-reduced, so every rank sees the same norm and takes the same decision.
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if finite and self.ema:
            self.ema.update_parameters(self.raw_model)
        return finite

    def _log_train(self, window: Sums, start: float, steps: int) -> None:
        sums = window.reduce()
        elapsed = time.perf_counter() - start
        if self.device.type == "cuda":
            memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.monitor.write("train", self.step, self.step / self.steps_per_epoch, self.images_seen, {
            "loss": sums["loss"] / sums["samples"], "top1": 100 * sums["correct"] / sums["samples"],
            "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": sums["samples"] / elapsed,
            "data_wait": sums["data_wait"] / (elapsed * self.dist.world_size), "step_time_s": elapsed / steps,
            "max_mem_mb": memory_mb, "nonfinite_steps": self.nonfinite_steps})

    def validate(self) -> None:
        """Evaluates the model (and its EMA) on the val split and logs the result."""
        epoch = self.step / self.steps_per_epoch
        metrics = evaluate(self.raw_model, self.val_loader, self.device, self.autocast)
        self.monitor.write("val", self.step, epoch, self.images_seen, metrics)
        self.last_val = {**metrics, "step": self.step}
        if self.ema:
            ema_metrics = evaluate(self.ema.module, self.val_loader, self.device, self.autocast)
            self.monitor.write("val_ema", self.step, epoch, self.images_seen, ema_metrics)

    def _summary(self, images: int, train_time: float) -> None:
        v = self.last_val
        where = self.monitor.wandb_where
        self.monitor.print(
            f"done: step {self.step}, epoch {self.step / self.steps_per_epoch:.2f}: val top1 {v['top1']:.2f}% "
            f"top5 {v['top5']:.2f}% loss {v['loss']:.4f} on {v['samples']} images | "
            f"wall {time.perf_counter() - self.started:.0f} s, train {images / max(train_time, 1e-9):.1f} img/s | "
            f"checkpoints {self.checkpointer.dir}, metrics {self.run_dir / 'metrics.jsonl'}"
            + (f", W&B {where}" if where else ", W&B off"))
