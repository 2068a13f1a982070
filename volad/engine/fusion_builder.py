"""Build a calibrated fusion (:class:`volad.methods.fusion.Fusion`) from trained run folders.

``bundles/fusion3d/train.json`` runs :class:`FusionBuilder`:

1. **Members.** Each member run folder is opened as inference opens it
   (:func:`volad.runs.record.open_run`); all must read their data the same way. The
   fusion's input is the union of the chosen members' contrasts. A run whose method
   has contrast views (:meth:`volad.methods.base.AnomalyMethod.contrast_views`: the
   normative model on several contrasts, or on both signs) is split into one member
   per contrast and sign (``normative_views:t1-``), each calibrated on its own, so
   that a deviation in one contrast is not averaged away by the others
   (``split_views=False`` fuses it whole); the views are one method's and share its
   vote (below).
2. **Calibration, healthy scans only.** Every member maps the calibration
   scans, each map smoothed by its own method's median window (the fused map is
   not smoothed again; :mod:`volad.methods.fusion`): by default the validation
   split's subjects that the manifest marks
   healthy (no lesion label is read), else, when the validation split has none,
   the healthy training split. The record states per member whether those scans
   were held out of its training (a member that trained on them has an optimistic
   tail); a member trained on any val or test subject of the fusion is refused.
   Each member's scores on those brain voxels become its tail table
   (:mod:`volad.methods.calibration`).
3. **The rule.** By default every member is kept and their surprisals are
   combined by their root mean square (``combine="rms"``,
   :mod:`volad.methods.fusion`): a member that alone sees a kind of lesion keeps
   at least ``1/sqrt(n)`` of its surprisal among ``n`` members (the mean keeps
   ``1/n``), while voxels where several members agree rank above one member's
   healthy-tissue noise (which the harmonic mean p-value stacks from every
   member); no lesion label chooses anything when the fusion is built, and the
   val split only reports.
   **Each method votes once** (``weights="family"``, the default): members that are
   one method with the same settings, apart from the contrasts and sign they watch
   and the seed they trained with (:data:`WATCHING`), form a family; every family
   weighs the same, and a family's weight is shared equally by its members
   (:func:`family_weights`). Eight per-contrast, per-sign normative models then
   count as one source of evidence beside an autoencoder, not as eight: a large
   family cannot outvote the other methods by its size, and none of its members
   has to be dropped for it. Members that are all different methods weigh the
   same (as ``weights="equal"`` weighs every member). With
   ``select_members=True`` members are instead added one at a time (greedy
   forward selection) on the labelled validation split, each time the one that
   raises the val voxel AUPRC of the fused map most, while the gain is at least
   ``min_gain``; ``combine="auto"`` picks the best of the rules on val. That
   choice is only as good as val is large: a validation split with a case or two
   of each kind drops a member on one case's noise, and a kind val lacks cannot
   vote at all, which is why it is not the default. Each candidate's fused map is
   post-processed as ``evaluate.json`` does by default (brain-mask erosion)
   before it is scored, so the figures use the report's
   yardstick. The calibrated maps of the val subjects are kept in memory as
   float16, cropped to the brain (members × brain box × 2 bytes per subject).
   Test labels are never read.
4. **The run.** The chosen fusion is saved as ``checkpoints/last.pt`` like any
   trained method, with its members' weights, calibration and the selection
   record (also ``fusion.json``), so ``inference.json``, ``evaluate.json``,
   ``--input`` and the Slicer export work on it unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from volad.data.manifest import load_dataset
from volad.engine.inferer import check_loading
from volad.engine.selection import choose_rule
from volad.engine.validation import LabelledValidation, report_postprocessing
from volad.errors import VoladConfigError, VoladDataError
from volad.evaluation.postprocess import PostProcessing, postprocess
from volad.evaluation.voxel import average_precision
from volad.io import write_json
from volad.methods.calibration import fit_tail
from volad.methods.fusion import COMBINE_RULES, Fusion, combine_surprisals
from volad.methods.registry import method_median_mm
from volad.runs.checkpoint import save_checkpoint
from volad.runs.record import RunRecord, TrainedRun, open_run
from volad.types import resolve_device, unset
from volad.utils import distributed, rundir
from volad.utils.progress import progress
from volad.utils.seed import seed_everything

log = logging.getLogger("volad.engine.fusion_builder")


#: Settings that say which contrasts and which sign a member watches, or which seed trained it, rather than which
#: method it is: members differing only in these are one family (:func:`member_families`).
WATCHING = ("in_channels", "channel", "polarity", "seed")


def member_families(records: Sequence[dict[str, Any]]) -> list[str]:
    """Each member's family, named by its first member: members of one method (``hparams``, training dataset) whose
    settings differ only in :data:`WATCHING` share a family.

    Args:
        records: Member records (``name``, ``hparams``, ``train_dataset``), as :meth:`FusionBuilder.member_records` gives them.
    """
    keys = [json.dumps({k: v for k, v in r["hparams"].items() if k not in WATCHING}, sort_keys=True, default=str) + f"|{r.get('train_dataset')}"
            for r in records]
    first: dict[str, str] = {}
    for key, r in zip(keys, records):
        first.setdefault(key, r["name"])
    return [first[k] for k in keys]


def family_weights(records: Sequence[dict[str, Any]]) -> list[float]:
    """Weights summing to 1 under which every family weighs the same and shares its weight equally among its members."""
    families = member_families(records)
    n = len(set(families))
    return [1.0 / (n * families.count(f)) for f in families]


@dataclass
class ValCase:
    """One labelled val subject, cropped to its brain's bounding box (plus a margin for post-processing)."""

    stack: np.ndarray  # (members, ...) calibrated maps, float16
    label: np.ndarray  # lesion voxels
    brain: np.ndarray  # brain mask
    spacing: tuple[float, ...]


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels (the whole array when empty)."""
    if not mask.any():
        return tuple(slice(None) for _ in mask.shape)
    idx = np.nonzero(mask)
    return tuple(slice(max(int(i.min()) - margin, 0), min(int(i.max()) + margin + 1, n)) for i, n in zip(idx, mask.shape))


def _member_paths(members: Sequence[str] | str) -> list[Path]:
    """Member run folders from a list, or from one comma-separated string (as a command line gives them)."""
    if isinstance(members, str):
        members = members.split(",")
    paths = [Path(str(m).strip()) for m in members if str(m).strip()]
    if not paths:
        raise VoladConfigError("fusion: no member run folders given (--members runs/baseline3d,runs/ae3d,...)")
    return paths


class FusionBuilder:
    """Calibrate member runs on healthy scans and choose their combination on val (see module docstring).

    Args:
        output_dir: The fusion's run folder.
        members: Member run folders (each trained with its own bundle).
        member_checkpoint: Which checkpoint of each member (``best`` or ``last``).
        dataset: Dataset whose ``val`` split calibrates and chooses (default: the first member's validation dataset).
        data_root: Its data folder.
        calibration_split: ``"auto"`` (healthy subjects of ``val``, else the
            training split), ``"val"`` (healthy subjects of ``val``), or any
            split of healthy subjects (e.g. ``"train"``).
        combine: ``"rms"`` (root mean square of the surprisals), ``"hmp"`` (harmonic mean p-value), ``"mean"``, ``"max"``,
            or ``"auto"`` (the best of them on val).
        weights: ``"family"`` (every method votes once: :func:`family_weights`) or ``"equal"`` (every member the same);
            ``"max"`` has no weights.
        split_views: Split a member run with contrast views into one member per contrast and sign (see the module notes).
        select_members: Greedy forward selection of members on val; ``False`` (default) keeps all.
        min_gain: Least val AUPRC gain for which a member is added.
        max_calibration_voxels: Cap on healthy voxels per member table (a seeded random subset beyond it).
        points: Knots of each calibration table.
        device: ``"auto"`` picks CUDA when present.
        seed: Seed of the subsampling.
    """

    def __init__(
        self,
        *,
        output_dir: str,
        members: Sequence[str] | str,
        member_checkpoint: str = "best",
        dataset: str | None = None,
        data_root: str | None = None,
        calibration_split: str = "auto",
        combine: str = "rms",
        weights: Literal["family", "equal"] = "family",
        split_views: bool = True,
        select_members: bool = False,
        min_gain: float = 0.005,
        max_calibration_voxels: int = 5_000_000,
        points: int = 512,
        device: str = "auto",
        seed: int = 0,
    ):
        self.output_dir = Path(output_dir)
        self.paths = _member_paths(members)
        if combine not in ("auto", *COMBINE_RULES):
            raise VoladConfigError(f"combine must be auto or one of {', '.join(COMBINE_RULES)}, got {combine!r}")
        if weights not in ("family", "equal"):
            raise VoladConfigError(f"weights must be family or equal, got {weights!r}")
        self.weighting = weights
        for p in self.paths:
            if p.resolve() == self.output_dir.resolve():
                raise VoladConfigError(f"fusion: the output folder {p} is also a member; give the fusion its own --output_dir")
        runs = [open_run(p, member_checkpoint) for p in self.paths]
        names = _names(self.paths)
        if split_views:
            self.paths, names, runs = _split_views(self.paths, names, runs)
        self.runs, self.names = runs, names
        first = self.runs[0]
        given = not unset(dataset)
        self.dataset_spec = str(dataset) if given else first.data.get("val_spec", first.data["val_dataset"])
        root = data_root if given else first.data["val_root"]
        self.dataset = load_dataset(self.dataset_spec, None if unset(root) else root, self.contrasts_of(range(len(self.runs))))
        for run in self.runs:
            check_loading(self.dataset, run)
        self.trained_on = [_training_files(run) for run in self.runs]
        self._check_members_data()
        self.calibration_split = calibration_split
        self.combine = combine
        self.select_members = bool(select_members)
        self.min_gain = float(min_gain)
        self.max_calibration_voxels = int(max_calibration_voxels)
        self.points = int(points)
        self.device = resolve_device(device)
        self.seed = int(seed)

    # -- members -------------------------------------------------------------------
    def _files(self, splits: Sequence[str]) -> dict[Path, str]:
        """The fusion dataset's image files of ``splits``, each with its subject."""
        out = {}
        for split in splits:
            try:
                ids = self.dataset.split_ids(split)
            except VoladConfigError:
                continue
            out.update({p.resolve(): f"{split}/{sid}" for sid in ids for p in self.dataset.path_of(sid, "contrast")})
        return out

    def _check_members_data(self) -> None:
        """Refuse a member that trained on a subject the fusion chooses on (val) or is reported on (test); say when members
        trained on different datasets.

        Raises:
            VoladConfigError: naming the member, the subject and the file.
        """
        chosen_on = self._files(["val", "test"])
        for name, files in zip(self.names, self.trained_on):
            shared = sorted(set(files or ()) & set(chosen_on))
            if shared:
                raise VoladConfigError(
                    f"fusion member {name} trained on {len(shared)} file(s) of {self.dataset.name}'s val or test subjects "
                    f"(e.g. {chosen_on[shared[0]]}: {shared[0]}); its scores there are not held out. Fuse runs trained on other subjects"
                )
        trained = {f"{r.data['train_dataset']} ({r.data['train_root']})" for r in self.runs}
        if len(trained) > 1:
            print(f"volad: the members trained on different datasets: {', '.join(sorted(trained))}")

    def held_out(self, i: int, subjects: Sequence) -> bool | None:
        """Whether none of ``subjects`` (calibration scans) is among member ``i``'s training scans (``None``: its training data cannot be read)."""
        files = self.trained_on[i]
        if files is None:
            return None
        return not any(Path(p).resolve() in files for s in subjects for p in s["image_paths"])

    def contrasts_of(self, keep: Sequence[int]) -> list[str]:
        """The contrasts members ``keep`` read, in order of first appearance (a fusion's input channels)."""
        return list(dict.fromkeys(c for i in keep for c in self.runs[i].data["contrasts"]))

    def member_records(self, keep: Sequence[int]) -> list[dict[str, Any]]:
        """What a fusion of members ``keep`` records about each (its ``members`` argument)."""
        contrasts = self.contrasts_of(keep)
        return [
            {
                "name": self.names[i],
                "run": str(self.runs[i].output_dir.resolve()),
                "checkpoint": self.runs[i].info.get("sha256"),
                "hparams": self.runs[i].hparams,
                "contrasts": list(self.runs[i].data["contrasts"]),
                "train_dataset": self.runs[i].data["train_dataset"],
                "train_root": self.runs[i].data["train_root"],
                "channels": [contrasts.index(c) for c in self.runs[i].data["contrasts"]],
                "patch_size": self.runs[i].inference.get("patch_size"),
                "batch_size": self.runs[i].inference.get("batch_size") or 4,
                "median_kernel": PostProcessing(median_mm=method_median_mm(self.runs[i].hparams)).voxels(self.spacing)["median_kernel"],
            }
            for i in keep
        ]

    def weights_of(self, keep: Sequence[int]) -> list[float]:
        """The weights of a fusion of members ``keep`` (see ``weights``)."""
        if self.weighting == "equal":
            return [1.0 / len(keep)] * len(keep)
        return family_weights(self.member_records(keep))

    @functools.cached_property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size of the fusion's grid (its first member's, else the dataset's val split; 1 mm when neither says)."""
        grid = self.runs[0].data.get("grid") or self.dataset.grid("val") or {}
        return tuple(float(v) for v in grid.get("spacing") or (1.0, 1.0, 1.0))

    def _fusion(self, keep: Sequence[int], combine: str, source: Fusion | None = None) -> Fusion:
        """A fusion of members ``keep``: weights read from their runs, or taken with their calibration
        from ``source`` (a fusion of every member, already calibrated), so no checkpoint is read twice."""
        fusion = Fusion(
            spatial_dims=3,
            in_channels=len(self.contrasts_of(keep)),
            members=self.member_records(keep),
            combine=combine,
            weights=self.weights_of(keep),
            points=self.points,
        )
        for j, i in enumerate(keep):
            if source is None:
                fusion.members[j].load_state_dict(self.runs[i].method().state_dict())
            else:
                fusion.members[j].load_state_dict(source.members[i].state_dict())
                for name in ("calib_knots", "calib_surprisal", "calib_slope"):
                    getattr(fusion, name)[j] = getattr(source, name)[i]
        return fusion.to(self.device).eval()

    # -- calibration -----------------------------------------------------------------
    def calibration_subjects(self) -> tuple[str, list]:
        """The healthy scans that calibrate, and which split they are (see ``calibration_split``)."""
        split = self.calibration_split
        if split in ("auto", "val"):
            try:
                healthy = [s for s in self.dataset.subjects("val") if s["status"] == "healthy"]
            except VoladConfigError:
                healthy = []
            if healthy or split == "val":
                if not healthy:
                    raise VoladConfigError(
                        f"{self.dataset.name}/val has no subject its manifest marks healthy to calibrate on; use --calibration_split train"
                    )
                return "val (healthy subjects)", healthy
            split = "train"
        subjects = self.dataset.subjects(split)
        if split != "train":
            subjects = [s for s in subjects if s["status"] == "healthy"]
        if not subjects:
            raise VoladConfigError(f"{self.dataset.name}/{split}: no healthy subjects to calibrate on")
        return split + (" (healthy training subjects)" if split == "train" else " (healthy subjects)"), subjects

    def calibrate(self, fusion: Fusion) -> dict[str, Any]:
        """Fit every member's tail table on the healthy calibration scans."""
        which, subjects = self.calibration_subjects()
        transform = self.dataset.transform(anatomy=fusion.anatomy)
        scores: list[list[np.ndarray]] = [[] for _ in fusion.members]
        for subject in progress(subjects, "fusion: calibrating on healthy scans"):
            p = transform(subject)
            image, mask = p["image"].data.float().to(self.device), p["brain_mask"].data.float().to(self.device)
            inside = mask[0].bool()
            for i in range(len(fusion.members)):
                scores[i].append(fusion.member_map(i, image, mask)[0][inside].cpu().numpy())
        rng = np.random.default_rng(self.seed)
        tables = {}
        for i, name in enumerate(fusion.names):
            s = np.concatenate(scores[i])
            if s.size > self.max_calibration_voxels:
                s = rng.choice(s, self.max_calibration_voxels, replace=False)
            table = fit_tail(s, self.points, what=f"fusion member {name}")
            fusion.set_calibration(i, table)
            held = self.held_out(self.names.index(name), subjects)
            tables[name] = {"voxels": table.voxels, "median": float(np.median(s)), "p99": float(np.quantile(s, 0.99)), "max": float(s.max()),
                            "held_out_of_training": held,
                            "note": {True: "calibration scans held out of this member's training", None: "this member's training data could not be read",
                                     False: "this member trained on calibration scans: its tail is optimistic"}[held]}
        return {"split": which, "subjects": [s["subject_id"] for s in subjects], "members": tables}

    # -- the rule ------------------------------------------------------------------------
    def validation_cases(self, fusion: Fusion, post: PostProcessing) -> list[ValCase]:
        """Every member's calibrated map of each labelled val subject, cropped to the brain (float16) with a margin for ``post``."""
        cases = LabelledValidation(self.dataset, self.dataset.transform(anatomy=fusion.anatomy))
        if not len(cases):
            raise VoladConfigError(f"{self.dataset.name}/val has no labelled subjects to choose the fusion rule on")
        out = []
        for subject in progress(cases.subjects, "fusion: mapping val"):
            p = cases.transform(subject)
            image, mask = p["image"].data.float().to(self.device), p["brain_mask"].data.float().to(self.device)
            brain = mask[0].bool().cpu().numpy()
            spacing = tuple(float(x) for x in p["image"].spacing)
            box = _bounding_box(brain, max(post.voxels(spacing).values()) + 1)  # room for erosion and the median filter
            stack = fusion.surprisals(image, mask).cpu().numpy()[(slice(None), *box)].astype(np.float16)
            label = p["label"].data[0].numpy()[box] > 0
            out.append(ValCase(stack, label, brain[box], spacing))
        return out

    def val_auprc(self, cases: list[ValCase], keep: Sequence[int], rule: str, post: PostProcessing) -> float:
        """Val voxel AUPRC of the fused map of members ``keep`` under ``rule``, post-processed by ``post`` (what
        ``evaluate.json`` applies to the fused map), members weighted as the fusion would weigh them."""
        scores, labels, weights = [], [], self.weights_of(keep)
        for case in cases:
            fused = combine_surprisals(torch.from_numpy(case.stack[list(keep)].astype(np.float32)), rule, torch.tensor(weights)).numpy()
            fused = postprocess(fused, case.brain, case.spacing, post)
            scores.append(fused[case.brain])
            labels.append(case.label[case.brain])
        return average_precision(np.concatenate(scores), np.concatenate(labels))

    @property
    def chooses_on_val(self) -> bool:
        """Whether val labels choose anything (members or rule), or only report."""
        return self.select_members or self.combine == "auto"

    # -- main ------------------------------------------------------------------------------
    def run(self) -> Path:
        """Calibrate, choose, and save the fusion run; returns its checkpoint.

        Under ``torchrun`` rank 0 does it alone (it trains no network) while the others return.
        """
        if not distributed.is_main():
            return self.output_dir / "checkpoints" / "last.pt"
        with rundir.claim(self.output_dir, "training"):
            return self._run()

    def _run(self) -> Path:
        seed_everything(self.seed)
        start = time.perf_counter()
        everyone = list(range(len(self.runs)))
        print(
            f"volad: fusion of {len(self.runs)} runs ({', '.join(f'{n}: {p}' for n, p in zip(self.names, self.paths))}) "
            f"on {self.dataset.name}, contrasts {', '.join(self.dataset.contrasts)}, device {self.device}",
            flush=True,
        )
        fusion = self._fusion(everyone, "mean")
        post = report_postprocessing(fusion.hparams)  # what evaluate.json will apply to the fused map
        calibration = self.calibrate(fusion)
        cases = self.validation_cases(fusion, post)
        choice = choose_rule(
            lambda keep, rule: self.val_auprc(cases, keep, rule, post),
            self.names,
            combine=self.combine,
            select_members=self.select_members,
            min_gain=self.min_gain,
        )
        voxels = sum(int(c.brain.sum()) for c in cases)
        lesion_share = sum(int(c.label[c.brain].sum()) for c in cases) / max(voxels, 1)
        keep = choice["keep"]
        final = self._fusion(keep, choice["rule"], source=fusion)
        selection = {
            "members": self.member_records(everyone),
            "calibration": calibration,
            "selection": {
                "on": f"{self.dataset.name}/val: {len(cases)} labelled subjects, {voxels} brain voxels scored "
                f"(lesion share {lesion_share:.4f}); test labels are not read",
                "postprocessing": post.as_dict(),
                "min_gain": self.min_gain,
                "chosen": {"members": choice["members"], "rule": choice["rule"], "val_auprc": choice["val_auprc"],
                           "weights": {self.names[i]: w for i, w in zip(keep, self.weights_of(keep))} if choice["rule"] != "max" else None,
                           "weighting": self.weighting if choice["rule"] != "max" else "none (max)",
                           "chosen_on": "val" if self.chooses_on_val else "nothing: every member and a fixed rule (val only reports)"},
                "single_val_auprc": choice["single_val_auprc"],
                "candidates": choice["candidates"],
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(selection, self.output_dir / "fusion.json")
        first = self.runs[0]
        record = RunRecord(
            hparams=final.hparams,
            data={
                "train_dataset": first.data["train_dataset"],
                "train_root": first.data["train_root"],
                "train_spec": first.data.get("train_spec", first.data["train_dataset"]),
                "val_dataset": self.dataset.name,
                "val_root": str(Path(self.dataset.root).resolve()),
                "val_spec": self.dataset_spec,
                "contrasts": self.contrasts_of(keep),
                "loading": self.dataset.load_options(),
                "grid": first.data.get("grid"),
            },
            run={"seed": self.seed, "patch_size": 0, "batch_size": 1, "samples_per_volume": 0, "max_subjects": None},
            inference={"patch_size": None, "batch_size": 1},
            selection=selection["selection"],
        )
        payload = record.payload(final.state_dict(), stage="", epoch=0, completed_stages=[], val_auprc=choice["val_auprc"],
                                 best_val_auprc=choice["val_auprc"], cpu_minutes=0.0)
        path = save_checkpoint(self.output_dir / "checkpoints" / "last.pt", payload)
        (self.output_dir / "checkpoints" / "best.pt").unlink(missing_ok=True)  # a fusion has one checkpoint
        _print_selection(choice, calibration, self.chooses_on_val, selection["selection"]["chosen"]["weights"])
        print(f"volad: fusion saved: {path} ({selection['seconds']:.0f} s); selection record: {self.output_dir / 'fusion.json'}", flush=True)
        return path


def _training_files(run) -> set[Path] | None:
    """The image files a member run trained on (its training dataset's ``train`` split, capped as it was), or ``None``
    when that data cannot be opened here (moved, or another machine's): then nothing about it can be checked."""
    try:
        ds = load_dataset(run.data.get("train_spec", run.data["train_dataset"]), run.data["train_root"], run.data["contrasts"])
        ids = ds.split_ids("train")[: run.run.get("max_subjects")]
        return {p.resolve() for sid in ids for p in ds.path_of(sid, "contrast")}
    except (VoladConfigError, VoladDataError):
        return None


def _split_views(paths: Sequence[Path], names: Sequence[str], runs: Sequence[TrainedRun]) -> tuple[list[Path], list[str], list[TrainedRun]]:
    """Each run whose method has more than one contrast view (:meth:`volad.methods.base.AnomalyMethod.contrast_views`)
    replaced by one member per view, named ``<run>:<contrast><+ or ->``; the others as they are."""
    out: tuple[list[Path], list[str], list[TrainedRun]] = ([], [], [])
    for path, name, run in zip(paths, names, runs):
        cls = run.method_class
        views = cls.contrast_views(run.hparams)
        if len(views) < 2:
            members = [(name, run)]
        else:
            members = []
            for channel, sign in views:
                hparams, state = cls.view(run.hparams, run._state, channel, sign)
                contrast = run.data["contrasts"][channel]
                view = dataclasses.replace(run, hparams=hparams, data={**run.data, "contrasts": [contrast]}, _state=state)
                members.append((f"{name}:{contrast}{'+' if sign == 'bright' else '-' if sign == 'dark' else ''}", view))
        for member_name, member in members:
            out[0].append(path)
            out[1].append(member_name)
            out[2].append(member)
    return out


def _names(paths: Sequence[Path]) -> list[str]:
    """Member names: each run folder's name, numbered when two share one."""
    names: list[str] = []
    for p in paths:
        name = p.resolve().name
        names.append(name if name not in names else f"{name}_{sum(n.startswith(name) for n in names) + 1}")
    return names


def _print_selection(choice: dict[str, Any], calibration: dict[str, Any], on_val: bool, weights: dict[str, float] | None) -> None:
    print(f"volad: calibrated on {calibration['split']}: {len(calibration['subjects'])} scans; "
          + ", ".join(f"{n}: {t['note']}" for n, t in calibration["members"].items()))
    print("volad: val AUPRC of each member alone (healthy-calibrated): " + ", ".join(f"{n} {v:.4f}" for n, v in choice["single_val_auprc"].items()))
    if on_val:
        print(f"volad: chosen on val: {choice['rule']} of {', '.join(choice['members'])}, val AUPRC {choice['val_auprc']:.4f}")
    else:
        print(f"volad: fused (nothing chosen on val): {choice['rule']} of every member ({', '.join(choice['members'])}), val AUPRC {choice['val_auprc']:.4f}")
    if weights and len(set(round(w, 12) for w in weights.values())) > 1:
        print("volad: weights (every method votes once; members of one method share its vote): " + ", ".join(f"{n} {w:.3f}" for n, w in weights.items()))

