"""The training loop: the one place the order of a training step and of an epoch's end is written.

A step: learning rate for the step → the batch prepared (views) → forward under autocast →
:meth:`StepGuard.vote` (the one host sync: finite loss? preemption?) → backward and optimizer
step, or a skipped step with the module's buffers restored → ``after_step`` (EMA, queues) → a log
record. An epoch's end: mean loss over ranks, the epoch monitors (collapse statistics, online
kNN), the collapse check, a log record, a checkpoint. Any job that can build a
:class:`~barlow.training.setup.Run` trains with it: pretraining, and fine-tuning on labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from barlow import checkpoint, cpu_share, distributed
from barlow.logbook import Logbook, Progress, console
from barlow.losses import finite_checks_by_caller
from barlow.methods.base import StepOutput
from barlow.preemption import Preempted, requeue_slurm_job
from barlow.rundir import RunDir
from barlow.training.guard import StepGuard
from barlow.training.memory import peak_memory_mib
from barlow.training.online_probe import OnlineLinearProbe
from barlow.training.setup import Run
from barlow.training.state import CHECKPOINT_KEYS, TrainState

# Called at each epoch's end with (epoch, is_last, the last prepared batch); returns metrics.
EpochMonitor = Callable[[int, bool, Any], dict[str, Any]]


class TrainingLoop:
    """Trains ``run`` from ``state`` to ``train.epochs`` (or ``train.max_steps``), writing
    checkpoints into ``run_dir`` and records into ``logbook`` (main process only)."""

    def __init__(
        self,
        run: Run,
        run_dir: RunDir,
        state: TrainState,
        *,
        guard: StepGuard,
        logbook: Logbook,
        progress: Progress,
        monitors: Sequence[EpochMonitor] = (),
        last_saved: str | None = None,
        run_record: Mapping[str, Any] | None = None,
        on_first_save: Callable[[], RunDir] | None = None,
        probe: OnlineLinearProbe | None = None,
    ) -> None:
        self.run, self.run_dir, self.state, self.guard = run, run_dir, state, guard
        # after the first checkpoint is written: the run directory to write into from then on
        # (an --overwrite run swaps itself in from its staging directory)
        self.on_first_save = on_first_save
        self.logbook, self.progress, self.monitors = logbook, progress, monitors
        self.last_saved = last_saved or "none yet"
        self.run_record = run_record  # config.json, rewritten with every checkpoint
        self.probe = probe  # the online linear classifier, trained on each step's features
        self.train = run.cfg.train
        self.after_step = getattr(run.module, "after_step", None)
        self.begin_epoch()

    def begin_epoch(self) -> None:
        """Start the epoch's clock and its loss sum (``run_epoch`` calls it); a resumed epoch's
        sum starts from the checkpoint's (``state.epoch_loss``)."""
        self.epoch_start, self.steps_done = time.perf_counter(), 0
        total, self.loss_steps = self.state.epoch_loss
        self.loss_sum = torch.tensor(total, dtype=torch.float32, device=self.run.device)

    def fit(self) -> dict[str, Any]:
        """Train to the end (or a stop); the last epoch's metrics. Raises Preempted after saving
        on a preemption signal, NonFiniteLossError / CollapseError when the guard stops."""
        metrics: dict[str, Any] = {}
        while not self.finished():
            epoch = self.state.epoch
            if not self.run_epoch(epoch):
                break  # stopped mid-epoch by train.max_steps (saved)
            metrics = self.end_of_epoch(epoch)
        return metrics

    def finished(self) -> bool:
        return self.state.finished(self.train.epochs, self.train.max_steps)

    def run_epoch(self, epoch: int) -> bool:
        """Train one epoch from ``state.step_in_epoch``; False when stopped before its end."""
        run, first = self.run, self.state.step_in_epoch
        run.order.set_epoch(epoch, start_batch=first)
        run.model.train()
        self.begin_epoch()
        description = f"epoch {epoch + 1}/{self.train.epochs}"
        batches = self.progress.wrap(run.loader, total=len(run.loader), description=description)
        for i, (inputs, labels, dropped) in enumerate(batches, start=first):
            where = f"batch {i + 1} of epoch {epoch + 1}"
            inputs = self.guard.usable_batch(inputs, dropped, where=where)
            preempt = self.step(inputs, epoch, i, labels)
            self.state.step_in_epoch = i + 1
            self.log_step(epoch, i, first, description)
            if self.stop_mid_epoch(preempt, i):
                return False
        self.state.epoch, self.state.step_in_epoch = epoch + 1, 0
        self.state.epoch_loss = (0.0, 0)
        return True

    def step(self, inputs: Any, epoch: int, batch: int, labels: Tensor | None = None) -> bool:
        """One training step on a loader batch; True when a preemption signal asks to stop."""
        run, guard = self.run, self.guard
        cpu_share.tick()
        self.lr = run.schedule.apply(run.optimizer, self.state.global_step)
        self.last_inputs = run.prepare(inputs, epoch, batch)
        # a skipped step must not leave what its forward did to BatchNorm statistics or queues
        buffers = [b.detach().clone() for b in run.module.buffers()] if guard.may_skip else None
        if self.probe is not None:
            self.probe.arm()
        with finite_checks_by_caller(), run.precision.autocast(run.device):
            self.output: StepOutput = run.model(self.last_inputs)
        loss = self.output.loss
        verdict = guard.vote(loss)
        run.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        if verdict.nonfinite:
            self.skip(loss, epoch, buffers)
            if self.probe is not None:
                self.probe.discard()
        else:
            run.scaler.scale(loss).backward()
            run.scaler.step(run.optimizer)
            run.scaler.update()
            self.loss_sum += loss.detach()
            self.steps_done += 1
            self.loss_steps += 1
            if self.after_step is not None:
                self.after_step(self.state.global_step / run.schedule.total_steps)
            if self.probe is not None and labels is not None:
                self.probe.update(labels)
        return verdict.preempt

    def skip(self, loss: Tensor, epoch: int, buffers: list[Tensor] | None) -> None:
        step = self.state.global_step - 1
        message = self.guard.skip_nonfinite(
            loss, self.output.logs, step=step, epoch=epoch, last_saved=self.last_saved
        )
        if buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(self.run.module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        if distributed.is_main_process():
            console(message)
        self.logbook.write({"skipped_nonfinite": self.guard.skipped}, step=step)

    def log_step(self, epoch: int, i: int, first: int, description: str) -> None:
        steps_per_epoch, step = self.run.steps_per_epoch, self.state.global_step
        if step % self.train.log_every and i != steps_per_epoch - 1:
            return
        elapsed = time.perf_counter() - self.epoch_start
        fields = {
            "epoch": epoch + (i + 1) / steps_per_epoch,
            "loss": self.output.loss.detach(),
            **self.output.logs,
            "lr": self.lr,
            "images_per_s": (i + 1 - first) * self.train.batch_size / max(elapsed, 1e-9),
        }
        self.logbook.write(fields, step=step)
        self.progress.update(i + 1, steps_per_epoch, description, fields)

    def stop_mid_epoch(self, preempt: bool, i: int) -> bool:
        """Save and stop inside an epoch on a preemption signal or at ``train.max_steps``."""
        max_steps = self.train.max_steps
        out_of_steps = max_steps is not None and self.state.global_step >= max_steps
        if not (preempt or out_of_steps) or i + 1 >= self.run.steps_per_epoch:
            return False
        self.save()  # mid-epoch: the resume skips the batches done
        if preempt:
            signals = self.guard.signals
            if distributed.is_main_process():
                console(
                    f"{signals.signal_name or 'preemption signal'}: saved "
                    f"{self.run_dir.checkpoint} at epoch {self.state.epoch + 1}, batch {i + 1} "
                    f"(step {self.state.global_step}); continue with --resume"
                )
                if self.train.requeue and not signals.interrupted:  # Ctrl-C is the user's stop
                    requeue_slurm_job()
            distributed.barrier()
            stopped = "interrupted" if signals.interrupted else "preempted"
            raise Preempted(f"{stopped} at step {self.state.global_step}", signals.exit_code)
        return True

    def end_of_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's record, the monitors, the collapse check, the checkpoint."""
        epoch_time = time.perf_counter() - self.epoch_start
        mean_loss = distributed.all_reduce_mean(self.loss_sum / max(self.loss_steps, 1))
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": float(mean_loss),
            "epoch_time_s": epoch_time,
            "images_per_s": self.steps_done * self.train.batch_size / epoch_time,
            "peak_memory_mib": peak_memory_mib(self.run.device),
            "threads": torch.get_num_threads(),  # intra-op threads at the end (cpu_share)
        }
        if self.run.cfg.data.start_crop_size is not None:  # progressive resolution: the side
            metrics["crop_size"] = int(self.last_inputs[0].shape[-1])
        is_last = self.finished()
        if self.probe is not None:  # identical on every rank: trained on the global batch
            metrics["online_linear_train_top1"] = self.probe.train_accuracy()
        for monitor in self.monitors:
            metrics.update(monitor(epoch, is_last, self.last_inputs))
        if self.guard.corrupt is not None:
            metrics["corrupt_skipped"] = self.guard.corrupt.collect()
            metrics["corrupt_skipped_total"] = self.guard.corrupt.total
        self.guard.check_collapse(metrics, epoch)
        self.logbook.write(metrics, step=self.state.global_step, prefix="epoch")
        if distributed.is_main_process():
            console(epoch_line(metrics, self.train.epochs, self.guard.corrupt is not None))
        if (epoch + 1) % self.train.checkpoint_every == 0 or is_last:
            self.save()
            self.last_saved = f"{self.run_dir.checkpoint} (epoch {epoch + 1})"
        distributed.barrier()
        return metrics

    def save(self) -> None:
        """Checkpoint the state (collective; the main process writes, then keeps snapshots)."""
        run = self.run
        if self.state.step_in_epoch:  # mid-epoch: the epoch's loss so far goes along
            self.state.epoch_loss = (float(self.loss_sum), self.loss_steps)
        extras = {"online_probe": self.probe.state_dict()} if self.probe is not None else {}
        payload = self.state.to_checkpoint(
            config=run.cfg.to_dict(),
            module=run.module,
            optimizer=run.optimizer,
            scaler=run.scaler,
            extras=extras,
        )
        if payload is None:
            return
        checkpoint.save_checkpoint(payload, self.run_dir.checkpoint)
        checkpoint.retain(
            self.run_dir.path, keep_last=self.train.keep_last, required_keys=CHECKPOINT_KEYS
        )
        if self.run_record is not None:  # the config of the run that wrote the checkpoint
            self.run_dir.write_config(self.run_record)
        if self.on_first_save is not None:
            self.run_dir, self.on_first_save = self.on_first_save(), None


def epoch_line(metrics: dict[str, Any], epochs: int, corrupt: bool) -> str:
    """The console line of an epoch."""
    knn = f", kNN {100 * metrics['knn_top1']:.1f} %" if "knn_top1" in metrics else ""
    if "online_linear_top1" in metrics:
        knn += f", online linear {100 * metrics['online_linear_top1']:.1f} %"
    skipped = f", {metrics['corrupt_skipped']} corrupt image(s) skipped" if corrupt else ""
    return (
        f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.4g}, "
        f"{metrics['epoch_time_s']:.1f} s, {metrics['images_per_s']:.0f} images/s{knn}{skipped}"
    )
