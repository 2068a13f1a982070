"""Dataset manifests: a JSON description of a dataset's layout turned into ``tio.Subject``s.

A manifest (``data_manifests/<name>.json``, format in ``data_manifests/README.md``
and ``data_manifests/schema.json``) says where each contrast, the brain mask and
the lesion label of a subject live, how label values map to anomaly/normal, and
which subjects form the healthy training, labelled validation and test splits.

Patterns use named fields in braces, e.g. ``"{subject}/{subject}_flair.nii.gz"``
or ``"Training/{site}/{subject}/ses-1/anat/{subject}_ses-1_T1w.nii.gz"``. Subjects
are discovered by globbing the ``subjects`` pattern; every field it captures is
available to the other patterns. A pattern may also be a list of alternatives
(for example ``.nii`` and ``.nii.gz``); the first existing file wins.

Loading is lazy: building subjects reads only headers (to check that files exist,
are 3D and share one grid), so a dataset of hundreds of volumes costs no memory
until a volume is used.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torchio as tio

from volad.data import splits as split_rules
from volad.data.participants import normalise_id, read_participants
from volad.data.readers import Reader, make_reader
from volad.errors import VoladConfigError, VoladDataError
from volad.io import Geometry, read_geometry, read_image, waiting_lock
from volad.types import unset

log = logging.getLogger("volad.data.manifest")
#: Participants tables found missing, said once each.
_MISSING_TABLES: set[Path] = set()

SPLITS = ("train", "val", "test")
_FIELD = re.compile(r"\{(\w+)\}")


def manifests_dir() -> Path:
    """Folder holding the shipped manifests (``$VOLAD_MANIFESTS`` overrides)."""
    env = os.environ.get("VOLAD_MANIFESTS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "data_manifests"
    return here if here.is_dir() else Path.cwd() / "data_manifests"


def cache_dir() -> Path:
    """volad's cache for generated data (``$VOLAD_CACHE``, else ``~/.cache/volad``)."""
    return Path(os.environ.get("VOLAD_CACHE", Path.home() / ".cache" / "volad"))


def known_datasets() -> list[str]:
    return sorted(p.stem for p in manifests_dir().glob("*.json") if p.stem != "schema")


def read_manifest(dataset: str | Path) -> tuple[dict[str, Any], Path]:
    """Find and parse a manifest by name or path.

    Raises:
        VoladConfigError: the name is neither a shipped manifest nor a JSON file.
    """
    candidate = Path(str(dataset))
    if candidate.is_dir() and (candidate / "manifest.json").is_file():
        candidate = candidate / "manifest.json"  # a self-describing dataset folder (volad preprocess)
    if candidate.suffix == ".json" and candidate.is_file():
        path = candidate
    else:
        path = manifests_dir() / f"{dataset}.json"
        if not path.is_file():
            raise VoladConfigError(
                f"unknown dataset {str(dataset)!r}: not a manifest in {manifests_dir()} "
                f"(known: {', '.join(known_datasets()) or 'none'}) nor a path to a manifest JSON file"
            )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VoladDataError(path, f"is not valid JSON ({exc})") from exc
    validate_manifest(manifest, path)
    return manifest, path


@functools.lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema

    schema = json.loads((manifests_dir() / "schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def validate_manifest(manifest: Any, path: str | Path) -> None:
    """Check a manifest against ``data_manifests/schema.json``.

    Raises:
        VoladDataError: naming the manifest file and the first offending field.
    """
    import jsonschema

    error = jsonschema.exceptions.best_match(_schema_validator().iter_errors(manifest))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise VoladDataError(path, f"manifest field {where}: {error.message}")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, pos, seen = [], 0, set()
    for m in _FIELD.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        name = m.group(1)
        out.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)")
        seen.add(name)
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z")


def _fill(pattern: str | Sequence[str], fields: dict[str, str], root: Path) -> Path:
    options = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = [root / p.format(**fields) for p in options]
    for p in paths:
        if p.exists():
            return p
    return paths[0]


@dataclass
class Dataset:
    """A dataset on disk described by a manifest.

    Attributes:
        name: Manifest name.
        root: Folder holding the files.
        manifest: The parsed manifest.
        contrasts: Contrasts stacked as image channels, in order.
    """

    name: str
    root: Path
    manifest: dict[str, Any]
    contrasts: list[str]
    _fields: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)
    _splits: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def reader(self) -> Reader:
        """How this dataset's image files are read (NIfTI unless the manifest says otherwise)."""
        return make_reader(self.manifest.get("reader"))

    # -- discovery -----------------------------------------------------------------
    def discover(self) -> dict[str, dict[str, str]]:
        """Map subject ID → captured pattern fields, found by globbing the subjects pattern."""
        if self._fields:
            return self._fields
        self._fields = self.find_subjects(self.discovery_pattern)
        return self._fields

    @property
    def discovery_pattern(self) -> str | list[str]:
        """The file (pattern) whose presence makes a subject: ``subjects``, else the first chosen contrast's."""
        return self.manifest.get("subjects") or self.manifest["contrasts"][self.contrasts[0]]

    def find_subjects(self, pattern: str | Sequence[str]) -> dict[str, dict[str, str]]:
        """Subject ID → captured fields of every file under the root that matches ``pattern``."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        found: dict[str, dict[str, str]] = {}
        for pat in patterns:
            rx = _pattern_regex(pat)
            for path in sorted(self.root.glob(_FIELD.sub("*", pat))):
                m = rx.match(path.relative_to(self.root).as_posix())
                if m is None:
                    continue
                fields = m.groupdict()
                fields["_stem"] = path.name.split(".")[0]
                try:
                    sid = self.manifest.get("subject_id", "{subject}").format(**fields)
                except KeyError:  # a pattern that does not capture every field of the subject ID
                    continue
                found.setdefault(sid, fields)
        return found

    def annotation_csv(self) -> Path | None:
        """The annotation file named by the manifest (FastMRI+), if any."""
        spec = self.manifest.get("annotations")
        if not spec:
            return None
        csv = spec["csv"]
        options = [csv] if isinstance(csv, str) else list(csv)
        paths = [Path(p) if Path(p).is_absolute() else self.root / p for p in options]
        return next((p for p in paths if p.is_file()), paths[0])

    def status(self, subject_id: str) -> tuple[str | None, str | None]:
        """``(status, category)`` of a subject under the manifest's ``health`` entry."""
        spec = self.manifest.get("health")
        if spec is None:
            return None, None
        fields = self.discover().get(subject_id, {})
        annotated = None
        if spec == "annotations":
            from volad.data import fastmri

            normal = self.manifest["annotations"].get("normal_labels", list(fastmri.NORMAL_LABELS))
            rows = fastmri.read_annotations(self.annotation_csv()).get(Path(self.path_of(subject_id, "contrast")[0]).stem)
            annotated = fastmri.health_status(rows, normal)
        return split_rules.classify(spec, fields, annotated)

    def metadata(self, subject_id: str) -> dict[str, str]:
        """What the dataset records about a subject beyond its images, as text: the manifest's ``metadata_fields``
        (parts of its file names, e.g. IXI's site) and the ``columns`` of its participants table (e.g. sex and age;
        :mod:`volad.data.participants`). A subject the table lacks, or a table that is not there, gives empty values
        (said once in the log)."""
        fields = self.discover().get(subject_id, {})
        out = {key: str(fields.get(key, "")) for key in self.manifest.get("metadata_fields", [])}
        spec = self.manifest.get("participants")
        if not spec:
            return out
        path = self.root / spec["file"]
        rows = {}
        if path.is_file():
            rows = read_participants(path, spec["id_column"])
        elif path not in _MISSING_TABLES:
            _MISSING_TABLES.add(path)
            log.warning("%s: participants table not found; its columns (%s) stay empty", path, ", ".join(spec["columns"]))
        row = rows.get(normalise_id(fields.get(spec.get("match", ""), subject_id)), {})
        for key, column in spec["columns"].items():
            value = row.get(column, "")
            out[key] = str(spec.get("values", {}).get(key, {}).get(value, value))
        return out

    def split_table(self) -> dict[str, list[str]]:
        """Every split's subject IDs: from the split file, inline lists, or the manifest's rule."""
        if self._splits is not None:
            return self._splits
        spec = self.manifest["splits"]
        if "file" in spec:
            path = Path(spec["file"]) if Path(spec["file"]).is_absolute() else self.root / spec["file"]
            if not path.is_file():
                raise VoladDataError(path, f"split file of dataset {self.name!r} not found")
            table = json.loads(path.read_text())
        elif "rule" in spec:
            members = {sid: self.status(sid) for sid in self.discover()}
            table = split_rules.assign(members, spec["rule"], where=f"dataset {self.name!r} at {self.root}")
        else:
            table = spec
        self._splits = {k: list(v) for k, v in table.items()}
        return self._splits

    def split_ids(self, split: str) -> list[str]:
        """Subject IDs of a split (``train``, ``val`` or ``test``)."""
        table = self.split_table()
        if split not in table:
            raise VoladConfigError(f"dataset {self.name!r} has no split {split!r} (has: {', '.join(table)})")
        return list(table[split])

    # -- files ---------------------------------------------------------------------
    def path_of(self, subject_id: str, what: str) -> list[Path]:
        """Files of a subject: ``"contrast"`` (one per chosen contrast), ``"brain_mask"`` or ``"label"``.

        Per-subject ``overrides`` name a file to use when the pattern's file is
        absent (BraTS 2020's misnamed segmentation of case 355, which some copies
        have already renamed).
        """
        fields = self.discover().get(subject_id)
        if fields is None:
            raise VoladDataError(self.root, f"subject {subject_id!r} of dataset {self.name!r} not found under this root")
        override = self.manifest.get("overrides", {}).get(subject_id, {})

        def find(pattern, extra: str | None) -> Path:
            options = [pattern] if isinstance(pattern, str) else list(pattern)
            # The pattern's file wins when present (a user may have renamed the odd file).
            return _fill(options + ([extra.replace("{", "{{").replace("}", "}}")] if extra else []), fields, self.root)

        if what == "contrast":
            return [find(self.manifest["contrasts"][c], override.get("contrasts", {}).get(c)) for c in self.contrasts]
        pattern = (self.manifest.get(what) or {}).get("pattern")
        if pattern is None:
            return [self.root / override[what]]
        return [find(pattern, override.get(what))]

    # -- subjects ------------------------------------------------------------------
    def subject(self, subject_id: str, split: str | None = None) -> tio.Subject:
        """Build one lazily loaded subject, checking headers and geometry.

        Raises:
            VoladDataError: a file is missing, not 3D, or off the image's grid.
        """
        image_paths = self.path_of(subject_id, "contrast")
        given_mask = self.mask_is_given or "brain_mask" in self.manifest.get("overrides", {}).get(subject_id, {})
        entries = self.image_entries(subject_id, image_paths, self.path_of(subject_id, "brain_mask")[0] if given_mask else None, split)
        ref = self.reader.geometry(image_paths[0])
        status, category = self.status(subject_id)
        entries.update(status=status or "", category=category or "")
        fields = self.discover()[subject_id]
        for key in self.manifest.get("metadata_fields", []):
            entries[key] = fields.get(key, "")
        label_spec = self.manifest.get("label")
        entries["has_label"] = False
        if label_spec and label_spec.get("annotations") == "fastmri_plus":
            from volad.data.fastmri import read_fastmri_label

            csv_path = self.annotation_csv()
            label_reader = functools.partial(
                read_fastmri_label,
                csv_path=csv_path,
                normal_labels=tuple(self.manifest["annotations"].get("normal_labels", ("Normal for age",))),
                **{k: v for k, v in (self.manifest.get("reader") or {}).items() if k == "key"},
            )
            entries["label"] = tio.LabelMap(image_paths[0], reader=label_reader)
            entries["has_label"] = status is not None
        elif label_spec:
            lpath = self.path_of(subject_id, "label")[0]
            if lpath.exists():
                _check_grid(lpath, read_geometry(lpath), image_paths[0], ref)
                entries["label"] = tio.LabelMap(lpath, reader=read_image)
                entries["has_label"] = True
            elif label_spec.get("missing", "error") == "error" and split != "train":
                raise VoladDataError(lpath, f"lesion label of subject {subject_id!r} not found")
        return tio.Subject(entries)

    @property
    def mask_is_given(self) -> bool:
        """Whether the manifest names a brain-mask file per subject (else the mask is derived from the image)."""
        return "pattern" in self.manifest.get("brain_mask", {"derive": "nonzero"})

    def image_entries(self, subject_id: str, image_paths: Sequence[Path], brain_mask: Path | None, split: str | None = None) -> dict[str, Any]:
        """The image part of a subject read this dataset's way: contrasts on one grid, a given or derived brain mask.

        Used for the dataset's own subjects and for scans given by path (:mod:`volad.data.scans`).

        Raises:
            VoladDataError: a file is missing, not 3D, or off the first contrast's grid.
        """
        reader = self.reader
        image_paths = [Path(p) for p in image_paths]
        ref = reader.geometry(image_paths[0])
        for p in image_paths[1:]:
            _check_grid(p, reader.geometry(p), image_paths[0], ref)
        entries: dict[str, Any] = {
            "image": tio.ScalarImage(path=image_paths if len(image_paths) > 1 else image_paths[0], reader=reader.read),
            "subject_id": subject_id,
            "split": split or "",
            "dataset": self.name,
            "contrasts": list(self.contrasts),
            "image_paths": [str(p) for p in image_paths],
            "label_values": self.manifest.get("label", {}).get("anomaly_values", "nonzero"),
            "label_declared": self.manifest.get("label", {}).get("values", "any"),
            "derive_mask": "",
            "status": "",
            "category": "",
        }
        if brain_mask is not None:
            _check_grid(Path(brain_mask), read_geometry(brain_mask), image_paths[0], ref)
            entries["brain_mask"] = tio.LabelMap(brain_mask, reader=read_image)
        else:
            entries["derive_mask"] = self.manifest.get("brain_mask", {"derive": "nonzero"}).get("derive", "nonzero")
        return entries

    def subjects(self, split: str, limit: int | None = None) -> list[tio.Subject]:
        """All subjects of a split, in manifest order."""
        ids = self.split_ids(split)
        if limit is not None:
            ids = ids[:limit]
        return [self.subject(sid, split) for sid in ids]

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`volad.data.preprocessing.preprocessing` for this dataset."""
        intensity = self.manifest.get("intensity", {})
        return {
            "intensity": intensity.get("mode", "percentile"),
            "percentiles": tuple(intensity.get("percentiles", (1.0, 99.0))),
        }

    def transform(self, anatomy: str | None = None, grid: dict | None = None) -> tio.Compose:
        """The on-load preprocessing chain for this dataset's subjects.

        Args:
            anatomy: The method's ``anatomy`` (:mod:`volad.data.anatomy`): channels appended behind the contrasts.
            grid: ``{"orientation": "RAS", "spacing": [...]}`` to reorient and resample to first
                (scans given by path, stored unlike the training data); ``None`` keeps the input grid.
        """
        from volad.data.preprocessing import preprocessing

        grid = grid or {}
        return preprocessing(**self.load_options(), anatomy=anatomy, orientation=grid.get("orientation"), spacing=grid.get("spacing"))

    def grid(self, split: str = "train") -> dict | None:
        """Orientation and voxel spacing of the first subject of ``split`` (what its network saw), or ``None``
        when the split is empty or its files carry no geometry (pictures, k-space files)."""
        try:
            ids = self.split_ids(split)
            geom = read_geometry(self.path_of(ids[0], "contrast")[0]) if ids else None
        except (VoladDataError, VoladConfigError, IndexError):
            return None
        return None if geom is None else {"orientation": geom.orientation, "spacing": [round(v, 4) for v in geom.spacing]}


def _check_grid(path: Path, geom: Geometry, ref_path: Path, ref: Geometry) -> None:
    if not geom.matches(ref):
        raise VoladDataError(
            path,
            f"geometry differs from {ref_path.name}: shape {geom.shape} vs {ref.shape}, "
            f"affine max difference {abs(geom.affine - ref.affine).max() if geom.shape == ref.shape else 'n/a'}",
        )


def _generator(manifest: dict[str, Any]) -> Callable[..., Any] | None:
    spec = manifest.get("generator")
    if not spec:
        return None
    module, _, func = spec["function"].partition(":")
    return getattr(importlib.import_module(module), func)


def _check_generated_version(marker: Path, gen: Callable[..., Any], name: str) -> None:
    """Refuse a generated dataset made by another version of its generator (the same seed would now give other images)."""
    version = getattr(importlib.import_module(gen.__module__), "VERSION", None)
    if version is None:
        return
    recorded = json.loads(marker.read_text() or "{}").get("version")
    if recorded != version:
        raise VoladDataError(
            marker.parent,
            f"holds dataset {name!r} made by version {recorded} of its generator; this volad makes version {version}. "
            "Delete the folder (volad generates it again on first use) or point --data_root elsewhere",
        )


def load_dataset(
    dataset: str | Path = "phantom",
    data_root: str | Path | None = None,
    contrasts: Sequence[str] | str | None = None,
) -> Dataset:
    """Open a dataset by manifest name (or manifest path) and root folder.

    Datasets that volad generates (``synthetic``, ``phantom``) are built on first
    use into ``data_root`` (default: volad's cache) and reused afterwards; processes
    that ask for one at once (torchrun's ranks) wait while the first builds it.

    Args:
        dataset: Manifest name in ``data_manifests/``, a path to a manifest JSON,
            or a folder holding ``manifest.json`` (what ``volad preprocess`` writes).
        data_root: Folder with the data; ``None`` uses the manifest's own
            ``root`` (relative to the manifest file) or ``<cache>/<dataset>``.
        contrasts: Contrasts to stack as channels (names or the manifest's
            ``contrast_aliases``, or ``"all"``: :func:`chosen_contrasts`); default the manifest's ``default_contrasts``.

    Raises:
        VoladConfigError: unknown dataset or contrast.
        VoladDataError: the root is missing and the dataset cannot be generated.
    """
    manifest, mpath = read_manifest(dataset)
    name = manifest["name"]
    if not unset(data_root):
        root = Path(data_root)
    elif "root" in manifest:
        root = (mpath.parent / manifest["root"]).resolve()
    else:
        root = cache_dir() / name
    gen = _generator(manifest)
    if gen is not None:
        marker = root / ".volad_complete"
        if not marker.exists():  # built once, by whichever process comes first; the others wait and read it
            with waiting_lock(root.parent / f".{root.name}.lock", f"dataset {name!r} in {root}"):
                if not marker.exists():
                    gen(root, **manifest["generator"].get("kwargs", {}))
        _check_generated_version(marker, gen, name)
    elif not root.is_dir():
        raise VoladDataError(root, f"data root of dataset {name!r} not found (point --data_root, or --root for volad data/preprocess, at it)")
    chosen = chosen_contrasts(manifest, contrasts)
    if manifest.get("one_contrast_per_subject") and len(chosen) > 1:
        raise VoladConfigError(
            f"dataset {name!r} ({mpath}) stores one contrast per study; choose one of {', '.join(manifest['contrasts'])}, not {', '.join(chosen)}"
        )
    unknown = [c for c in chosen if c not in manifest["contrasts"]]
    if unknown:
        raise VoladConfigError(
            f"dataset {name!r} ({mpath}) has no contrast {unknown[0]!r} (has: {', '.join(manifest['contrasts'])})"
        )
    return Dataset(name=name, root=root, manifest=manifest, contrasts=chosen)


def check_same_loading(first: Dataset, second: Dataset) -> None:
    """Refuse to combine datasets that would be read differently (cross-dataset runs).

    Training on one dataset and evaluating on another is only meaningful when both
    reach the network through the same on-load chain and file format.

    Raises:
        VoladConfigError: the datasets' readers or intensity handling differ.
    """
    a = {**first.load_options(), "reader": first.manifest.get("reader") or {"format": "nifti"}}
    b = {**second.load_options(), "reader": second.manifest.get("reader") or {"format": "nifti"}}
    if a != b:
        diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b.get(k))
        raise VoladConfigError(f"datasets {first.name!r} and {second.name!r} are loaded differently ({diff}); they cannot be combined")


def every_contrast(contrasts: Sequence[str] | str | None) -> bool:
    """Whether ``contrasts`` asks for every contrast a dataset has (``"all"``, alone or as the only item of a list)."""
    return contrasts in ("all", ["all"], ("all",))


def chosen_contrasts(manifest: dict, contrasts: Sequence[str] | str | None) -> list[str]:
    """The contrasts a dataset is read with: those given (names or ``contrast_aliases``), ``"all"`` for every contrast
    its subjects have (the default one where each study has one), or ``None`` for the manifest's ``default_contrasts``."""
    default = list(manifest.get("default_contrasts") or list(manifest["contrasts"])[:1])
    if every_contrast(contrasts):
        return default if manifest.get("one_contrast_per_subject") else list(manifest["contrasts"])
    if isinstance(contrasts, str):
        contrasts = [contrasts]
    aliases = manifest.get("contrast_aliases", {})
    return [aliases.get(c, c) for c in (contrasts or default)]


def channel_count(dataset: str | Path = "phantom", contrasts: Sequence[str] | str | None = None) -> int:
    """Number of input channels a dataset gives with these contrasts (no data is read)."""
    if contrasts and not every_contrast(contrasts):
        return 1 if isinstance(contrasts, str) else len(contrasts)
    manifest, _ = read_manifest(dataset)
    return len(chosen_contrasts(manifest, contrasts))
