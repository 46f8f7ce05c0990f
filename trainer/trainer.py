"""The training loop: `train()` is the schedule, `train_one_epoch()` the steps, `train_step()` one update.

The Trainer reads top to bottom in the order a run happens: building the parts, the run's state (what a checkpoint
holds, how a resume restores it), the schedule, the step, and what it reports. It is one class of about 450 lines
because every method works on the same parts of one run; the pieces with a life of their own live beside it
(checkpoint, run_dir, nonfinite, resume, evaluate, monitor, optim).
"""
import contextlib
import enum
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common.errors import ConfigError, Diverged, SplitTooSmall, UserInputError
from data.build import build_loader, merge_states
from data.config import preprocessing
from data.sharding import derive_seed
from trainer import distributed, resume
from trainer.accuracy import Sums, correct_topk
from trainer.checkpoint import Checkpointer
from trainer.config import Config, changeable_on_resume, config_changes, to_dict, to_yaml
from trainer.distributed import Dist
from trainer.evaluate import evaluate
from trainer.models import build_model
from trainer.models.weights import init_from
from trainer.monitor import Monitor
from trainer.nonfinite import NonFiniteGuard
from trainer.optim import build_ema, build_optimizer, build_scheduler, scaled_lr, warn_large_batch
from trainer.preemption import StopFlag
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.run_dir import RunDir

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
        self.step = self.epoch = self.images_seen = 0
        self.last_val = {}
        self.monitor = None
        self.run = RunDir(self.run_dir)
        self._on_main(self.run.open)  # before anything is written there: one job per run dir
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, d = self.cfg, self.dist
        self._configure_torch()
        self._on_main(self._ensure_demo_data)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                         cfg.checkpoint.every_steps, d)
        # Found first: a resume on another world size sizes the loaders' batches from it.
        found = self._on_main(self.checkpointer.load_latest)
        saved_split = distributed.broadcast_from_main(found and resume.saved_split(found[1]), d)
        cfg.train.batch_size, cfg.train.grad_accum = self._agree(lambda: resume.keep_global_batch(
            saved_split, cfg.train.batch_size, cfg.train.grad_accum, d.world_size))
        self.train_loader, self.val_loader = self._build_loaders()
        self.classes = list(self.train_loader.classes)
        self._size_schedule()

        self.raw_model = self._build_model()
        if saved_split is None and cfg.model.init_from:
            self._init_weights()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, scaled_lr(cfg.optim, self.global_batch))
        warn_large_batch(cfg.optim, self.global_batch, d.is_main)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        # Disabled outside fp16: scale() and update() are then no-ops and step() is optimizer.step().
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.guard = NonFiniteGuard(self.raw_model, self.device)
        self.ema = build_ema(self.raw_model, cfg.optim.ema_decay, self.guard.skipped) if cfg.optim.ema_decay else None

        wandb_id = self._resume(found, saved_split)
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
        """Finishes the metrics file and the W&B run and releases run.dir; safe on any exit, more than once."""
        self.stop.uninstall()
        if self.monitor is not None:
            self.monitor.close()
        self.run.close()

    def _configure_torch(self) -> None:
        seed_everything(self.cfg.seed)
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        torch.backends.cudnn.benchmark = self.cfg.train.cudnn_benchmark and not self.cfg.train.deterministic
        if self.cfg.train.deterministic:
            # cuBLAS reads this when it first creates a handle, which happens at the first matmul, after this.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)

    def _agree(self, fn):
        return distributed.agree(fn, self.dist)

    def _on_main(self, fn):
        return self._agree(lambda: fn() if self.dist.is_main else None)

    def _ensure_demo_data(self) -> None:
        if self.cfg.data.demo and self.cfg.data.format == "webdataset":
            from data.make_shards import ensure_demo_shards
            ensure_demo_shards(Path(self.cfg.data.root))
        elif self.cfg.data.demo:
            from data.make_demo_dataset import ensure_demo_dataset
            ensure_demo_dataset(Path(self.cfg.data.root), seed=0)

    def _build_loaders(self) -> tuple:
        cfg, d = self.cfg, self.dist
        options = dict(batch_size=cfg.train.batch_size, rank=d.rank, world_size=d.world_size, device=self.device,
                       seed=cfg.seed, channels_last=cfg.train.channels_last, dtype=INPUT_DTYPE[cfg.train.precision])
        return (self._agree(lambda: self._train_loader(options)),
                self._agree(lambda: build_loader(cfg.data, "val", **options)))

    def _train_loader(self, options: dict):
        try:
            return build_loader(self.cfg.data, "train", **options)
        except SplitTooSmall as e:  # the data is fine; the batch size is what cannot be
            raise ConfigError("train.batch_size", f"{e}; lower train.batch_size") from None

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
                            stride_in_1x1=mc.stride_in_1x1, zero_init_residual=mc.zero_init_residual,
                            blurpool=mc.blurpool)
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
            # Compiled here, the module's forward still compiles inside DDP's, so DDPOptimizer cuts its graph at the
            # bucket boundaries and all-reduce overlaps backward as when compiling the wrapper (measured both ways in
            # docs/performance.md); this way Dynamo stays out of DDP's own code, as PyTorch advises.
            model = torch.compile(model)
        # A process group of one rank (the GPU check makes one) gets DDP too: the multi-GPU path at world size 1.
        if self.dist.world_size > 1 or torch.distributed.is_initialized():
            # Buckets fill in reverse layer order while backward runs, so all-reduce overlaps the backward pass;
            # gradients as bucket views save one copy of every gradient.
            model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        return model

    def state_dict(self) -> dict:
        """What the trainer itself owns: its counters and the last validation."""
        return {"step": self.step, "epoch": self.epoch, "images_seen": self.images_seen,
                "nonfinite": self.guard.state_dict(), "last_val": self.last_val}

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
            "preprocessing": preprocessing(self.cfg.data),
            "wandb_id": self.monitor.wandb_id,
        }

    def load_checkpoint_state(self, state: dict, source: Path) -> dict:
        """Restores every part from `state`; returns the config keys this run changes, {key: (old, new)}."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise UserInputError(f"checkpoint {source} has format version {state.get('version')}, "
                                 f"this trainer reads {CHECKPOINT_VERSION}")
        changes = config_changes(state["config"], to_dict(self.cfg))
        saved = resume.saved_split(state)
        kept = saved["batch_size"] * saved["world_size"] * saved["grad_accum"] == self.global_batch
        refused = [k for k in changes if not changeable_on_resume(k, global_batch_kept=kept)]
        if refused:
            listed = ", ".join(f"{k}={changes[k][0]} (now {changes[k][1]})" for k in refused)
            raise ConfigError(refused[0], f"checkpoint {source} was written with {listed}: resuming with a different "
                                          f"value would silently change what the run computes. Set it back, or "
                                          f"use another run.dir to start afresh")
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
        self.last_val = state["last_val"]
        self.guard.load_state_dict(state["nonfinite"])
        self.train_loader.load_state_dict(merge_states(state["loader"]))
        if state["world_size"] == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        else:  # the saved ranks' streams have no counterpart on other ranks
            seed_everything(derive_seed(self.cfg.seed, self.step, self.dist.rank))
        if "optim.lr" in changes:
            self._apply_lr()
        return changes

    def _apply_lr(self) -> None:
        """optim.lr changed on resume: the schedule continues from the current step with the new base lr."""
        base = scaled_lr(self.cfg.optim, self.global_batch)
        self.scheduler.base_lrs = [base] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _init_weights(self) -> None:
        path = self.cfg.model.init_from
        fresh = self._agree(lambda: init_from(self.raw_model, Path(path), self.cfg.model.init_head))
        if self.dist.is_main:
            print(f"model.init_from: weights from {path}" + (f"; {', '.join(fresh)} start afresh" if fresh else ""),
                  flush=True)

    def _resume(self, found, saved_split):
        """Loads the checkpoint `found` on rank 0 (and, on the others, the file it names), then records the config
        in effect; returns the W&B run id to continue."""
        path = distributed.broadcast_from_main(str(found[0]) if found else None, self.dist)
        changes, wandb_id = {}, None
        if path is not None:
            state = found[1] if found else torch.load(path, map_location="cpu", weights_only=True)
            changes = self._agree(lambda: self.load_checkpoint_state(state, Path(path)))
            wandb_id = state["wandb_id"]
        if self.dist.is_main and path is not None:
            if self.cfg.model.init_from:
                print(f"model.init_from={self.cfg.model.init_from} is ignored: {path} resumes the run", flush=True)
            if saved_split["world_size"] != self.dist.world_size:
                print(f"resuming on {self.dist.world_size} process(es) a run saved on {saved_split['world_size']}: "
                      f"the epoch goes on from the same global sample, each remaining image read once; "
                      f"augmentation draws and reduction order differ from an uninterrupted run (exact in "
                      f"coverage, not bitwise)", flush=True)
        if self.dist.is_main:
            for key, (old, new) in changes.items():
                print(f"resuming with {key}={new} (was {old}): applied", flush=True)
            self.run.record_config(to_yaml(self.cfg), changes, self.step)
        return wandb_id

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
                self.monitor.alert("stopped on a signal", f"{self.run_dir}: preempted or cancelled at step "
                                                          f"{self.step}; checkpoint saved, the job can resume")
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
        """Steps through the rest of the current epoch; stops early at the last step or on an agreed signal.

        Nothing here waits for the device except on logging steps and stop-check steps.
        """
        cfg = self.cfg.train
        self.model.train()
        window = Sums(self.device, "loss", "correct", "samples", "data_wait")
        window_start, window_steps = time.perf_counter(), 0
        groups = accumulation_groups(self.train_loader, cfg.grad_accum)
        while True:
            fetch_start = time.perf_counter()
            micro_batches = next(groups, None)
            if micro_batches is None:
                self.epoch += 1
                return EpochEnd.EPOCH
            data_wait = time.perf_counter() - fetch_start
            if self.step == 0:
                self._show_images(micro_batches[0][0])
            loss_sum, correct, samples = self.train_step(micro_batches)
            self.step += 1
            self.images_seen += samples * self.dist.world_size
            window.add(loss=loss_sum, correct=correct, samples=samples, data_wait=data_wait)
            window_steps += 1
            self.monitor.advance()
            last_step = self.step >= self.last_step
            log_step = self.step % self.cfg.monitor.every_steps == 0 or last_step
            stop_check_step = self.step % cfg.stop_check_every == 0
            if log_step or stop_check_step:
                self._check_divergence()
            if log_step:
                self._log_train(window, window_start, window_steps)
                window.reset()
                window_start, window_steps = time.perf_counter(), 0
            if stop_check_step and distributed.any_rank(self.stop.raised, self.dist):
                return EpochEnd.STOP
            if last_step:
                return EpochEnd.LAST_STEP
            self.save()

    def _check_divergence(self) -> None:
        consecutive = int(self.guard.consecutive)
        if consecutive >= self.cfg.train.max_nonfinite_steps:
            message = (f"the loss or gradients were non-finite for {consecutive} consecutive steps (up to step "
                       f"{self.step}); stopping without saving. Lower optim.lr, use train.precision=fp32, or check "
                       f"the data; the last good checkpoint is kept in {self.checkpointer.dir}")
            self.monitor.alert("diverged", message, error=True)
            raise Diverged(message)

    def train_step(self, micro_batches: list) -> tuple:
        """One optimizer step over `micro_batches`; returns (summed loss, correct, samples), the first two as
        device tensors, so that nothing waits for the device here."""
        loss_sum = correct = samples = 0
        self.guard.before_forward()
        for i, (images, labels) in enumerate(micro_batches):
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                with self.autocast():
                    output = self.model(images)
                    loss = self.criterion(output, labels)
                self.scaler.scale(loss / len(micro_batches)).backward()
            loss_sum = loss_sum + loss.detach() * len(labels)
            correct = correct + correct_topk(output.detach(), labels, ks=(1,))[0]
            samples += len(labels)
        self._optimizer_step()
        return loss_sum, correct, samples

    def _gradient_sync(self, last: bool):
        """DDP all-reduces gradients in backward; micro-batches before the last only accumulate locally."""
        if last or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _optimizer_step(self) -> None:
        """Applies the update unless the gradients are non-finite, decided on the device (self.guard.skipped)."""
        self.scaler.unscale_(self.optimizer)  # fp16 only; the check below then sees the true gradients
        # Gradients are all-reduced, so every rank sees the same norm and takes the same decision.
        skipped = self.guard.check(self.raw_model.parameters())
        if not self.scaler.is_enabled():
            self.optimizer.found_inf = skipped  # read by the fused SGD step, which then changes nothing
        self.scaler.step(self.optimizer)  # fp16: GradScaler skips on its own found_inf and lowers the scale
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.guard.after_step()
        if self.ema:
            self.ema.update_parameters(self.raw_model)

    def _show_images(self, train_images: torch.Tensor) -> None:
        """Shows on W&B what the model is fed: the first augmented train batch and a val batch."""
        if not self.monitor.wants_images:
            return
        data = self.cfg.data
        val_images = next(iter(self.val_loader), (None,))[0]
        for split, images in (("train", train_images), ("val", val_images)):
            if images is not None:
                self.monitor.images(split, self.step, images, data.mean, data.std)

    def _log_train(self, window: Sums, start: float, steps: int) -> None:
        sums = window.reduce()
        slowest_wait = window.max_over_ranks("data_wait")
        elapsed = time.perf_counter() - start
        if self.device.type == "cuda":
            memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.monitor.write("train", self.step, self.step / self.steps_per_epoch, self.images_seen, {
            "loss": sums["loss"] / sums["samples"], "top1": 100 * sums["correct"] / sums["samples"],
            "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": sums["samples"] / elapsed,
            "img_per_s_per_device": sums["samples"] / (elapsed * self.dist.world_size),
            "data_wait": sums["data_wait"] / (elapsed * self.dist.world_size), "data_wait_max": slowest_wait / elapsed,
            "step_time_s": elapsed / steps,
            "max_mem_mb": memory_mb, "nonfinite_steps": int(self.guard.total)})

    def validate(self) -> None:
        """Evaluates the model (and its EMA) on the val split and logs the result: the weights the checkpoint of
        this step holds, on every rank (training continues from rank 0's BN statistics anyway)."""
        distributed.broadcast_buffers(self.raw_model, self.dist)
        if self.ema:
            distributed.broadcast_buffers(self.ema.module, self.dist)
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
        self.monitor.alert("finished", f"{self.run_dir}: step {self.step}, val top1 {v['top1']:.2f}%")
