"""The training loop: `train()` is the schedule, `train_one_epoch()` the steps, `train_step()` one update.

The Trainer reads top to bottom in the order a run happens: building the parts, the run's state (its stateful
parts, which a checkpoint is the union of, and the resume), the schedule, the step, and what it reports. The pieces
with a life of their own live beside it: checkpoint (snapshot, restore, the files), resume (its rules), run_model
(the net and its wrappers), run_dir, nonfinite, evaluate, monitor, optim.
"""
import contextlib
import enum
import itertools
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from common import log as run_log
from common.errors import ConfigError, Diverged, SplitTooSmall
from common.log import log
from data.build import build_loader, ensure_demo_data, merge_states
from data.config import preprocessing
from data.resolution import train_sides
from data.sharding import derive_seed
from trainer import checkpoint, distributed, resume, run_model
from trainer.accuracy import Sums, correct_topk
from trainer.checkpoint import Checkpointer, PerRank
from trainer.config import Config, loader_options, to_dict, to_yaml
from trainer.distributed import Dist
from trainer.evaluate import evaluate
from trainer.mix import BatchMix
from trainer.models.weights import init_from
from trainer.monitor import Monitor, peak_memory_mb
from trainer.nonfinite import NonFiniteGuard
from trainer.optim import build_ema, build_optimizer, build_scheduler, large_batch_warning, scaled_lr
from trainer.precision import autocast
from trainer.preemption import StopFlag
from trainer.resume import CHECKPOINT_VERSION
from trainer.rng import rng_state, seed_everything, set_rng_state
from trainer.run_dir import RunDir


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

    # What state_dict() holds: the trainer's own counters, and the facts of the run a resume checks (resume.check).
    STATE_KEYS = ("version", "step", "epoch", "images_seen", "last_val", "world_size", "classes", "config",
                  "preprocessing", "wandb_id")
    # Attributes with a state_dict() that a checkpoint leaves out on purpose: built anew from the config and the
    # parts (`model` wraps raw_model; the val loader has no position; the checkpointer and monitor are the run's
    # machinery, not its state).
    NOT_CHECKPOINTED = ("model", "val_loader", "criterion")

    def __init__(self, cfg: Config, d: Dist):
        self.cfg, self.dist, self.device = cfg, d, d.device
        self.run_dir = Path(cfg.run.dir)
        # Installed when training starts: worker pools forked during setup must keep the default SIGTERM.
        self.stop = StopFlag()
        self.started = time.perf_counter()
        self.step = self.epoch = self.images_seen = 0
        self.last_val = {}
        self.monitor = self._log_file = None
        run_log.setup(d.rank)
        self.run = RunDir(self.run_dir)
        self._on_main(self.run.open)  # before anything is written there: one job per run dir
        try:
            self._log_file = run_log.to_file(self.run.logs, d.rank)
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, d = self.cfg, self.dist
        run_model.configure_torch(cfg)
        self._on_main(lambda: ensure_demo_data(cfg.data))
        self.checkpointer = Checkpointer(self.run.checkpoints, cfg.checkpoint.keep, cfg.checkpoint.every_steps, d)
        # Found first: a resume on another world size sizes the loaders' batches from it.
        found = self._on_main(self.checkpointer.load_latest)
        saved_split = distributed.broadcast_from_main(found and resume.saved_split(found[1]), d)
        cfg.train.batch_size, cfg.train.grad_accum = self._agree(lambda: resume.keep_global_batch(
            saved_split, cfg.train.batch_size, cfg.train.grad_accum, d.world_size))
        self.train_loader, self.val_loader = self._build_loaders()
        self.classes = list(self.train_loader.classes)
        self.train_side = train_sides(cfg.data, cfg.train.epochs)  # epoch -> the train crop's side
        self._size_schedule()

        self.raw_model = run_model.build(cfg, len(self.classes), d)
        if saved_split is None and cfg.model.init_from:
            self._init_weights()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.mix = (BatchMix(cfg.train.mixup_alpha, cfg.train.cutmix_alpha, self.raw_model.fc.out_features)
                    if cfg.train.mixup_alpha or cfg.train.cutmix_alpha else None)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, scaled_lr(cfg.optim, self.global_batch))
        if d.is_main and (warning := large_batch_warning(cfg.optim, self.global_batch)):
            log.warning(warning)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.steps_per_epoch, self.total_steps)
        # Disabled outside fp16: scale() and update() are then no-ops and step() is optimizer.step().
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.guard = NonFiniteGuard(self.raw_model, self.device)
        self.ema = build_ema(self.raw_model, cfg.optim.ema_decay, self.guard.skipped) if cfg.optim.ema_decay else None

        wandb_id = self._resume(found, saved_split)
        self.model = run_model.wrap(self.raw_model, cfg, d)
        self.monitor = Monitor(cfg.monitor, self.run_dir, d.is_main, total_steps=self.last_step,
                               start_step=self.step, config=to_dict(cfg), wandb_id=wandb_id)
        log.info(f"run dir: {self.run_dir.resolve()}  ({d.world_size} process(es) on {self.device.type}, "
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
        if self._log_file is not None:
            run_log.remove(self._log_file)
            self._log_file = None
        self.run.close()

    def _agree(self, fn):
        return distributed.agree(fn, self.dist)

    def _on_main(self, fn):
        return self._agree(lambda: fn() if self.dist.is_main else None)

    def _build_loaders(self) -> tuple:
        options = loader_options(self.cfg, self.dist)
        return (self._agree(lambda: self._train_loader(options)),
                self._agree(lambda: build_loader(self.cfg.data, "val", **options)))

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

    def state_dict(self) -> dict:
        """What the trainer itself owns: its counters and the last validation, and the facts of the run."""
        return {"version": CHECKPOINT_VERSION, "step": self.step, "epoch": self.epoch,
                "images_seen": self.images_seen, "last_val": self.last_val, "world_size": self.dist.world_size,
                "classes": self.classes, "config": to_dict(self.cfg), "preprocessing": preprocessing(self.cfg.data),
                "wandb_id": self.monitor.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        """The counters; the facts were checked before anything was restored (resume.check)."""
        self.step, self.epoch, self.images_seen = state["step"], state["epoch"], state["images_seen"]
        self.last_val = state["last_val"]

    def stateful_parts(self) -> dict:
        """Everything a checkpoint holds and a resume restores, by name, in the order they are restored: adding a
        part is one line here. None stands for a part this run does not have (a disabled scaler, no EMA)."""
        loader, d = self.train_loader, self.dist
        return {
            "trainer": self, "model": self.raw_model, "optimizer": self.optimizer, "scheduler": self.scheduler,
            "scaler": self.scaler if self.scaler.is_enabled() else None, "ema": self.ema, "nonfinite": self.guard,
            "loader": PerRank(loader.state_dict, lambda states: loader.load_state_dict(merge_states(states)), d),
            "rng": PerRank(lambda: rng_state(self.device), self._restore_rng, d),
        }

    def _restore_rng(self, states: list) -> None:
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank], self.device, self.dist.rank)
        else:  # the saved ranks' streams have no counterpart on other ranks
            seed_everything(derive_seed(self.cfg.seed, self.step, self.dist.rank))

    def load_checkpoint(self, state: dict, source: Path) -> dict:
        """Checks `state` against this run and restores every part; returns the config keys this run changes,
        {key: (old, new)}."""
        changes = resume.check(state, to_dict(self.cfg), self.classes, self.global_batch, source)
        checkpoint.restore(self.stateful_parts(), state, source)
        if "optim.lr" in changes:
            resume.apply_lr(self.optimizer, self.scheduler, scaled_lr(self.cfg.optim, self.global_batch))
        return changes

    def _init_weights(self) -> None:
        path = self.cfg.model.init_from
        fresh = self._agree(lambda: init_from(self.raw_model, Path(path), self.cfg.model.init_head))
        if self.dist.is_main:
            log.info(f"model.init_from: weights from {path}" + (f"; {', '.join(fresh)} start afresh" if fresh else ""))

    def _resume(self, found, saved_split):
        """Loads the checkpoint `found` on rank 0 (and, on the others, the file it names), then records the config
        in effect; returns the W&B run id to continue."""
        path = distributed.broadcast_from_main(str(found[0]) if found else None, self.dist)
        changes, wandb_id = {}, None
        if path is not None:
            state = found[1] if found else torch.load(path, map_location="cpu", weights_only=True)
            changes = self._agree(lambda: self.load_checkpoint(state, Path(path)))
            wandb_id = state["wandb_id"]
        if self.dist.is_main:
            for line in resume.notes(path, saved_split, self.dist.world_size, self.cfg.model.init_from, changes):
                log.info(line)
            self.run.record_config(to_yaml(self.cfg), changes, self.step)
        return wandb_id

    def save(self, **when) -> None:
        """Saves if the checkpointer's cadence says so (see Checkpointer.save for `when`)."""
        self.checkpointer.save(self.step, lambda: checkpoint.snapshot(self.stateful_parts()), **when)

    def train(self) -> int:
        """The schedule: epochs of steps, validation every train.eval_every_epochs and at the end, a checkpoint
        at every epoch end; returns the process exit code."""
        self.stop.install()
        if self.dist.is_main:
            self.run.write_classes(self.classes)
        trained_from, train_time = self.step, 0.0
        while self.step < self.last_step:
            epoch_start = time.perf_counter()
            end = self.train_one_epoch()
            train_time += time.perf_counter() - epoch_start
            if end is EpochEnd.STOP:
                self.save(force=True)
                log.info(f"stopping on a signal at step {self.step}; checkpoint saved")
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
        log.info(f"epoch {self.epoch}: the train crop is {self.train_side(self.epoch)} px")
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
            targets = labels
            if self.mix:
                images, targets = self.mix(images, labels, derive_seed(self.cfg.seed, self.step, i, self.dist.rank))
            with self._gradient_sync(last=i == len(micro_batches) - 1):
                with autocast(self.device, self.cfg.train.precision):
                    output = self.model(images)
                    loss = self.criterion(output, targets)
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
        self.monitor.write("train", self.step, self.step / self.steps_per_epoch, self.images_seen, {
            "loss": sums["loss"] / sums["samples"], "top1": 100 * sums["correct"] / sums["samples"],
            "lr": self.optimizer.param_groups[0]["lr"], "img_per_s": sums["samples"] / elapsed,
            "img_per_s_per_device": sums["samples"] / (elapsed * self.dist.world_size),
            "data_wait": sums["data_wait"] / (elapsed * self.dist.world_size), "data_wait_max": slowest_wait / elapsed,
            "step_time_s": elapsed / steps, "resolution": self.train_side(self.epoch),
            **peak_memory_mb(self.device), "nonfinite_steps": int(self.guard.total)})

    def validate(self) -> None:
        """Evaluates the model (and its EMA) on the val split and logs the result: the weights the checkpoint of
        this step holds, on every rank (training continues from rank 0's BN statistics anyway)."""
        distributed.broadcast_buffers(self.raw_model, self.dist)
        if self.ema:
            distributed.broadcast_buffers(self.ema.module, self.dist)
        epoch = self.step / self.steps_per_epoch
        precision, flip = self.cfg.train.precision, self.cfg.train.eval_flip
        metrics = evaluate(self.raw_model, self.val_loader, self.device, precision, flip)
        self.monitor.write("val", self.step, epoch, self.images_seen, metrics)
        self.last_val = {**metrics, "step": self.step}
        if self.ema:
            ema_metrics = evaluate(self.ema.module, self.val_loader, self.device, precision, flip)
            self.monitor.write("val_ema", self.step, epoch, self.images_seen, ema_metrics)

    def _summary(self, images: int, train_time: float) -> None:
        v = self.last_val
        where = self.monitor.wandb_where
        log.info(
            f"done: step {self.step}, epoch {self.step / self.steps_per_epoch:.2f}: val top1 {v['top1']:.2f}% "
            f"top5 {v['top5']:.2f}% loss {v['loss']:.4f} on {v['samples']} images | "
            f"wall {time.perf_counter() - self.started:.0f} s, train {images / max(train_time, 1e-9):.1f} img/s | "
            f"checkpoints {self.checkpointer.dir}, metrics {self.run.metrics}"
            + (f", W&B {where}" if where else ", W&B off"))
        self.monitor.alert("finished", f"{self.run_dir}: step {self.step}, val top1 {v['top1']:.2f}%")
