"""The training loop: train_step, train_one_epoch, evaluate, and the state that makes a restart exact."""
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from data.errors import ConfigError, DataError
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

CHECKPOINT_VERSION = 1
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, autocast, channels_last: bool) -> dict:
    """Exact over all ranks: each val image is seen once, and counts (not means) are summed."""
    was_training = model.training
    model.eval()
    sums = Sums(device, "loss", "top1", "top5", "samples")
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
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


class Trainer:
    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.dist, self.device = cfg, d, d.device
        self.run_dir = Path(cfg.run.dir)
        # Installed when training starts: worker pools forked during setup must keep the default SIGTERM.
        self.stop = StopFlag()
        self.started = time.perf_counter()
        seed_everything(cfg.seed)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark

        self._on_main(self._prepare_run_dir)
        if cfg.data.demo:
            from data.make_demo_dataset import ensure_demo_dataset
            self._on_main(lambda: ensure_demo_dataset(Path(cfg.data.root), seed=0))
        loader_args = dict(rank=d.rank, world_size=d.world_size, device=self.device, seed=cfg.seed)
        self.train_loader = self._agree(lambda: build_loader(
            cfg.data, "train", batch_size=cfg.train.batch_size, **loader_args))
        self.val_loader = self._agree(lambda: build_loader(
            cfg.data, "val", batch_size=cfg.train.batch_size, **loader_args))
        self.classes = list(self.train_loader.classes)
        self.steps_per_epoch = len(self.train_loader) // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise DataError(f"{cfg.data.root}: the train split is smaller than one global batch "
                            f"(train.batch_size={cfg.train.batch_size} x {d.world_size} ranks x "
                            f"train.grad_accum={cfg.train.grad_accum})")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        self.global_batch = cfg.train.batch_size * d.world_size * cfg.train.grad_accum

        self.model = self._build_model().to(self.device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg.optim, scaled_lr(cfg.optim, self.global_batch))
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.precision == "fp16" else None
        self.ema = build_ema(self.model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
        self.step = self.epoch = self.images_seen = self.nonfinite_total = 0
        self.last_val = {}
        wandb_id = self._resume()

        self.forward_model = torch.compile(self.model) if cfg.train.compile else self.model
        if d.world_size > 1:
            # Buckets fill in reverse layer order while backward runs, so all-reduce overlaps the backward pass;
            # gradients as bucket views save one copy of every gradient.
            self.forward_model = DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.monitor = Monitor(cfg.monitor, self.run_dir, d.is_main, total_steps=self.last_step,
                               start_step=self.step, config=to_dict(cfg), wandb_id=wandb_id)
        self.monitor.print(f"run dir: {self.run_dir.resolve()}  ({d.world_size} process(es) on {self.device.type}, "
                           f"global batch {self.global_batch}, {self.steps_per_epoch} steps/epoch, "
                           f"{'resuming at step ' + str(self.step) if self.step else 'starting'})")

    def _agree(self, fn):
        """Runs `fn` on every rank; if it fails on any rank, every rank raises, so none waits at a collective."""
        try:
            result, error = fn(), None
        except (DataError, UserInputError, ConfigError) as e:
            result, error = None, e
        failures = [(r, m) for r, m in enumerate(distributed.all_gather(error and str(error), self.dist)) if m]
        if error is not None:
            raise error
        if failures:
            raise UserInputError(f"rank {failures[0][0]} failed: {failures[0][1]}")
        return result

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

    def _build_model(self) -> torch.nn.Module:
        mc = self.cfg.model
        num_classes = mc.num_classes or len(self.classes)
        if num_classes < len(self.classes):
            raise ConfigError("model.num_classes", f"{num_classes} is fewer than the dataset's {len(self.classes)}")
        model = build_model(mc.name, num_classes=num_classes, shortcut=mc.shortcut,
                            stride_in_1x1=mc.stride_in_1x1, zero_init_residual=mc.zero_init_residual)
        if self.cfg.train.sync_bn and self.dist.world_size > 1:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.dist.is_main:
                print("warning: train.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); "
                      "training with per-process BN", file=sys.stderr)
        return model

    def state_dict(self) -> dict:
        """The checkpoint: the union of every stateful piece. Collective: every rank must call it."""
        loaders = distributed.all_gather(self.train_loader.state_dict(), self.dist)
        rngs = distributed.all_gather(rng_state(), self.dist)
        return {
            "version": CHECKPOINT_VERSION, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "step": self.step, "epoch": self.epoch, "images_seen": self.images_seen,
            "nonfinite_total": self.nonfinite_total, "last_val": self.last_val,
            "world_size": self.dist.world_size, "loader": loaders, "rng": rngs, "classes": self.classes,
            "config": to_dict(self.cfg), "wandb_id": self.monitor.wandb_id,
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
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
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserInputError(f"checkpoint {source} does not fit model.name={self.cfg.model.name}: "
                                 f"{str(e).splitlines()[1].strip()}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.images_seen = state["step"], state["epoch"], state["images_seen"]
        self.nonfinite_total, self.last_val = state["nonfinite_total"], state["last_val"]
        self.train_loader.load_state_dict(state["loader"][self.dist.rank])
        set_rng_state(state["rng"][self.dist.rank])

    def _resume(self):
        """Loads the latest complete checkpoint of run.dir, if any; returns the W&B run id to continue."""
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.cfg.checkpoint.keep)
        found = self._on_main(self.checkpointer.load_latest)
        path = distributed.broadcast_from_main(str(found[0]) if found else None, self.dist)
        if path is None:
            return None
        state = found[1] if found else torch.load(path, map_location="cpu", weights_only=True)
        self._agree(lambda: self.load_state_dict(state, Path(path)))
        return state["wandb_id"]

    def save(self) -> None:
        state = self.state_dict()
        if self.dist.is_main:
            if not all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()):
                raise Diverged(f"refusing to write a checkpoint with non-finite weights at step {self.step}")
            self.checkpointer.save(state, self.step)

    def autocast(self):
        dtype = AUTOCAST[self.cfg.train.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def train_step(self, micro_batches: list) -> tuple:
        """One optimizer step over `micro_batches`; returns (summed loss, correct, samples, finite) as tensors."""
        accum = len(micro_batches)
        loss_sum = correct = 0
        samples = 0
        for i, (images, labels) in enumerate(micro_batches):
            last = i == accum - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.forward_model.no_sync()
            with sync:
                with self.autocast():
                    logits = self.forward_model(images)
                    loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.train.label_smoothing)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum = loss_sum + loss.detach() * len(labels)
            correct = correct + correct_topk(logits.detach(), labels, ks=(1,))[0]
            samples += len(labels)
        if self.scaler:
            # GradScaler skips the update itself when it finds inf/NaN gradients, and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = True
        else:
            # Gradients are all-reduced, so every rank sees the same norm and takes the same decision.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if finite and self.ema:
            self.ema.update_parameters(self.model)
        return loss_sum, correct, samples, finite

    def train_one_epoch(self) -> str:
        """Trains on the rest of the current epoch; returns why it returned: "epoch", "stopped" or "last_step"."""
        cfg = self.cfg.train
        self.forward_model.train()
        window = Sums(self.device, "loss", "correct", "samples", "data_wait")
        window_start, window_steps, consecutive_bad = time.perf_counter(), 0, 0
        batches = iter(self.train_loader)
        while True:
            fetch_start = time.perf_counter()
            group = [b for _, b in zip(range(cfg.grad_accum), batches)]
            if len(group) < cfg.grad_accum:
                for _ in batches:  # a partial accumulation group at the epoch's end is not a step
                    pass
                break
            data_wait = time.perf_counter() - fetch_start
            images = [(x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x, y)
                      for x, y in group]
            loss_sum, correct, samples, finite = self.train_step(images)
            self.step += 1
            self.images_seen += samples * self.dist.world_size
            window_steps += 1
            consecutive_bad = 0 if finite else consecutive_bad + 1
            self.nonfinite_total += not finite
            if consecutive_bad >= cfg.max_nonfinite_steps:
                raise Diverged(f"the loss or gradients were non-finite for {consecutive_bad} consecutive steps "
                               f"(up to step {self.step}); stopping without saving. Lower optim.lr, use "
                               f"train.precision=fp32, or check the data; the last good checkpoint is kept in "
                               f"{self.checkpointer.dir}")
            window.add(loss=loss_sum, correct=correct, samples=samples, data_wait=data_wait)
            self.monitor.advance()
            end_of_run = self.step >= self.last_step
            if self.step % self.cfg.monitor.every_steps == 0 or end_of_run:
                self._log_train(window, window_start, window_steps)
                window.reset()
                window_start, window_steps = time.perf_counter(), 0
            if self.step % cfg.stop_check_every == 0 and distributed.any_rank(self.stop.raised, self.dist):
                self.save()
                self.monitor.print(f"stopping on a signal at step {self.step}; checkpoint saved")
                return "stopped"
            if end_of_run:
                return "last_step"
            if self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0:
                self.save()
        self.epoch += 1
        return "epoch"

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
            "max_mem_mb": memory_mb, "nonfinite_steps": self.nonfinite_total})

    def evaluate(self, model: torch.nn.Module) -> dict:
        return evaluate(model, self.val_loader, self.device, self.autocast, self.cfg.train.channels_last)

    def validate_and_log(self) -> None:
        metrics = self.evaluate(self.model)
        epoch = self.step / self.steps_per_epoch
        self.monitor.write("val", self.step, epoch, self.images_seen, metrics)
        self.last_val = {**metrics, "step": self.step}
        if self.ema:
            self.monitor.write("val_ema", self.step, epoch, self.images_seen, self.evaluate(self.ema.module))

    def train(self) -> int:
        """Runs to the end of the schedule (or max_steps); returns the process exit code."""
        self.stop.install()
        if self.dist.is_main:
            (self.run_dir / "classes.json").write_text(json.dumps(self.classes))
        trained_from, train_time = self.step, 0.0
        while self.step < self.last_step and self.epoch < self.cfg.train.epochs:
            epoch_start = time.perf_counter()
            outcome = self.train_one_epoch()
            train_time += time.perf_counter() - epoch_start
            if outcome == "stopped":
                self.monitor.close()
                return self.stop.exit_code()
            if outcome == "last_step":
                break
            if self.epoch % self.cfg.train.eval_every_epochs == 0 or self.epoch == self.cfg.train.epochs:
                self.validate_and_log()
            self.save()
        if self.last_val.get("step") != self.step:
            self.validate_and_log()
            self.save()
        self._summary((self.step - trained_from) * self.global_batch, train_time)
        self.monitor.close()
        return 0

    def _summary(self, images: int, train_time: float) -> None:
        v = self.last_val
        where = self.monitor.wandb_where
        self.monitor.print(
            f"done: step {self.step}, epoch {self.step / self.steps_per_epoch:.2f}: val top1 {v['top1']:.2f}% "
            f"top5 {v['top5']:.2f}% loss {v['loss']:.4f} on {v['samples']} images | "
            f"wall {time.perf_counter() - self.started:.0f} s, train {images / max(train_time, 1e-9):.1f} img/s | "
            f"checkpoints {self.checkpointer.dir}, metrics {self.run_dir / 'metrics.jsonl'}"
            + (f", W&B {where}" if where else ", W&B off"))
