"""The trainer's per-epoch jobs, one Ignite handler each (MONAI's idiom: ``handler.attach(engine)``).

:class:`volad.engine.trainer.Trainer` builds one :class:`StageRun` per training stage
and attaches, in this order (Ignite calls the handlers of an event in the order they
were attached, and each job needs what the ones before it did):

* :class:`LearningRateSchedule`: the cosine decay of each step's learning rate;
* :class:`EpochStatistics`: the progress bar, the mean losses, the epoch's seconds and
  training CPU time, and the sums the method keeps over the data, reduced over processes;
* :class:`CpuBudget` (per step): weight snapshots as training CPU time passes each mark;
* :class:`ValidationUnderEMA`: val AUPRC every ``val_interval`` epochs of the final stage,
  on the averaged weights when ``ema_decay`` is set, with batch-norm statistics recomputed
  first when ``precise_bn_batches`` is set (:mod:`volad.engine.precise_bn`);
* :class:`LossHistory` (record): the epoch's row in the run's history;
* :class:`Checkpoints`: ``best.pt`` on a new best (or the average of the best few epochs), then ``last.pt``;
* :class:`CpuBudget` (per epoch): ends the final stage once the budget is spent;
* :class:`LossHistory` (plot): ``training.png`` where the curve changed;
* :class:`EpochReport`: the epoch's one line.

Each reads and writes the epoch's figures in ``engine.state`` (``metrics``,
``epoch_stats``, ``notes``), so handlers given by the user (MONAI's
``MLFlowHandler``), attached after these, see the mean losses and val AUPRC.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ignite.engine import Engine, Events
from tqdm.auto import tqdm

from volad.data.views import set_epoch
from volad.engine.ema import WeightAverage
from volad.engine.precise_bn import PreciseBatchNorm
from volad.utils import distributed


def engine_state(engine: Engine) -> dict[str, int]:
    """The part of an Ignite engine's state that a resumed run needs."""
    return {"epoch": engine.state.epoch, "iteration": engine.state.iteration, "epoch_length": engine.state.epoch_length}


@dataclass
class StageRun:
    """What the handlers of one training stage share.

    Attributes:
        trainer: The trainer (settings, history, best score, checkpoint writing).
        stage: The stage's name.
        max_epochs: Its epochs.
        optimizers: Its optimisers, by name.
        ema: The weight average, or ``None``.
        done: Stages completed before this one.
        loader: Its training loader.
        validating: Whether this stage is validated (the final stage, with ``val_interval``).
        summed: The method's statistics summed over processes (:class:`volad.utils.distributed.SummedBuffers`).
        precise_bn: The batches batch-norm statistics are recomputed from before validation.
        last: The ``last.pt`` written at the end of the latest epoch.
    """

    trainer: Any  # the Trainer that built the handlers (they only call it back)
    stage: str
    max_epochs: int
    optimizers: dict[str, Any]
    ema: WeightAverage | None
    done: list[str]
    loader: Any
    validating: bool
    summed: distributed.SummedBuffers
    precise_bn: PreciseBatchNorm
    last: Path | None = None

    def save(self, name: str, engine: Engine, **kw: Any) -> Path:
        """Write checkpoint ``name`` of this stage at the engine's epoch (see :meth:`Trainer.save`)."""
        kw.setdefault("done", self.done)
        return self.trainer.save(name, stage=self.stage, epoch=engine.state.epoch, optimizers=self.optimizers,
                                 engine_state=engine_state(engine), ema=self.ema, **kw)


class LearningRateSchedule:
    """``"cosine"``: each step's learning rate is the optimiser's initial one times ½(1 + cos(π·step/steps))
    (Loshchilov & Hutter, "SGDR: stochastic gradient descent with warm restarts", ICLR 2017, without
    restarts); ``"constant"`` leaves it alone. The initial rate is saved with the optimiser, so a
    resumed run decays from the same start."""

    def __init__(self, run: StageRun, kind: str):
        self.run, self.kind = run, kind
        self.total_steps = run.max_epochs * len(run.loader)
        for o in run.optimizers.values():
            for group in o.param_groups:
                group.setdefault("initial_lr", group["lr"])

    def attach(self, engine: Engine) -> None:
        if self.kind == "cosine":
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        factor = 0.5 * (1.0 + math.cos(math.pi * min(engine.state.iteration - 1, self.total_steps) / self.total_steps))
        for o in self.run.optimizers.values():
            for group in o.param_groups:
                group["lr"] = group["initial_lr"] * factor


class EpochStatistics:
    """The epoch's progress bar, mean losses (averaged over processes), seconds and training CPU time
    (validation excluded), and the method's summed statistics reduced over processes before anything is saved."""

    def __init__(self, run: StageRun):
        self.run = run
        self.totals: dict[str, float] = {}
        self.bar: tqdm | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.step)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        set_epoch(self.run.loader, engine.state.epoch)
        self.run.precise_bn.start_epoch()
        self.totals = {"_t0": time.perf_counter(), "_c0": time.process_time()}
        engine.state.epoch_cpu_start = self.totals["_c0"]
        quiet = None if distributed.is_main() else True
        self.bar = tqdm(total=len(self.run.loader), desc=f"{self.run.stage} epoch {engine.state.epoch}/{self.run.max_epochs}", leave=False, disable=quiet)

    def step(self, engine: Engine) -> None:
        losses = engine.state.step_losses  # the method's own losses (the step's output adds a "loss" for MONAI's handlers)
        for k, v in losses.items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.totals["_n"] = self.totals.get("_n", 0) + 1
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})

    def completed(self, engine: Engine) -> None:
        self.bar.close()
        totals = dict(self.totals)
        n = max(totals.pop("_n", 1), 1)
        seconds = time.perf_counter() - totals.pop("_t0")
        cpu = time.process_time() - totals.pop("_c0")  # before validation, which the budget does not count
        means = distributed.mean_over_processes({k: v / n for k, v in totals.items()})
        self.run.summed.reduce()  # statistics over every process's subjects, before they are validated and saved
        engine.state.metrics = dict(means)
        engine.state.epoch_stats = {"seconds": seconds, "cpu_seconds": cpu, "steps": n}
        engine.state.notes = [", ".join(f"{k} {v:.4f}" for k, v in means.items())]


class EpochHandler:
    """A job run once at the end of every epoch: a subclass's ``__call__(engine)``, with the stage's shared state."""

    def __init__(self, run: StageRun):
        self.run = run

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)


class ValidationUnderEMA(EpochHandler):
    """Val AUPRC every ``val_interval`` epochs of the validated stage, on rank 0, on the averaged weights when
    ``ema_decay`` is set (``engine.state.metrics["val_auprc"]``), after the batch-norm statistics of those
    weights are recomputed when ``precise_bn_batches`` is set (on every process: synchronised batch norm
    gathers over all of them)."""

    def __call__(self, engine: Engine) -> None:
        trainer, ema = self.run.trainer, self.run.ema
        engine.state.val_auprc = None
        due = self.run.validating and engine.state.epoch % trainer.val_interval == 0
        if not due:
            return
        with ema.applied(trainer.method) if ema is not None else contextlib.nullcontext():
            self.run.precise_bn.apply(trainer.method, self.run.stage, ema.state if ema is not None else None)
            if not (distributed.is_main() and len(trainer.validation)):
                return
            val = trainer.validate()
        engine.state.val_auprc = val
        engine.state.metrics["val_auprc"] = val
        engine.state.notes.append(f"val AUPRC {val:.4f}" + (" (averaged weights)" if ema is not None else ""))


class LossHistory:
    """The run's history (one row per epoch: losses, val AUPRC, seconds, CPU time; kept in every checkpoint)
    and its plot, ``training.png``, redrawn where the curve changed: after a validation, at the stage's end."""

    def __init__(self, run: StageRun):
        self.run = run

    def attach_record(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record)

    def attach_plot(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.plot)

    def record(self, engine: Engine) -> None:
        stats = engine.state.epoch_stats
        losses = {k: v for k, v in engine.state.metrics.items() if k != "val_auprc"}
        self.run.trainer.history.append(
            {"stage": self.run.stage, "epoch": engine.state.epoch, "seconds": round(stats["seconds"], 2), "cpu_seconds": round(stats["cpu_seconds"], 2),
             "steps": stats["steps"], "processes": distributed.world_size(), "val_auprc": engine.state.val_auprc, **losses}
        )

    def plot(self, engine: Engine) -> None:
        ended = engine.state.epoch == self.run.max_epochs or engine.should_terminate
        if distributed.is_main() and (engine.state.val_auprc is not None or ended):
            from volad.evaluation.figures import plot_training  # matplotlib only where a plot is drawn

            trainer = self.run.trainer
            plot_training(trainer.history, trainer.output_dir / "training.png", f"{type(trainer.method).__name__} in {trainer.output_dir}")


class Checkpoints(EpochHandler):
    """``best.pt`` when the epoch's val AUPRC beats every earlier one, then ``last.pt`` (resumable).

    The new best is recorded before ``last.pt`` is written, and ``best.pt`` before ``last.pt``: a run killed
    between the two resumes from the previous ``last.pt`` and still knows this best (the trainer reads the
    score of the ``best.pt`` on disk when it resumes).

    Under ``average_best`` (``trainer.best_epochs``) an epoch among the best few has its weights kept and
    ``best.pt`` becomes the average of the kept ones; the epochs it pushed out are deleted only after the
    ``last.pt`` that no longer lists them (:mod:`volad.engine.soup`).
    """

    def __call__(self, engine: Engine) -> None:
        trainer, val = self.run.trainer, engine.state.val_auprc
        kept, dropped = trainer.best_epochs, []
        scored = val is not None and np.isfinite(val)
        if scored and kept is not None and kept.admits(val) and distributed.is_main():
            epoch = engine.state.epoch
            self.run.save(str(kept.file_for(epoch).relative_to(trainer.ckdir)), engine, val=val, resumable=False)
            dropped = kept.add(epoch, val)
            trainer.best = max(trainer.best, val)
            trainer.write_average(self.run.stage, epoch, None)
            engine.state.notes[-1] += f" (among the {kept.k} best; best.pt averages epochs {', '.join(map(str, kept.epochs()))})"
        elif scored and kept is None and val > trainer.best:
            trainer.best = val
            self.run.save("best.pt", engine, val=val, resumable=False)
            engine.state.notes[-1] += " (best)"
        self.run.last = self.run.save("last.pt", engine, val=val)
        for path in dropped:
            path.unlink(missing_ok=True)


class CpuBudget:
    """``snapshot_minutes``: the weights saved as ``cpu_<m>min.pt`` after the step in which training CPU time
    passes each mark (once, also across resumes); ``max_cpu_minutes``: the final stage ends after the epoch
    in which it is spent, every process together (their CPU clocks differ a little)."""

    def __init__(self, run: StageRun):
        self.run = run
        self.spent: float | None = None  # training CPU-minutes after the last step

    def attach_snapshots(self, engine: Engine) -> None:
        if self.run.trainer.snapshot_minutes:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.snapshot)

    def attach_stop(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.stop)

    def snapshot(self, engine: Engine) -> None:
        trainer = self.run.trainer
        before = trainer.cpu_minutes() if self.spent is None else self.spent
        self.spent = trainer.cpu_minutes() + (time.process_time() - engine.state.epoch_cpu_start) / 60.0
        for mark in trainer.snapshot_minutes:
            if before < mark <= self.spent:
                snap = self.run.save(f"cpu_{mark:g}min.pt", engine, val=None, resumable=False, cpu_minutes=self.spent)
                print(f"volad: {self.spent:.2f} training CPU-min (epoch {engine.state.epoch}, step {engine.state.iteration}): {snap}", flush=True)

    def stop(self, engine: Engine) -> None:
        trainer = self.run.trainer
        if distributed.mean_over_processes({"stop": float(trainer.budget_spent(self.run.stage))})["stop"] > 0:
            engine.state.notes.append(f"CPU budget of {trainer.max_cpu_minutes:g} min reached")
            engine.terminate()


class EpochReport(EpochHandler):
    """The epoch's one line: losses, val AUPRC, budget, seconds and the checkpoint written."""

    def __call__(self, engine: Engine) -> None:
        msg = ", ".join(n for n in engine.state.notes if n)
        seconds = engine.state.epoch_stats["seconds"]
        print(f"volad: {self.run.stage} epoch {engine.state.epoch}/{self.run.max_epochs}: {msg} ({seconds:.1f} s), checkpoint {self.run.last}", flush=True)


def flat_record(prefix: str, record: dict) -> dict[str, str]:
    """A nested record as flat ``prefix.key`` strings (experiment-tracking parameters)."""
    out: dict[str, str] = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flat_record(f"{prefix}.{k}", v))
        else:
            out[f"{prefix}.{k}"] = str(v)
    return out


def tracking_handlers(trainer: Any, stage: str) -> tuple[list, list]:
    """Tracking handlers for ``stage``'s engine: volad's own (TensorBoard, rank 0; closed after the stage), and the
    user's ``train_handlers``.

    MONAI's ``MLFlowHandler`` records ``engine.state.metrics`` each epoch (the mean
    losses and val AUPRC) and, given no ``experiment_param``, this run's settings and
    the method's ``hparams`` as parameters; it opens one MLflow run per stage.
    """
    own = []
    if trainer.tensorboard and distributed.is_main():
        from monai.handlers import TensorBoardStatsHandler

        # as MLflow records it: train_loss per iteration, the mean losses and val_auprc per epoch
        board = TensorBoardStatsHandler(
            log_dir=str(trainer.output_dir / "tensorboard" / stage), output_transform=lambda output: output[0]["loss"], tag_name="train_loss"
        )
        own.append(board)
    for handler in trainer.train_handlers:
        if hasattr(handler, "artifacts") and not any(str(a).endswith("training.png") for a in handler.artifacts or ()):
            handler.artifacts = tuple(a for a in (handler.artifacts or ()) if a) + (str(trainer.output_dir / "training.png"),)
        if hasattr(handler, "experiment_param") and (not handler.experiment_param or id(handler) in trainer.described):
            handler.experiment_param = {"stage": stage, **flat_record("method", trainer.method.hparams), **flat_record("run", trainer.record().run)}
            trainer.described.add(id(handler))
    return own, list(trainer.train_handlers)


def attach_all(engine: Engine, run: StageRun, lr_schedule: str) -> None:
    """Attach the trainer's handlers to a stage's engine, in the order their jobs depend on (module notes)."""
    statistics, budget, history = EpochStatistics(run), CpuBudget(run), LossHistory(run)
    LearningRateSchedule(run, lr_schedule).attach(engine)
    statistics.attach(engine)
    budget.attach_snapshots(engine)
    ValidationUnderEMA(run).attach(engine)
    history.attach_record(engine)
    Checkpoints(run).attach(engine)
    budget.attach_stop(engine)
    history.attach_plot(engine)
    EpochReport(run).attach(engine)
