"""``pretrain(cfg, out)``: self-supervised pretraining, from a config to a run directory."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from barlow import __version__, checkpoint, cpu_share, distributed, insight
from barlow.assessment import EvalData, final_evaluation, online_knn
from barlow.compute import flush_denormals
from barlow.config import Config
from barlow.encoder import weightless_settings
from barlow.evaluate import write_metrics
from barlow.health import embedding_health
from barlow.logbook import Logbook, Progress, console
from barlow.methods import Method
from barlow.preemption import PreemptionSignals
from barlow.rundir import Replacement, RunDir, recover_replacement, run_lock
from barlow.training import resume as resuming
from barlow.training.guard import StepGuard
from barlow.training.loop import EpochMonitor, TrainingLoop
from barlow.training.memory import MemoryEstimate, is_out_of_memory, oom_message
from barlow.training.online_probe import OnlineLinearProbe, build_online_probe
from barlow.training.setup import Run, build_pretraining_run, init_device
from barlow.training.state import TrainState


def pretrain(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    argv: Sequence[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pretrain an encoder with ``cfg.method`` and write everything under ``out_dir``.

    Writes ``config.json``, ``metrics.jsonl`` (a record per logged step and per epoch),
    ``tensorboard/``, ``checkpoint.pt`` (atomically, every ``checkpoint_every`` epochs and at the
    end), ``backbone.safetensors`` and, when the data is labelled, ``metrics.json`` with the final
    kNN / linear accuracy. Returns the final metrics. The main process holds the directory's
    lock (``rundir.run_lock``) throughout: a second run into it is refused at once.
    """
    run_dir, device = RunDir(Path(out_dir)), init_device(cfg)
    main = distributed.is_main_process()
    if main and resume:
        resuming.check_resume_target(run_dir)  # before the lock creates the directory
    lock = run_lock(run_dir) if main else contextlib.nullcontext()
    with lock, cpu_share.shared_cpu(cfg.train.threads):
        return run_pretraining(cfg, run_dir, device, resume, overwrite, argv, progress)


def run_pretraining(
    cfg: Config,
    run_dir: RunDir,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    argv: Sequence[str] | None,
    progress: bool | None,
) -> dict[str, Any]:
    """:func:`pretrain` once its run directory is locked (on the main process). ``--overwrite``
    of a directory holding a run trains into a staging directory until the first checkpoint
    (``rundir.Replacement``): a new run that fails before leaves the old one as it was."""
    main = distributed.is_main_process()
    if main and (recovered := recover_replacement(run_dir)):
        console(recovered)
    point = resuming.find_resume_point(run_dir, cfg, resume=resume, overwrite=overwrite)
    run, estimate = build_with_memory_advice(cfg, device, point, run_dir)
    state = resuming.restored_state(run, point)
    show = main and (progress if progress is not None else True)
    if state.finished(
        cfg.train.epochs, cfg.train.max_steps
    ):  # a re-run: completes what a kill left unwritten, else a no-op
        method = cast(Method, run.module)
        return complete_outputs(method, cfg, run_dir, state, device=device, progress=show)
    replacement = Replacement(run_dir) if main and overwrite and run_dir.run_entries() else None
    try:
        return train_and_export(run, estimate, state, point, run_dir, replacement, argv, show)
    except BaseException:
        if replacement is not None:
            replacement.abandon()  # the old run stays; nothing of the new one is left
        raise


def train_and_export(
    run: Run,
    estimate: MemoryEstimate,
    state: TrainState,
    point: resuming.ResumePoint | None,
    run_dir: RunDir,
    replacement: Replacement | None,
    argv: Sequence[str] | None,
    progress: bool,
) -> dict[str, Any]:
    """Train to the end, then export the backbone and evaluate; the results."""
    cfg, method, main = run.cfg, cast(Method, run.module), distributed.is_main_process()
    write_dir = replacement.begin() if replacement is not None else run_dir
    record = {"config": cfg.to_dict(), "argv": list(argv or sys.argv), "version": __version__}
    logbook = Logbook.for_run(write_dir.path, cfg, enabled=main)  # wandb may fail: first
    if main and state.global_step == 0:  # a resume rewrites it with its first checkpoint
        write_dir.write_config(record)
    signals = PreemptionSignals()

    def swap_in() -> RunDir:  # the staged run has its first checkpoint: it replaces the old one
        assert replacement is not None
        logbook.close()
        replacement.commit()
        logbook.open(run_dir.path)
        console(f"--overwrite: the new run wrote its first checkpoint; it replaced {run_dir.path}")
        return run_dir

    probe = online_probe(run, point)
    with signals, contextlib.closing(logbook), flush_denormals(run.device):
        guard = StepGuard.from_config(cfg, device=run.device, signals=signals)
        loop = TrainingLoop(
            run,
            write_dir,
            state,
            guard=guard,
            logbook=logbook,
            progress=Progress(enabled=progress),
            monitors=pretraining_monitors(
                method, cfg, run.device, probe, insight=insight.insight_monitor(run, logbook, state)
            ),
            last_saved=None if point is None or point.weights_only else str(point.path),
            run_record=record,
            on_first_save=swap_in if replacement is not None else None,
            probe=probe,
        )
        epoch_metrics = fit_with_memory_advice(loop, estimate)
    if probe is not None:
        probe.detach()
    results = {"pretrain": epoch_metrics, **corrupt_report(guard)}
    if main:
        out = loop.run_dir  # the run directory itself once an --overwrite run swapped in
        export_and_evaluate(method, cfg, out, results, device=run.device, progress=progress)
    distributed.barrier()
    return results


def complete_outputs(
    method: Method,
    cfg: Config,
    run_dir: RunDir,
    state: TrainState,
    *,
    device: torch.device,
    progress: bool,
) -> dict[str, Any]:
    """A re-run of a finished run: a no-op (no step, no log, no file rewritten) when its outputs
    exist; else what a kill during the export or the final evaluation left unwritten, made now
    from the last checkpoint. Returns the run's saved results."""
    main = distributed.is_main_process()
    missing = run_dir.missing_outputs(final_evaluation=cfg.eval.final) if main else []
    if main and not missing:
        console(f"{run_dir.path} already finished at step {state.global_step}: nothing to do")
    elif main:
        console(
            f"{run_dir.path} finished training at step {state.global_step}; writing what is "
            f"missing: {', '.join(path.name for path in missing)}"
        )
        run_dir.remove_stale_temps()
        results = {"pretrain": run_dir.last_epoch_record()}
        export_and_evaluate(
            method, cfg, run_dir, results, device=device, progress=progress, only=missing
        )
    distributed.barrier()
    saved = run_dir.metrics
    return dict(json.loads(saved.read_text())) if saved.is_file() else {}


def online_probe(run: Run, point: resuming.ResumePoint | None) -> OnlineLinearProbe | None:
    """The online linear classifier (``eval.online_linear``, labelled data), its state taken
    from the checkpoint a run resumes from."""
    method = cast(Method, run.module)
    probe = build_online_probe(run.cfg, method.backbone, run.images, run.device)
    if probe is not None and point is not None and not point.weights_only:
        saved = point.state.get("online_probe")
        if saved is not None:  # absent: a checkpoint from before it, or from a run without it
            probe.load_state_dict(saved)
    return probe


def pretraining_monitors(
    method: Method,
    cfg: Config,
    device: torch.device,
    probe: OnlineLinearProbe | None = None,
    *,
    insight: EpochMonitor | None = None,
) -> list[EpochMonitor]:
    """Each epoch: the collapse statistics of the last batch's features; every
    ``eval.online_knn_every`` epochs and at the last, the kNN accuracy and the online linear
    classifier's test accuracy (main process), and ``insight`` (``barlow.insight``'s record of
    the probe batch, main process) when given."""

    def health(epoch: int, is_last: bool, views: Any) -> dict[str, Any]:
        was_training = method.training
        method.eval()
        with torch.no_grad():
            features = method.embed(views[0]).float()
        method.train(was_training)
        return dict(embedding_health(features))

    monitors: list[EpochMonitor] = [health] if insight is None else [health, insight]
    every = cfg.eval.online_knn_every
    if not (distributed.is_main_process() and every):
        return monitors
    try:
        eval_data = EvalData.from_config(cfg)
    except (FileNotFoundError, ValueError) as exc:
        console(f"no online kNN: {exc}")
        return monitors

    def knn(epoch: int, is_last: bool, views: Any) -> dict[str, Any]:
        if (epoch + 1) % every and not is_last:
            return {}
        classifier = probe.test_accuracy if probe is not None else None
        return dict(online_knn(method.backbone, eval_data, cfg, device, classifier))

    return [*monitors, knn]


def fit_with_memory_advice(loop: TrainingLoop, estimate: MemoryEstimate) -> dict[str, Any]:
    """``loop.fit()``; out of memory, the error says what to shrink (checkpoints stay intact)."""
    try:
        return loop.fit()
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        where = f"at step {loop.state.global_step} (epoch {loop.state.epoch + 1})"
        message = oom_message(
            loop.run.cfg,
            world=distributed.world_size(),
            where=where,
            last_saved=loop.last_saved,
            estimate=estimate.summary(),
        )
        raise torch.OutOfMemoryError(message) from error


def build_with_memory_advice(
    cfg: Config, device: torch.device, point: resuming.ResumePoint | None, run_dir: RunDir
) -> tuple[Run, MemoryEstimate]:
    """:func:`build_pretraining_run`; out of memory, the error says what to shrink."""
    try:
        return build_pretraining_run(cfg, device, point, run_dir)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        where = "building the model and its data"
        last = str(point.path) if point is not None else None
        message = oom_message(
            cfg, world=distributed.world_size(), where=where, last_saved=last, estimate=None
        )
        raise torch.OutOfMemoryError(message) from error


def corrupt_report(guard: StepGuard) -> dict[str, Any]:
    """The corrupt images skipped in this run (``data.skip_corrupt``; collective)."""
    if guard.corrupt is None:
        return {}
    guard.corrupt.collect()  # from an epoch cut short by train.max_steps
    if distributed.is_main_process():
        console(guard.corrupt.summary())
    return {"corrupt_skipped": {"total": guard.corrupt.total, "files": sorted(guard.corrupt.files)}}


def export_and_evaluate(
    method: Method,
    cfg: Config,
    run_dir: RunDir,
    results: dict[str, Any],
    *,
    device: torch.device,
    progress: bool,
    only: Sequence[Path] | None = None,
) -> None:
    """Write ``backbone.safetensors``; with ``eval.final``, evaluate into ``metrics.json``
    (``only``: just those of the two files)."""
    if only is None or run_dir.backbone in only:
        record = weightless_settings(cfg)
        checkpoint.export_backbone(method.backbone.state_dict(), run_dir.backbone, metadata=record)
    if cfg.eval.final and (only is None or run_dir.metrics in only):
        results.update(final_evaluation(method, cfg, device=device, progress=progress))
        write_metrics(run_dir.metrics, results)
