"""One trainer for every method: settings, stages and resume; each per-epoch job is an Ignite handler.

An Ignite ``Engine`` drives :meth:`AnomalyMethod.optimization_step` for each
stage in ``method.stages``; the jobs of every epoch (learning-rate schedule,
statistics, validation, history and plot, checkpoints, CPU budget) are the
handlers of :mod:`volad.engine.handlers`. After every epoch the full training
state (method, optimisers, epoch, stage, completed stages, every process's random
states) is written atomically to ``<output_dir>/checkpoints/last.pt``; a killed
run started again with the same command resumes from it, losing at most the epoch
in progress, and on the CPU ends bit-identical to a run that was never interrupted. The checkpoint
records the run's settings (data, contrasts, seed, patch and batch size) and a
resume with other settings is refused; the run folder is locked while training
(:mod:`volad.utils.rundir`), so two processes never share it. Seed with
:func:`volad.utils.seed.seed_everything` *before* building the method (bundles do it in their
``initialize`` step) for repeatable weights. With a labelled
validation split, maps are computed on it every ``val_interval`` epochs of the
final stage (the one whose weights make the maps) and the checkpoint with the
highest voxel AUPRC is kept as ``best.pt`` (the validation split, never the test
split, picks the epoch); with ``average_best`` it is the uniform average of the
weights of that many best epochs instead (:mod:`volad.engine.soup`). With
``ema_decay`` the weights are averaged over steps (:mod:`volad.engine.ema`) and
the average is what is validated and saved; with ``lr_schedule="cosine"`` the
learning rate decays to zero over each stage.
``<output_dir>/training.png`` plots the per-epoch losses and the validation
curve, redrawn after each validation and at the end of each stage; TensorBoard
event files go to ``<output_dir>/tensorboard/<stage>`` and Ignite handlers given as
``train_handlers`` (MONAI's ``MLFlowHandler`` under ``--tracking mlflow``) see the
per-epoch losses and val AUPRC in ``engine.state.metrics``. Under ``torchrun``
the same trainer runs one DDP training over all processes (:mod:`volad.utils.distributed`). With ``val_tasks`` (set by the PII detector's bundle)
validation uses healthy training volumes carrying one held-out-task anomaly
each instead, so no lesion label is read at all (:mod:`volad.engine.validation`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Sequence

from ignite.engine import Engine

from volad.data.manifest import check_same_loading, every_contrast, load_dataset
from volad.data.views import choose_view, patch_shape, to_batch, training_loader
from volad.engine.ema import WeightAverage, weights_applied
from volad.engine.handlers import StageRun, attach_all, tracking_handlers
from volad.engine.precise_bn import PreciseBatchNorm
from volad.engine.soup import BestEpochs
from volad.engine.validation import LabelledValidation, SyntheticTaskValidation, training_validation, validation_auprc
from volad.errors import VoladConfigError
from volad.methods.base import AnomalyMethod
from volad.runs.checkpoint import check_hparams, check_same_run, read_checkpoint, recorded_val_auprc, save_checkpoint
from volad.runs.record import RunRecord, training_record
from volad.types import flag, resolve_device, unset
from volad.utils import distributed, rundir
from volad.utils.seed import restore_rng_states, rng_state, seed_everything

log = logging.getLogger("volad.engine.trainer")


def _spec(dataset: str | Path) -> str:
    """How to open a dataset again from anywhere: a manifest name, or the absolute path of a manifest file or folder."""
    path = Path(str(dataset))
    return str(path.resolve()) if path.exists() else str(dataset)


class Trainer:
    """Train a method on the healthy split of a dataset.

    Args:
        method: The method to train.
        dataset: Manifest name or path (training uses its ``train`` split only).
        data_root: Data folder (``None``: volad's cache for generated datasets).
        contrasts: Contrasts (channels); ``None`` uses the manifest default, ``"all"`` every contrast of the training data.
        val_dataset: Dataset whose labelled ``val`` split checks training and
            picks ``best.pt`` (``None``: ``dataset``). For cross-dataset runs this
            is the test dataset: its ``val`` split is disjoint from its ``test``
            split. Both must load with the same on-load preprocessing.
        val_data_root: Data folder of ``val_dataset``.
        output_dir: Run folder; checkpoints go to ``<output_dir>/checkpoints``.
        patch_size: Training patch (in-plane size in slice mode); ``None``: the
            method's own :attr:`~volad.methods.base.AnomalyMethod.training_patch_size`
            (pDDPM's context window), else whole volumes (whole axial slices in slice
            mode), as 0 always does. Ignored by methods that need whole volumes.
        max_epochs: Epochs per stage (an int for all stages, or a dict by stage).
        batch_size: Patches (or volumes) per step and process (under DDP the global
            batch is ``batch_size`` × processes).
        samples_per_volume: Patches drawn from each loaded subject.
        queue_length: Patches held in TorchIO's queue (bounds memory).
        num_workers: Subject-loading worker processes per training process
            (``None``: none on the CPU, where they only compete for the cores; up to 4
            on CUDA, so the GPU does not wait for loading).
        pin_memory: Page-locked batches for faster copies to a GPU (``None``: on CUDA).
        amp: bfloat16 autocast of the training forward passes (``None``: on CUDA, for
            methods whose networks tolerate it, :attr:`AnomalyMethod.amp_safe`).
        tensorboard: Write TensorBoard event files to ``<output_dir>/tensorboard``.
        train_handlers: Ignite handlers attached to each stage's engine (``None`` entries,
            disabled by MONAI on ranks above 0, are skipped), e.g. MONAI's ``MLFlowHandler``.
        val_interval: Validate every this many epochs (0 disables).
        val_max_subjects: Cap on validation subjects per check (``None``: every val subject, as the report scores them).
        inference_patch_size: Patch grid for validation maps (``None``: whole
            volumes or slices), as ``inference.json`` will make them.
        max_subjects: Use only the first N training subjects (``None``: all).
        device: ``"auto"`` picks CUDA when present.
        seed: Seed for weights, sampling and noise.
        stage: Run only this stage (``None``: every stage not yet completed, in
            order). Earlier stages must have completed in ``output_dir``.
        val_tasks: Validate on healthy training volumes carrying anomalies of
            these synthetic tasks (held out of the method's training) instead of
            on labelled ``val`` subjects; the bundle passes the same list to the method.
        lr_schedule: ``"constant"`` keeps each optimiser's learning rate; ``"cosine"``
            decays it to zero over the stage's steps (Loshchilov & Hutter, "SGDR:
            stochastic gradient descent with warm restarts", ICLR 2017, without
            restarts), so the final weights settle instead of stopping mid-stride.
            A stage continued with more epochs follows the longer schedule from its step.
        ema_decay: Keep an exponential moving average of the weights with this
            decay per step (:mod:`volad.engine.ema`); the average is what is validated,
            saved for inference and carried into the next stage. ``None`` or 0: the raw weights.
        precise_bn_batches: Before each validation, recompute the batch-norm statistics
            as the plain average over the epoch's last this many training batches, under
            the weights being validated (:mod:`volad.engine.precise_bn`); 0: keep
            training's running averages.
        average_best: ``best.pt`` holds the uniform average of the weights of this many
            validated epochs with the highest val AUPRC (a "model soup", :mod:`volad.engine.soup`),
            validated once more at the end of the run; 1: the best epoch's weights alone.
        snapshot_minutes: Training CPU-minutes at which the weights are also saved, as
            ``checkpoints/cpu_<m>min.pt`` (written after the training step in which the mark
            is passed; with ``ema_decay``, the averaged weights). Training CPU time is this
            process's CPU time (all its threads) in training epochs, summed over stages
            and resumes; validation is not counted. For budget studies (``volad bench budget``).
        max_cpu_minutes: End the final stage after the epoch in which training CPU time
            reaches this many minutes, even before ``max_epochs`` (``None``: no limit).
            Earlier stages always run their epochs, and count toward it.
    """

    def __init__(
        self,
        *,
        method: AnomalyMethod,
        dataset: str = "phantom",
        data_root: str | None = None,
        contrasts: Sequence[str] | str | None = None,
        val_dataset: str | None = None,
        val_data_root: str | None = None,
        output_dir: str,
        patch_size: int | Sequence[int] | None = 48,
        max_epochs: int | dict[str, int] = 10,
        batch_size: int = 4,
        samples_per_volume: int = 8,
        queue_length: int = 64,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        amp: bool | None = None,
        tensorboard: bool = True,
        train_handlers: Sequence | None = None,
        val_interval: int = 1,
        val_max_subjects: int | None = None,
        inference_patch_size: int | Sequence[int] | None = None,
        max_subjects: int | None = None,
        device: str = "auto",
        seed: int = 0,
        stage: str | None = None,
        val_tasks: Sequence[str] | None = None,
        lr_schedule: str = "constant",
        ema_decay: float | None = None,
        precise_bn_batches: int = 0,
        average_best: int = 1,
        snapshot_minutes: Sequence[float] = (),
        max_cpu_minutes: float | None = None,
    ):
        self.method = method
        if unset(stage):
            stage = None
        if stage is not None and stage not in method.stages:
            raise VoladConfigError(f"{type(method).__name__} has stages {list(method.stages)}, not {stage!r}")
        self.stage = stage
        self.dataset = load_dataset(dataset, data_root, contrasts)
        self.dataset_specs = {"train": _spec(dataset)}
        same = unset(val_dataset) or (str(val_dataset) == str(dataset) and str(val_data_root) == str(data_root))
        val_contrasts = self.dataset.contrasts if every_contrast(contrasts) else contrasts  # "all": the training data's, which val must have
        self.val_dataset = self.dataset if same else load_dataset(val_dataset, val_data_root, val_contrasts)
        self.dataset_specs["val"] = self.dataset_specs["train"] if same else _spec(val_dataset)
        check_same_loading(self.dataset, self.val_dataset)
        if self.dataset.manifest.get("slice_mode_only") and method.spatial_dims != 2:
            raise VoladConfigError(
                f"dataset {self.dataset.name!r} is a 2D benchmark (pictures or thick slices); train in slice mode with --spatial_dims 2"
            )
        if method.in_channels != len(self.dataset.contrasts):
            raise VoladConfigError(
                f"method expects {method.in_channels} input channels but dataset {self.dataset.name!r} gives "
                f"{len(self.dataset.contrasts)} ({', '.join(self.dataset.contrasts)})"
            )
        self.output_dir = Path(output_dir)
        self.ckdir = self.output_dir / "checkpoints"
        self.patch_size = method.training_patch_size if unset(patch_size) else patch_size
        self.max_epochs = max_epochs
        self.batch_size = int(batch_size)
        self.samples_per_volume = int(samples_per_volume)
        self.queue_length = int(queue_length)
        self.val_interval = int(val_interval)
        self.val_max_subjects = val_max_subjects
        self.inference_patch_size = inference_patch_size
        self.max_subjects = max_subjects
        self.device = distributed.local_device(resolve_device(device))
        cuda = self.device.type == "cuda"
        if unset(num_workers):
            num_workers = min(4, (os.cpu_count() or 1) // distributed.world_size()) if cuda else 0
        self.num_workers = int(num_workers)
        pin_memory, amp = flag(pin_memory, "pin_memory"), flag(amp, "amp")
        self.pin_memory = cuda if pin_memory is None else pin_memory
        if amp and not method.amp_safe:
            raise VoladConfigError(f"{type(method).__name__} trains in float32 only (amp_safe is False); drop --amp")
        self.amp = (cuda and method.amp_safe) if amp is None else amp
        self.tensorboard = flag(tensorboard, "tensorboard") is not False
        self.train_handlers = [h for h in (train_handlers or []) if h is not None]
        self.described: set[int] = set()  # tracking handlers whose parameters volad fills in
        self.seed = int(seed)
        self.transform = self.dataset.transform(anatomy=method.anatomy)
        self.grid = self.dataset.grid("train")  # the orientation and spacing the network sees; scans given by path are brought to it
        self.best = float("-inf")
        self.val_tasks = [str(t) for t in (val_tasks or [])]
        if lr_schedule not in ("constant", "cosine"):
            raise VoladConfigError(f"lr_schedule must be constant or cosine, got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.ema_decay = float(ema_decay) if not unset(ema_decay) and float(ema_decay) > 0 else None
        self.precise_bn_batches = 0 if unset(precise_bn_batches) else int(precise_bn_batches)
        if self.precise_bn_batches < 0:
            raise VoladConfigError(f"precise_bn_batches must be 0 (off) or a number of batches, got {precise_bn_batches!r}")
        self.average_best = 1 if unset(average_best) else int(average_best)
        if self.average_best < 1:
            raise VoladConfigError(f"average_best must be 1 (the best epoch alone) or more epochs to average, got {average_best!r}")
        self.best_epochs: BestEpochs | None = None  # the epochs best.pt averages, while the validated stage runs
        self.snapshot_minutes = sorted(float(m) for m in (snapshot_minutes or ()))
        if any(m <= 0 for m in self.snapshot_minutes):
            raise VoladConfigError(f"snapshot_minutes must be positive, got {list(snapshot_minutes)}")
        self.max_cpu_minutes = None if unset(max_cpu_minutes) else float(max_cpu_minutes)
        if self.max_cpu_minutes is not None and self.max_cpu_minutes <= 0:
            raise VoladConfigError(f"max_cpu_minutes must be positive, got {max_cpu_minutes}")
        self.history: list[dict] = []
        self._validation: LabelledValidation | SyntheticTaskValidation | None = None

    # -- helpers -------------------------------------------------------------------
    def epochs_for(self, stage: str) -> int:
        if isinstance(self.max_epochs, dict):
            if stage not in self.max_epochs:
                raise VoladConfigError(f"max_epochs has no entry for stage {stage!r}")
            return int(self.max_epochs[stage])
        return int(self.max_epochs)

    def cpu_minutes(self) -> float:
        """Training CPU-minutes so far (see ``snapshot_minutes``), from the run's history."""
        return sum(float(h.get("cpu_seconds") or 0.0) for h in self.history) / 60.0

    def budget_spent(self, stage: str) -> bool:
        """Whether ``max_cpu_minutes`` ends ``stage`` now (it only ends the final stage)."""
        return self.max_cpu_minutes is not None and stage == self.method.stages[-1] and self.cpu_minutes() >= self.max_cpu_minutes

    @property
    def validation(self) -> LabelledValidation | SyntheticTaskValidation:
        """The validation cases, built once (:func:`volad.engine.validation.training_validation`)."""
        if self._validation is None:
            self._validation = training_validation(self.dataset, self.val_dataset, self.transform, val_tasks=self.val_tasks,
                                                   max_subjects=self.max_subjects, val_max_subjects=self.val_max_subjects, seed=self.seed)
        return self._validation

    def validate(self) -> float:
        """Voxel AUPRC of the current weights on the validation cases (see :mod:`volad.engine.validation`)."""
        auprc = validation_auprc(self.method, self.validation, patch_size=self.inference_patch_size, device=self.device)
        self.method.train()
        return auprc

    # -- main ----------------------------------------------------------------------
    def run(self) -> Path:
        """Train every stage not yet completed; returns the path of the checkpoint to use.

        The run folder is held for the whole run (:func:`volad.utils.rundir.claim`): a second
        process training into it is refused.
        """
        if not distributed.is_main():  # rank 0 holds the folder for all processes of a DDP run
            return self._run()
        with rundir.claim(self.output_dir, "training"):
            return self._run()

    def _run(self) -> Path:
        seed_everything(self.seed + distributed.rank())  # other patches and noise per process; DDP copies rank 0's weights
        self.method.to(self.device)
        if distributed.active():
            self.method = distributed.sync_batch_norm(self.method, self.device)
        state = self._resume()
        distributed.barrier()
        done: list[str] = state.get("completed_stages", [])
        subjects = self.dataset.subjects("train", limit=self.max_subjects)
        announce(self, subjects)
        if self.stage is not None:
            missing = [s for s in self.method.stages[: self.method.stages.index(self.stage)] if s not in done]
            if missing:
                raise VoladConfigError(
                    f"stage {self.stage!r} needs stage(s) {missing} first: no completed {missing[0]} in {self.ckdir / 'last.pt'}"
                )
        for stage in self.method.stages:
            if self.stage is not None and stage != self.stage:
                continue
            extend = state.get("stage") == stage and int(state.get("epoch") or 0) < self.epochs_for(stage)
            if stage in done and extend:  # finished before, now asked for more epochs
                done = [d for d in done if d != stage]
                print(f"volad: continuing stage {stage} from epoch {state['epoch']} to {self.epochs_for(stage)}")
            elif stage in done:
                print(f"volad: stage {stage} already completed ({self.ckdir / 'last.pt'}), skipping")
                continue
            if state.get("stage") != stage and state.get("train_state") is not None:
                # resumed after an averaged stage completed: the next stage starts from its average, as it would have
                self.method.load_state_dict(state["method"])
            self._run_stage(stage, subjects, state if state.get("stage") == stage else {}, done)
            done.append(stage)
            state = {}
        if not self.method.stages:
            self.save("last.pt", stage="", epoch=0, optimizers={}, engine_state=None, done=[], val=None)
        distributed.barrier()  # every checkpoint is written before any process moves on
        final = self.ckdir / ("best.pt" if (self.ckdir / "best.pt").exists() else "last.pt")
        print(f"volad: training finished; checkpoint: {final}")
        return final

    def _resume(self) -> dict:
        path = self.ckdir / "last.pt"
        if not path.is_file():
            return {}
        payload = read_checkpoint(path)
        check_hparams(self.method, payload["hparams"], path)
        if "run" in payload:  # checkpoints of volad 0.1 did not record their run settings
            check_same_run(payload["run"], self.record().run, path)
        self.method.load_state_dict(payload.get("train_state") or payload["method"])  # the raw weights when averaging
        self.history = list(payload.get("history") or [])
        self.method.to(self.device)
        log.debug("resuming from %s (stage %s, epoch %s)", path, payload.get("stage"), payload.get("epoch"))
        print(f"volad: resuming from {path} (stage {payload.get('stage')}, epoch {payload.get('epoch')})")
        return payload

    def save(
        self,
        name: str,
        *,
        stage: str,
        epoch: int,
        optimizers: dict,
        engine_state,
        done: list[str],
        val: float | None,
        ema: WeightAverage | None = None,
        resumable: bool = True,
        cpu_minutes: float | None = None,
        weights: dict | None = None,
        averaged: list[dict] | None = None,
    ) -> Path:
        """Write a checkpoint; with ``ema``, ``method`` holds the averaged weights (what inference uses).

        Every checkpoint holds the method's weights and the run's :class:`~volad.runs.record.RunRecord`
        (``hparams``, ``data``, ``run``, ``inference``, ``history``), stage, epoch and val AUPRC. Only a
        ``resumable`` one (``last.pt``, the one a run resumes from) also holds the optimiser state, the
        engine's counters, every process's random states (:func:`volad.utils.seed.rng_state`) and, with
        ``ema``, the raw weights (``train_state``); ``best.pt`` is only ever mapped with, so it leaves them
        out. ``cpu_minutes`` records the training CPU time the weights took (default: the completed
        epochs'). ``weights`` replaces the method's (or average's) weights, and ``averaged`` records the epochs they
        average (``best.pt`` under ``average_best``). A resumable checkpoint lists the epochs kept for that average.
        Under DDP only rank 0 writes.
        """
        # every process's random states (a collective: resumable saves happen on every rank at once)
        rng = distributed.gather(rng_state(self.method)) if resumable else None
        if not distributed.is_main():
            return self.ckdir / name
        if weights is None:
            weights = ema.state if ema is not None else self.method.state_dict()
        payload = self.record().payload(
            weights, stage=stage, epoch=epoch, completed_stages=done,
            val_auprc=val, best_val_auprc=self.best, cpu_minutes=self.cpu_minutes() if cpu_minutes is None else cpu_minutes,
        )
        if resumable:
            payload.update(optimizers={k: o.state_dict() for k, o in optimizers.items()}, engine=engine_state, rng=rng)
            if ema is not None:
                payload.update(train_state=self.method.state_dict(), ema_updates=ema.updates)
            if self.best_epochs is not None:
                payload["best_epochs"] = [dict(e) for e in self.best_epochs.entries]
        if averaged is not None:
            payload["averaged_epochs"] = [dict(e) for e in averaged]
        return save_checkpoint(self.ckdir / name, payload)

    def record(self) -> RunRecord:
        """What this run's checkpoints record besides the weights; its ``run`` part is what a resume must share."""
        return training_record(
            hparams=self.method.hparams, dataset=self.dataset, val_dataset=self.val_dataset, specs=self.dataset_specs, grid=self.grid,
            seed=self.seed, patch_size=self.patch_size, batch_size=self.batch_size, samples_per_volume=self.samples_per_volume,
            max_subjects=self.max_subjects, ema_decay=self.ema_decay, lr_schedule=self.lr_schedule,
            precise_bn_batches=self.precise_bn_batches, average_best=self.average_best,
            inference_patch_size=self.inference_patch_size, history=self.history,
        )

    def _run_stage(self, stage: str, subjects, state: dict, done: list[str]) -> None:
        max_epochs = self.epochs_for(stage)
        view = self.method.input_view
        loader = training_loader(
            subjects,
            self.transform,
            spatial_dims=self.method.spatial_dims,
            patch_size=None if view == "volume" else self.patch_size,
            batch_size=self.batch_size,
            samples_per_volume=self.samples_per_volume,
            queue_length=self.queue_length,
            num_workers=self.num_workers,
            view=view,
            seed=self.seed,
            rank=distributed.rank(),
            world_size=distributed.world_size(),
            pin_memory=self.pin_memory,
        )
        optimizers = self.method.configure_optimizers(stage)
        parallel = distributed.active() and any(p.requires_grad for p in self.method.parameters()) and bool(optimizers)
        optimised = {id(p) for o in optimizers.values() for group in o.param_groups for p in group["params"]}
        self.method.distribute(stage, functools.partial(distributed.data_parallel, optimised=optimised) if parallel else None)
        summed = distributed.SummedBuffers(self.method)  # after resume: what the checkpoint holds is already global
        self.method.amp = self.amp
        ema = WeightAverage(self.method, self.ema_decay) if optimizers and self.ema_decay else None
        if ema is not None and state.get("train_state") is not None and state.get("ema_updates") is not None:
            ema.load(state["method"], state["ema_updates"])
        best = state.get("best_val_auprc")
        self.best = max(float("-inf") if best is None else float(best), recorded_val_auprc(self.ckdir / "best.pt") if state else float("-inf"))
        if state.get("optimizers"):
            for k, o in optimizers.items():
                if k in state["optimizers"]:
                    o.load_state_dict(state["optimizers"][k])
        spatial_dims = self.method.spatial_dims if view == "patch" else 3
        # Only the final stage makes the maps that are used, so only it is validated (and picks best.pt).
        validating = bool(self.val_interval) and stage == self.method.stages[-1]
        method, device = self.method, self.device

        precise_bn = PreciseBatchNorm(self.precise_bn_batches if validating else 0)
        self.best_epochs = None
        if validating and self.average_best > 1:
            self.best_epochs = BestEpochs(self.ckdir / "best_epochs", self.average_best)
            if distributed.is_main():
                self.best_epochs.restore(state.get("best_epochs"))
                self.write_average(stage, int(state.get("epoch") or 0), None, rebuild_only=True)
        run = StageRun(trainer=self, stage=stage, max_epochs=max_epochs, optimizers=optimizers, ema=ema, done=done, loader=loader,
                       validating=validating, summed=summed, precise_bn=precise_bn)

        def step(engine: Engine, tio_batch: dict) -> list[dict[str, float]]:
            method.train()
            batch = to_batch(tio_batch, spatial_dims).padded(method.size_divisor).to(device, non_blocking=self.pin_memory)
            losses = method.optimization_step(batch, stage, optimizers)
            if ema is not None:
                ema.update(method)
            precise_bn.keep(batch)
            engine.state.step_losses = losses
            # MONAI's handlers read a list of per-sample dicts with a "loss" (from_engine(["loss"], first=True));
            # a stage without a single loss (a GAN's two, a statistics pass) shows NaN there
            return [{"loss": losses.get("loss", float("nan")), **losses}]

        engine = Engine(step)
        attach_all(engine, run, self.lr_schedule)
        own, external = tracking_handlers(self, stage)
        for handler in own + external:  # after volad's own, so they see engine.state.metrics
            handler.attach(engine)
        if state.get("engine"):
            engine.state.epoch = int(state["engine"]["epoch"])
            engine.state.iteration = int(state["engine"]["iteration"])
            engine.state.max_epochs = max_epochs
            engine.state.epoch_length = len(loader)
            message = restore_rng_states(state, distributed.rank(), distributed.world_size(), self.method)
            if distributed.is_main():
                print(message, flush=True)
        try:
            if self.budget_spent(stage):
                print(f"volad: stage {stage} already used its CPU budget ({self.cpu_minutes():.1f} of {self.max_cpu_minutes:g} min)")
            elif engine.state.epoch < max_epochs:  # a run killed after its last epoch only needs marking complete
                engine.run(loader, max_epochs=max_epochs, epoch_length=len(loader))
        finally:
            self.method.distribute(stage, None)
            self.method.amp = False
            for handler in own:
                handler.close()
        if self.best_epochs is not None and distributed.is_main():
            self._validate_average(stage, engine.state.epoch)
        # the stage's result is its averaged weights (``method``); the raw ones (``train_state``) are kept so that
        # asking for more epochs later continues the run it would have been
        run.save("last.pt", engine, val=None, done=done + [stage])
        self.best_epochs = None
        if ema is not None:  # later stages start from the average
            self.method.load_state_dict(ema.state)

    def write_average(self, stage: str, epoch: int, val: float | None, *, rebuild_only: bool = False, weights: dict | None = None) -> None:
        """``best.pt`` as the average of the kept best epochs (:mod:`volad.engine.soup`), with ``val`` its own val AUPRC
        (``None``: not validated yet). ``rebuild_only``: only where ``best.pt`` was made from other epochs (a resume).
        ``weights``: that average, where the caller has it already."""
        kept = self.best_epochs
        if kept is None or not kept.entries:
            return
        best = self.ckdir / "best.pt"
        if rebuild_only and best.is_file():
            recorded = [e.get("epoch") for e in read_checkpoint(best).get("averaged_epochs") or []]
            if recorded == kept.epochs():
                return
        self.save("best.pt", stage=stage, epoch=epoch, optimizers={}, engine_state=None, done=[], val=val, resumable=False,
                  weights=kept.average() if weights is None else weights, averaged=kept.entries)

    def _validate_average(self, stage: str, epoch: int) -> None:
        """Validate the average of the kept best epochs once, at the end of the validated stage, and record its score
        in ``best.pt`` (kept whatever the score: the rule was fixed before validation; module notes of :mod:`volad.engine.soup`)."""
        kept = self.best_epochs
        best = self.ckdir / "best.pt"
        if kept is None or not kept.entries or not len(self.validation):
            return
        if best.is_file() and read_checkpoint(best).get("val_auprc") is not None:
            return  # validated already (a run resumed after its end)
        average = kept.average()
        with weights_applied(self.method, average):
            val = self.validate()
        self.write_average(stage, epoch, val, weights=average)
        scores = ", ".join(f"{e['val_auprc']:.4f}" for e in kept.entries)
        print(f"volad: best.pt = average of epochs {', '.join(map(str, kept.epochs()))} (val AUPRC {scores}); "
              f"the average scores val AUPRC {val:.4f}", flush=True)


def announce(trainer: Trainer, subjects: list) -> None:
    """Say up front what this run will use: data, splits, contrasts, device, steps."""
    d = trainer.dataset
    view = choose_view(trainer.method.input_view, trainer.method.spatial_dims, trainer.patch_size)
    if view == "volume":
        unit, per_volume = "whole volumes", 1
    elif view == "slices":
        unit, per_volume = "whole axial slices", trainer.samples_per_volume
    else:
        unit, per_volume = f"patches {patch_shape(trainer.patch_size, trainer.method.spatial_dims)}", trainer.samples_per_volume
    world = distributed.world_size()
    steps = math.ceil(math.ceil(len(subjects) / world) * per_volume / trainer.batch_size)
    if not trainer.val_interval:
        val_what = "off"
    else:
        val_what = trainer.validation.description if len(trainer.validation) else "none (no labelled val subjects; best.pt = last.pt)"
    print(
        f"volad: training {type(trainer.method).__name__} ({trainer.method.spatial_dims}D, stages {', '.join(trainer.method.stages) or 'none'}) "
        f"on {len(subjects)} healthy subjects of {d.name}/train at {d.root}, contrasts {', '.join(d.contrasts)}, "
        f"device {trainer.device}, seed {trainer.seed}"
        + (f", {world} processes (DDP, global batch {world * trainer.batch_size})" if world > 1 else "")
        + (", bfloat16 autocast" if trainer.amp else "")
        + f"\nvolad: {unit}, batch {trainer.batch_size}, {steps} steps per epoch; validation: {val_what}; run folder {trainer.output_dir}",
        flush=True,
    )
