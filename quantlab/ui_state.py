"""What the dashboard pages decide, without Streamlit: settings, choices, uploads, row views.

The pages in pages/ draw widgets; every default, grouping, check and table they show comes from here,
so it can be tested without a browser.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .analysis import MISSING, NO_LABELS, quality_metric
from .cache import DEFAULT_CACHE_DIR, ArtifactCache
from .config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings
from .errors import QuantLabError, without_technique
from .pool import PoolLimits
from .runner import SweepOptions, ray_address_from_env
from .store import DEFAULT_DB_PATH, Store
from .techniques import Param, Technique, all_techniques, get_technique, params_text

DEFAULT_MODEL = "seed-cnn"
DEFAULT_DATASET = "digits-28"
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".zip", ".tflite")
DATASET_SUFFIXES = (".npz",)
DEFAULT_MAX_UPLOAD_MB = 200
DEMO_MAX_UPLOAD_MB = 20
DEMO_MAX_UPLOADS = 10  # files one browser session may upload in demo mode
DEMO_TASK_TIMEOUT_SECONDS = 600.0
DEMO_MEMORY_LIMIT_MB = 4000.0

FAMILY_TITLES = {
    "baseline": "Baseline (Keras)",
    "uploaded": "Uploaded TensorFlow Lite file",
    "float": "TFLite float",
    "ptq": "Post-training quantization",
    "qat": "Quantization-aware training",
    "cluster": "Weight clustering",
    "clustering": "Weight clustering",
    "prune": "Pruning",
    "pruning": "Pruning",
    "litert": "LiteRT Quantizer (int4, weight-only, static recipes)",
}
MODEL_KIND_WORDS = {"keras": "a Keras model", "savedmodel": "a SavedModel", "tflite": "a .tflite file"}


# --- settings -------------------------------------------------------------------------------------


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    text = environ.get(name, "").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    return default


def _positive_int(environ: Mapping[str, str], name: str, default: int, notes: list[str]) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
        if value < 1 or not math.isfinite(float(text)):
            raise ValueError
        return value
    except ValueError:
        notes.append(f"{name}={text!r} is not a whole number of at least 1; using {default}")
        return default


@dataclass(frozen=True)
class AppSettings:
    """How this dashboard is set up, from the environment.

    QUANTLAB_DB (results database), QUANTLAB_CACHE (artifacts folder), QUANTLAB_DEMO=1 (a hosted
    demo: smaller uploads, per-variant time and memory limits), QUANTLAB_READ_ONLY=1 (view results,
    run nothing), QUANTLAB_UPLOADS=0 (built-in models and datasets only), QUANTLAB_MAX_UPLOAD_MB,
    QUANTLAB_MAX_SWEEPS (sweeps run at once; more wait in a queue).
    """

    db_path: Path = DEFAULT_DB_PATH
    cache_dir: Path = DEFAULT_CACHE_DIR
    demo: bool = False
    read_only: bool = False
    uploads_enabled: bool = True
    max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB
    max_concurrent: int = 1
    max_uploads: int = 0  # files per browser session; 0 means no limit
    notes: tuple[str, ...] = ()  # settings that were ignored, in words

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AppSettings":
        env = os.environ if environ is None else environ
        notes: list[str] = []
        demo = _flag(env, "QUANTLAB_DEMO", False)
        cache_dir = Path(env.get("QUANTLAB_CACHE") or DEFAULT_CACHE_DIR)
        db_default = cache_dir / DEFAULT_DB_PATH.name if env.get("QUANTLAB_CACHE") else DEFAULT_DB_PATH
        return cls(
            db_path=Path(env.get("QUANTLAB_DB") or db_default),
            cache_dir=cache_dir,
            demo=demo,
            read_only=_flag(env, "QUANTLAB_READ_ONLY", False),
            uploads_enabled=_flag(env, "QUANTLAB_UPLOADS", True),
            max_upload_mb=_positive_int(env, "QUANTLAB_MAX_UPLOAD_MB",
                                        DEMO_MAX_UPLOAD_MB if demo else DEFAULT_MAX_UPLOAD_MB, notes),
            max_concurrent=_positive_int(env, "QUANTLAB_MAX_SWEEPS", 1, notes),
            max_uploads=0 if env.get("QUANTLAB_MAX_UPLOADS", "").strip() == "0" else
            _positive_int(env, "QUANTLAB_MAX_UPLOADS", DEMO_MAX_UPLOADS if demo else 0, notes),
            notes=tuple(notes),
        )

    def store(self) -> Store:
        return Store(self.db_path, read_only=self.read_only)

    def cache(self) -> ArtifactCache:
        return ArtifactCache(self.cache_dir)

    def upload_limits(self) -> Any:
        """safe_load.UploadLimits with this upload cap."""
        from .safe_load import UploadLimits

        return UploadLimits(max_bytes=self.max_upload_mb * 1024 * 1024)

    def sweep_options(self, remeasure: bool = False) -> SweepOptions:
        limits = PoolLimits(task_timeout_seconds=DEMO_TASK_TIMEOUT_SECONDS,
                            memory_limit_mb=DEMO_MEMORY_LIMIT_MB) if self.demo else PoolLimits()
        return SweepOptions(limits=limits, source="app", remeasure=remeasure, ray=ray_address_from_env())

    def executor_text(self) -> str:
        """Where this dashboard's sweeps run, when not on its own worker pool (QUANTLAB_RAY_ADDRESS)."""
        address = ray_address_from_env()
        if not address:
            return ""
        where = "a Ray that this server starts" if address == "local" else f"the Ray cluster at `{address}`"
        return f"Runs on {where}: each variant is a Ray task, and its row names the node."

    def check_upload_quota(self, uploads_so_far: int) -> None:
        """Refuse one more upload when this session has used its quota (demo mode)."""
        if self.max_uploads and uploads_so_far >= self.max_uploads:
            raise QuantLabError(f"this session has uploaded {uploads_so_far} files, the limit of this "
                                f"hosted demo; open a new session or run QuantLab yourself for more")

    @property
    def can_run(self) -> bool:
        return not self.read_only

    def mode_lines(self) -> list[str]:
        """What is restricted here, in words (empty for a normal local run)."""
        lines = []
        if self.demo:
            lines.append(f"Demo: uploads up to {self.max_upload_mb} MB, each variant limited to "
                         f"{DEMO_TASK_TIMEOUT_SECONDS / 60:.0f} min and {DEMO_MEMORY_LIMIT_MB / 1000:.0f} GB.")
            lines.append(f"Sweeps run {self.max_concurrent} at a time; more wait in a queue, so that "
                         f"measurements are not slowed by each other.")
        if self.max_uploads:
            lines.append(f"At most {self.max_uploads} uploads per browser session.")
        if self.read_only:
            lines.append("Read-only: stored results can be viewed, new sweeps cannot be run.")
        if not self.uploads_enabled:
            lines.append("Uploads are turned off: built-in models and datasets only.")
        return lines + list(self.notes)


# --- choosing techniques --------------------------------------------------------------------------


@dataclass(frozen=True)
class TechniqueChoice:
    technique: Technique
    available: bool
    reason: str = ""          # why it cannot run on this model, when not available
    default_selected: bool = False


@dataclass(frozen=True)
class TechniqueGroup:
    family: str
    title: str
    choices: tuple[TechniqueChoice, ...]


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family.replace("-", " ").replace("_", " ").capitalize())


def technique_groups(model_kind: str = "keras", refused: dict[str, str] | None = None) -> list[TechniqueGroup]:
    """Every registered technique, grouped by family in registry order, marked runnable or not
    (`refused`: {technique id: reason} known for this model, see upload_refusals).

    Selected by default: what runs on this model without re-training (one click gives a full
    post-training comparison); techniques that fine-tune, and a recipe that needs writing first
    (lq-recipe), are offered but left for the user to tick.
    """
    groups: dict[str, list[TechniqueChoice]] = {}
    for technique in all_techniques():
        available = model_kind in technique.sources
        reason = "" if available else (
            f"needs {' or '.join(MODEL_KIND_WORDS.get(s, s) for s in technique.sources)}; "
            f"the current model is {MODEL_KIND_WORDS.get(model_kind, model_kind)}")
        if available and technique.id in (refused or {}):
            available, reason = False, refused[technique.id]
        groups.setdefault(technique.family, []).append(
            TechniqueChoice(technique, available, reason,
                            available and not technique.fine_tunes and technique.in_all))
    return [TechniqueGroup(family, family_title(family), tuple(choices)) for family, choices in groups.items()]


def upload_refusals(model_path: str | None, dataset_has_labels: bool | None = None,
                    dataset_has_train: bool | None = None) -> dict[str, str]:
    """{technique id: why it cannot run} for an uploaded model (and dataset), known before any worker
    starts: read from the model's config and the dataset's arrays (quantlab.applicability)."""
    from .applicability import describe_model_file, refusals

    if not model_path:
        return {}
    manifest = describe_model_file(model_path)
    if not manifest:
        return {}
    if dataset_has_labels is not None:
        manifest["has_labels"] = dataset_has_labels
    if dataset_has_train is not None:
        manifest["split_sizes"] = {"train": 1 if dataset_has_train else 0}
    else:
        manifest["split_sizes"] = {"train": 1}  # unknown until the dataset is chosen: not refused
    return refusals(manifest, [t.id for t in all_techniques()])


NO_LABELS_UPLOAD = ("This dataset has no labels (no y_test): variants are compared on agreement with "
                    "the float model (top-1 agreement, SQNR), accuracy is not measured, and techniques "
                    "that fine-tune are not available.")


def file_stamp(*paths: str | None) -> tuple:
    """(path, size, mtime) of each existing file: a cache key that changes when a file does."""
    stamp = []
    for path in paths:
        try:
            info = Path(path).stat() if path else None
        except OSError:
            info = None
        stamp.append((path, info.st_size, info.st_mtime) if info else (path, None, None))
    return tuple(stamp)


def dataset_facts(path: str | None) -> tuple[bool | None, bool | None]:
    """(has labels, has a train split) of an uploaded .npz, or (None, None) for a built-in."""
    if not path or not str(path).lower().endswith(".npz"):
        return None, None
    from .safe_load import load_npz_dataset

    try:
        arrays = load_npz_dataset(path)
    except QuantLabError:
        return None, None
    has_train = "x_train" in arrays or any(name.startswith("x_train_") for name in arrays)  # per input
    return "y_test" in arrays, has_train


def dataset_fit_error(model_path: str | None, dataset_path: str | None) -> str | None:
    """Why an uploaded dataset's samples cannot feed an uploaded one-input Keras model, read from the
    model's config and the arrays (the check the sweep makes when it prepares), or None."""
    from .applicability import describe_model_file
    from .safe_load import load_npz_dataset, validate_dataset_for_model

    if not model_path or not dataset_path or not str(dataset_path).lower().endswith(".npz"):
        return None
    shape = describe_model_file(model_path).get("input_shape")
    if not shape or any(d is None for d in shape):
        return None  # several inputs, a variable dimension, or not written: the sweep checks it
    try:
        arrays = load_npz_dataset(dataset_path)
        validate_dataset_for_model({k: v for k, v in arrays.items() if k in ("x_test", "x_train", "x_calib")},
                                   shape, num_classes=1)
    except QuantLabError as error:
        return str(error).splitlines()[0]
    return None


def unavailable_techniques() -> dict[str, str]:
    """Techniques QuantLab knows of but cannot run with the installed libraries, with the reason."""
    from .techniques import unsupported_techniques

    return unsupported_techniques()


def technique_tags(technique: Technique) -> list[str]:
    """Short facts shown next to a technique's name."""
    tags = []
    if technique.needs_calibration:
        tags.append("uses calibration data")
    if technique.fine_tunes:
        tags.append("re-trains (slower)")
    if technique.integer_only:
        tags.append("integer only")
    return tags


@dataclass(frozen=True)
class ParamInput:
    """How to draw one technique parameter as a widget."""

    widget: str               # selectbox, checkbox, int, float, text
    label: str
    help: str
    default: Any
    options: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


def param_input(param: Param) -> ParamInput:
    label = param.name.replace("_", " ")
    if param.choices:
        return ParamInput("selectbox", label, param.help, param.default, tuple(param.choices))
    if isinstance(param.default, bool):
        return ParamInput("checkbox", label, param.help, param.default)
    if isinstance(param.default, str):
        return ParamInput("text", label, param.help, param.default)
    if isinstance(param.default, int):
        return ParamInput("int", label, param.help, param.default,
                          minimum=None if param.minimum is None else int(math.ceil(param.minimum)),
                          maximum=None if param.maximum is None else int(param.maximum), step=1)
    default = float(param.default)
    span = (param.maximum - param.minimum) if param.minimum is not None and param.maximum is not None else None
    step = span / 100 if span else (abs(default) / 10 if default else 0.01)
    return ParamInput("float", label, param.help, default, minimum=param.minimum, maximum=param.maximum,
                      step=step)


def _refuse_server_paths(technique: Technique, params: Mapping[str, Any]) -> None:
    """In the browser a text parameter (a recipe) is the JSON itself: a path would read a file on the
    server, which only the command line may do."""
    for param in technique.params:
        value = str(params.get(param.name) or "").strip()
        if param.kind == "text" and value and not value.startswith(("[", "{")):
            raise QuantLabError(f"{technique.id}: paste the {param.name} itself (JSON); a file path is "
                                f"read only by the command line")


def build_technique_specs(choices: Mapping[str, Mapping[str, Any]]
                          ) -> tuple[tuple[TechniqueSpec, ...], dict[str, str]]:
    """Specs for the chosen techniques (id -> parameter values), checked; errors per technique id."""
    specs: list[TechniqueSpec] = []
    errors: dict[str, str] = {}
    for technique_id, params in choices.items():
        try:
            technique = get_technique(technique_id)
            _refuse_server_paths(technique, params)
            specs.append(TechniqueSpec(technique_id, technique.resolve(params)))
        except QuantLabError as exc:
            errors[technique_id] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return tuple(dict.fromkeys(specs)), errors


@dataclass(frozen=True)
class SweepEstimate:
    """How long the chosen variants took before, from the store's measured rows."""

    seconds: float                 # conversion + latency timing of the variants timed before
    timed: int                     # chosen techniques with earlier measured rows
    untimed: tuple[str, ...]       # chosen techniques never measured in this store
    whole_seconds: float | None = None   # median time of earlier finished sweeps that measured, from
                                         # their start (after preparing) to their end
    whole_variants: float | None = None  # ... and their median number of variants
    whole_count: int = 0

    def text(self) -> str:
        whole = ""
        if self.whole_count:
            whole = (f" Earlier sweeps here took a median of {self.whole_seconds:.0f} s from their first "
                     f"variant to their last, for {self.whole_variants:.0f} variant(s) ({self.whole_count} "
                     f"sweep(s)); preparing a model not prepared before comes on top.")
        if not self.timed:
            return ("No earlier rows of these techniques to estimate the time from: the first sweep of "
                    "them sets it." + whole)
        words = f"about {self.seconds:.0f} s of conversion and latency timing" if self.seconds >= 1 else \
            "under a second of conversion and latency timing"
        text = f"Estimated from this store's earlier rows: {words} for {self.timed} technique(s)"
        if self.untimed:
            text += f"; not timed before: {', '.join(self.untimed)}"
        return text + " (cached variants take no time; a new model trains or prepares first)." + whole


def estimate_sweep(store: Store, technique_ids: Sequence[str]) -> SweepEstimate:
    """The chosen techniques' median conversion time plus their latency timing (runs x mean), over
    the store's measured (not cached) rows of any model: an order of magnitude, said as one."""
    ids = list(dict.fromkeys(technique_ids))
    if not ids:
        return SweepEstimate(0.0, 0, ())
    frame = store.query(
        "SELECT technique, median(conversion_seconds) AS convert_s, "
        "median(latency_runs * latency_mean_ms) / 1000 AS timing_s FROM results "
        f"WHERE error IS NULL AND NOT cached AND technique IN ({', '.join('?' * len(ids))}) "
        "GROUP BY technique", ids)
    timed = {} if frame.empty else {
        row["technique"]: float(row["convert_s"] or 0) + float(row["timing_s"] or 0)
        for row in frame.to_dict("records")}
    whole = store.query(
        "SELECT median(epoch(s.finished_at) - epoch(s.started_at)) AS seconds, median(r.n) AS variants, "
        "count(*) AS sweeps FROM sweeps s JOIN (SELECT sweep_id, count(*) AS n FROM results "
        "GROUP BY sweep_id HAVING bool_or(NOT cached)) r USING (sweep_id) "
        "WHERE s.status = 'done' AND s.finished_at IS NOT NULL")
    found = {} if whole.empty else whole.iloc[0].to_dict()
    count = int(found.get("sweeps") or 0)
    return SweepEstimate(sum(timed.values()), len(timed), tuple(t for t in ids if t not in timed),
                         _number(found.get("seconds")) if count else None,
                         _number(found.get("variants")) if count else None, count)


def make_sweep_spec(model: str, dataset: str, techniques: Sequence[TechniqueSpec], *,
                    epochs: int = TrainSettings.epochs, num_threads: int = 1,
                    min_runs: int = MeasureSettings.min_runs,
                    min_seconds: float = MeasureSettings.min_seconds,
                    label_output: str | None = None) -> SweepSpec:
    return SweepSpec(model=model, dataset=dataset, techniques=tuple(techniques),
                     train=TrainSettings(epochs=int(epochs)),
                     measure=MeasureSettings(num_threads=int(num_threads), min_runs=int(min_runs),
                                             min_seconds=float(min_seconds)),
                     label_output=label_output or None)


def model_output_names(model_path: str | None) -> list[str]:
    """The output names of an uploaded Keras model, read from its config (empty when unknown)."""
    from .applicability import describe_model_file

    if not model_path:
        return []
    return list(describe_model_file(model_path).get("output_names") or [])


def model_kind_of(model: str) -> str:
    """keras or tflite, from the name (a Keras 3 file becomes a SavedModel only once prepared)."""
    return "tflite" if str(model).lower().endswith(".tflite") else "keras"


def is_keras3_file(model_path: str | None) -> bool:
    """Whether an uploaded .keras file was written by Keras 3 (read from its config, nothing loaded)."""
    from .applicability import describe_model_file

    return bool(model_path) and describe_model_file(model_path).get("keras_major") == 3


def keras3_note() -> str:
    """What a Keras 3 upload can do (see quantlab.keras3_rebuild)."""
    return ("A Keras 3 .keras file is checked, then rebuilt in tf_keras (its outputs must match): "
            "every technique runs on it, and its baseline runs in Keras 3 itself. A layer with no "
            "tf_keras equivalent is named, and the model then gets post-training techniques only.")


# --- uploads --------------------------------------------------------------------------------------


def safe_file_name(name: str, fallback: str = "upload") -> str:
    """A plain file name (no folders, no leading dots) that keeps the original suffix."""
    base = Path(str(name).replace("\\", "/")).name
    base = re.sub(r"[^A-Za-z0-9._+\- ]+", "_", base).strip(" .")
    return base[:120] or fallback


def save_upload(data: bytes, name: str, cache_dir: Path) -> Path:
    """Write uploaded bytes to cache/uploads/<content hash>/<name>, once; returns the path."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = Path(cache_dir) / "uploads" / digest / safe_file_name(name)
    if not path.exists() or path.stat().st_size != len(data):
        from .cache import write_atomically
        write_atomically(path, data)
    return path


def stored_name(kind: str, path: Path | str) -> str:
    """The name the store will record for an uploaded file: a model by its file name, a dataset by
    its stem (as runner.resolve_model and uploads.load_uploaded_dataset name them)."""
    return Path(path).stem if kind == "dataset" else Path(path).name


def _size_check(path: Path, max_mb: int, what: str) -> None:
    size = path.stat().st_size
    if size == 0:
        raise QuantLabError(f"{path.name} is empty; upload the file again")
    if size > max_mb * 1024 * 1024:
        raise QuantLabError(f"{path.name} is {size / 1024 / 1024:.1f} MB, over the {max_mb} MB limit "
                            f"for {what}; upload a smaller file")


def check_uploaded_model(path: Path, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB) -> None:
    """Cheap checks of an uploaded model (the full, safe load happens when the sweep prepares it)."""
    path = Path(path)
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise QuantLabError(f"{path.name} is not a model file QuantLab reads; upload "
                            f"{', '.join(MODEL_SUFFIXES)} (a SavedModel as a .zip of its folder)")
    _size_check(path, max_upload_mb, "models")
    head = path.read_bytes()[:8] if path.stat().st_size < 1 << 16 else path.open("rb").read(8)
    if path.suffix.lower() == ".tflite" and head[4:8] != b"TFL3":
        raise QuantLabError(f"{path.name} is not a TensorFlow Lite file (no 'TFL3' identifier); upload "
                            f"a file written by TFLiteConverter.convert()")
    if path.suffix.lower() in (".keras", ".zip") and not head.startswith(b"PK"):
        raise QuantLabError(f"{path.name} is not a zip archive, so it is not a {path.suffix} file; "
                            f"save the model again (model.save('model.keras')) and upload that")
    if path.suffix.lower() in (".h5", ".hdf5") and not head.startswith(b"\x89HDF"):
        raise QuantLabError(f"{path.name} is not an HDF5 file; save the model again with "
                            f"model.save('model.h5') and upload that")
    # the file's config, read without TensorFlow: a truncated file or a config QuantLab refuses is said
    # next to the uploader now, not after Run and the sweep's preparation
    from .safe_load import UploadLimits, inspect_h5_config, inspect_keras_archive

    if path.suffix.lower() in (".h5", ".hdf5"):
        inspect_h5_config(path)
    elif path.suffix.lower() == ".keras":
        inspect_keras_archive(path, UploadLimits(max_bytes=max_upload_mb * 1024 * 1024))


def check_uploaded_dataset(path: Path, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB) -> None:
    """Check an uploaded .npz dataset fully (arrays, shapes, labels) without running anything in it."""
    path = Path(path)
    if path.suffix.lower() not in DATASET_SUFFIXES:
        raise QuantLabError(f"{path.name} is not a .npz file; save the arrays with "
                            f"np.savez('data.npz', x_test=x, y_test=y) and upload that")
    _size_check(path, max_upload_mb, "datasets")
    from .safe_load import UploadLimits, load_npz_dataset

    load_npz_dataset(path, UploadLimits(max_bytes=max_upload_mb * 1024 * 1024))


def is_upload(path_or_name: str | None, cache_dir: Path) -> bool:
    if not path_or_name:
        return False
    try:
        return Path(path_or_name).resolve().is_relative_to((Path(cache_dir) / "uploads").resolve())
    except (OSError, ValueError):
        return False


def blame_upload(error: str | None, model_uploaded: bool, dataset_uploaded: bool) -> str | None:
    """Which upload a sweep's error is about: "model", "dataset" or None (not an upload's fault)."""
    if not error or not (model_uploaded or dataset_uploaded):
        return None
    if model_uploaded != dataset_uploaded:
        return "model" if model_uploaded else "dataset"
    text = error.lower()
    return "dataset" if ("dataset" in text or ".npz" in text or "x_test" in text or "label" in text) else "model"


# --- a sweep's rows as a table --------------------------------------------------------------------


def format_bytes(value: Any) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return ""
    value = float(value)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:,.1f} {unit}"
        value /= 1024
    return ""


def error_text(record: Mapping[str, Any]) -> str | None:
    """A row's error, or None: a row read from a results frame holds NaN, not None, for "no error"."""
    error = record.get("error")
    return error if isinstance(error, str) and error else None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def has_no_labels(row: Mapping[str, Any]) -> bool:
    """True for a row of a dataset without labels (analysis.quality_metric of the row is agreement)."""
    return quality_metric(row) == "agreement"


def number_text(row: Mapping[str, Any], key: str, digits: int, style: str = "f") -> str:
    """One figure of a row for a metric tile: `0.9512` (`digits` decimals, or significant digits with
    style "g": a p50 of 0.00767 ms), `n/a`, or NO_LABELS for the accuracy of a dataset without labels."""
    if key == "accuracy" and has_no_labels(row):
        return NO_LABELS
    value = _number(row.get(key))
    return "n/a" if value is None else f"{value:.{digits}{style}}"


def results_table(rows: Iterable[Mapping[str, Any]], details_link: str | None = None) -> Any:
    """Finished variants, one line each: what was measured, or that it came from the cache or failed.
    The accuracy of a dataset without labels reads NO_LABELS.

    The "row" column holds the row id, or `details_link` + the row id (a link to the details page).
    """
    import pandas as pd

    lines = []
    for row in rows:
        error = error_text(row)
        lines.append({
            "technique": row.get("technique"),
            "params": params_text(row.get("params")),
            "result": f"failed: {error}" if error else "cached" if row.get("cached") else "measured",
            "size": format_bytes(row.get("model_bytes")),
            "accuracy": NO_LABELS if has_no_labels(row) else _number(row.get("accuracy")),
            "agreement": _number(row.get("agreement")),
            "p50 latency (ms)": _number(row.get("latency_p50_ms")),
            "row": f"{details_link}{row.get('row_id')}" if details_link else row.get("row_id"),
        })
    return pd.DataFrame(lines, columns=["technique", "params", "result", "size", "accuracy", "agreement",
                                        "p50 latency (ms)", "row"])


# --- one stored row -------------------------------------------------------------------------------


def _as_dict(value: Any) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            decoded = json.loads(value or "{}")
            return decoded if isinstance(decoded, dict) else {}
        except ValueError:
            return {}
    return {}


def row_label(record: Mapping[str, Any]) -> str:
    """e.g. "int8-only · seed-cnn on digits-28 · acc 0.962 · 2026-01-02 10:11"."""
    parts = [str(record.get("technique"))]
    params = params_text(record.get("params"))
    if params:
        parts[0] += f" ({params})"
    parts.append(f"{record.get('model_name')} on {record.get('dataset_name')}")
    if error_text(record):
        parts.append("failed")
    elif _number(record.get("accuracy")) is not None:
        parts.append(f"acc {float(record['accuracy']):.3f}")
    elif has_no_labels(record) and _number(record.get("agreement")) is not None:
        parts.append(f"{NO_LABELS}, agreement {float(record['agreement']):.3f}")
    recorded = record.get("recorded_at")
    if recorded is not None and hasattr(recorded, "strftime"):
        try:
            parts.append(recorded.strftime("%Y-%m-%d %H:%M"))
        except ValueError:
            pass
    parts.append(str(record.get("row_id", ""))[:8])
    return " · ".join(parts)


def tensor_table(details: Mapping[str, Any]) -> Any:
    """The model's inputs and outputs: name, shape, dtype, scale and zero point (for quantized I/O),
    as measure.inspect_tflite recorded them."""
    import pandas as pd

    inspection = _as_dict(details.get("inspection"))
    lines = [{"role": role[:-1], "name": tensor["name"], "shape": str(list(tensor["shape"])),
              "dtype": tensor["dtype"], "scale": _number_text(tensor.get("scale")),
              "zero point": _number_text(tensor.get("zero_point"))}
             for role in ("inputs", "outputs") for tensor in inspection.get(role) or []]
    return pd.DataFrame(lines, columns=["role", "name", "shape", "dtype", "scale", "zero point"])


def _number_text(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def ops_table(details: Mapping[str, Any]) -> Any:
    """Every op with its input and output types, whether it computes in float, and its integer
    kernel's scale count, as measure.inspect_tflite recorded them (an op computes in float when an
    output is a float tensor and it is not a QUANTIZE/DEQUANTIZE conversion)."""
    import pandas as pd

    lines = []
    for op in _as_dict(details.get("inspection")).get("ops") or []:
        line = {"#": op["index"], "op": op["op_name"],
                "input types": ", ".join(dict.fromkeys(op.get("input_dtypes") or [])),
                "output types": ", ".join(dict.fromkeys(op.get("output_dtypes") or [])),
                "computes in float": bool(op["computes_in_float"])}
        if op.get("weight_scales"):
            line["weight scales"] = op["weight_scales"]
        if op.get("kernel_dtype"):
            line["kernel"] = f"{op['kernel_dtype']}, {op['kernel_values']:,} values"
        lines.append(line)
    return pd.DataFrame(lines)


WEIGHT_GRANULARITY_WORDS = {
    "per-channel": "Integer weights are quantized per channel (one scale per output channel).",
    "per-tensor": "Integer weights are quantized per tensor (one scale per kernel), as some older "
                  "DSP/NPU delegates require.",
    "mixed": "Some integer kernels have one scale per output channel, others one per tensor.",
}


def weight_granularity_summary(details: Mapping[str, Any]) -> str | None:
    """One sentence on how the .tflite's integer kernels are scaled, or None when none are integer."""
    return WEIGHT_GRANULARITY_WORDS.get(_as_dict(details.get("inspection")).get("weight_granularity"))


DYNAMIC_MIN_KERNEL_VALUES = 1024  # the converter's dynamic-range mode quantizes no smaller kernel
FLOAT_CONVERSIONS = frozenset({"float32", "float16"})   # the converter modes that keep float kernels
KEEPS_FLOAT_ON_PURPOSE = {"int8-selective": "int8-selective keeps its most sensitive layers float by design",
                          "lq-recipe": "the recipe decides which ops are quantized"}


def float_kernels_summary(row: Mapping[str, Any]) -> str | None:
    """What a quantizing conversion left in float32: e.g. "3 of 5 conv and dense kernels stayed
    float32 (...)", with the reason where it is known; None when every kernel is integer or the
    conversion keeps float (baseline, float32, float16, a prune or cluster variant converted so)."""
    details = _as_dict(row.get("details"))
    technique = row.get("technique")
    conversion = details.get("conversion") or technique
    if technique in ("baseline", "as-uploaded") or conversion in FLOAT_CONVERSIONS:
        return None
    kernels = [op for op in _as_dict(details.get("inspection")).get("ops") or [] if op.get("kernel_dtype")]
    floats = [op for op in kernels if op["kernel_dtype"] == "float32"]
    if not floats:
        return None
    values = sum(op["kernel_values"] for op in floats)
    share = values / max(1, sum(op["kernel_values"] for op in kernels))
    text = (f"{len(floats)} of {len(kernels)} conv and dense kernels stayed float32 ({values:,} weight "
            f"values, {share:.0%} of those kernels' values)")
    if technique in KEEPS_FLOAT_ON_PURPOSE:
        return f"{text}: {KEEPS_FLOAT_ON_PURPOSE[technique]}."
    if conversion == "dynamic" and max(op["kernel_values"] for op in floats) < DYNAMIC_MIN_KERNEL_VALUES:
        text += (f": the converter's dynamic-range mode quantizes only kernels of at least "
                 f"{DYNAMIC_MIN_KERNEL_VALUES:,} values, and "
                 + ("these are smaller" if len(floats) > 1 else "this one is smaller"))
    return text + "."


def float_ops_summary(row: Mapping[str, Any], ops: Any) -> str:
    """e.g. "2 of 7 ops compute in float: FULLY_CONNECTED, SOFTMAX"."""
    total, float_ops = _number(row.get("total_ops")), _number(row.get("float_ops"))
    names: list[str] = []
    if ops is not None and len(ops) and "computes in float" in ops:
        names = list(dict.fromkeys(ops.loc[ops["computes in float"], "op"]))
        if total is None:
            total, float_ops = float(len(ops)), float(int(ops["computes in float"].sum()))
    if total is None:
        return "No op list was recorded for this variant."
    text = f"{int(float_ops or 0)} of {int(total)} ops compute in float"
    return text + (f": {', '.join(names)}" if names and float_ops else "") + "."


def latency_summary(row: Mapping[str, Any]) -> str:
    values = [(name, _number(row.get(key))) for name, key in
              (("p50", "latency_p50_ms"), ("p90", "latency_p90_ms"), ("mean", "latency_mean_ms"),
               ("std", "latency_std_ms"))]
    parts = [f"{name} {value:.3f} ms" for name, value in values if value is not None]
    runs, threads = _number(row.get("latency_runs")), _number(row.get("num_threads"))
    if runs:
        parts.append(f"{int(runs)} runs")
    if threads:
        parts.append(f"{int(threads)} thread{'s' if threads != 1 else ''}")
    return ", ".join(parts) if parts else "No latency was measured."


def latency_sample_note(samples: Sequence[float], row: Mapping[str, Any] | None = None) -> str:
    """How the drawn runs relate to the timed ones: every run, or an evenly spaced sample of them."""
    kept, timed = len(samples), _number((row or {}).get("latency_runs"))
    if timed is None or int(timed) <= kept:
        return f"All {kept} timed runs are drawn."
    return (f"{kept:,} of the {int(timed):,} timed runs are drawn, evenly spaced in time order (the "
            f"p50 and p90 are of every run).")


def latency_histogram(samples: Sequence[float], row: Mapping[str, Any] | None = None) -> Any:
    """A Plotly histogram of per-run latencies, with the p50 and p90 marked (their labels left and
    right of their lines, so they never overlap).

    The axis spans the runs up to the 99th percentile so that a rare slow run does not squeeze the
    rest into one bar; how many drawn runs lie beyond is said in the title.
    """
    import numpy as np
    import plotly.graph_objects as go

    values = np.asarray(list(samples), dtype=float)
    shown = values
    title = None
    if len(values) >= 20:
        cut = float(np.percentile(values, 99))
        shown = values[values <= cut]
        beyond = len(values) - len(shown)
        if beyond:
            title = (f"{beyond} of the {len(values)} drawn runs above {cut:.3g} ms (max "
                     f"{values.max():.3g} ms) are off the axis")
    figure = go.Figure(go.Histogram(x=shown.tolist(), nbinsx=min(60, max(10, len(shown) // 5)),
                                    name="runs", marker_color="#4C78A8"))
    if title:
        figure.update_layout(title=dict(text=title, font=dict(size=12)))
    for name, key, dash, side in (("p50", "latency_p50_ms", "solid", "top left"),
                                  ("p90", "latency_p90_ms", "dash", "top right")):
        value = _number((row or {}).get(key))
        if value is not None:
            figure.add_vline(x=value, line_dash=dash, line_color="#E45756",
                             annotation_text=f"{name} {value:.3g} ms", annotation_position=side)
    figure.update_layout(xaxis_title="latency per inference (ms)", yaxis_title="runs", bargap=0.05,
                         margin=dict(l=10, r=10, t=50 if title else 30, b=10), height=320,
                         showlegend=False)
    return figure


def preparation_notes(row: Mapping[str, Any]) -> list[str]:
    """What QuantLab did to the model on the way to this row, each line naming its step: preparing
    it (a Keras 3 rebuild, a float32 copy of a mixed-precision model), fine-tuning it (a backbone
    inlined) and converting it (batch fixed at 1, recurrent layers unrolled)."""
    details = _as_dict(row.get("details"))
    fine_tune = _as_dict(details.get("fine_tune"))
    return ([f"Model: {note}" for note in _as_dict(row.get("provenance")).get("model_notes") or []]
            + [f"Fine-tuning: {note}" for note in fine_tune.get("inlined") or []]
            + [f"Conversion: {note}" for note in details.get("conversion_notes") or []])


def failure_text(row: Mapping[str, Any]) -> str:
    """"<technique> failed: <error>", without naming the technique twice (most errors start with it)."""
    technique = str(row.get("technique"))
    return f"{technique} failed: {without_technique(technique, str(row.get('error')))}"


def provenance_table(row: Mapping[str, Any]) -> Any:
    """Where the numbers come from: versions, hashes, CPU, threads and times, as field/value lines."""
    import pandas as pd

    provenance = _as_dict(row.get("provenance"))
    lines: list[tuple[str, str]] = []

    def add(name: str, value: Any) -> None:
        if value is not None and value != "" and value != {}:
            lines.append((name, value if isinstance(value, str) else json.dumps(value, default=str)))

    add("recorded at", str(row.get("recorded_at") or ""))
    add("measured at", str(row.get("measured_at") or ""))
    add("row id", row.get("row_id"))
    add("sweep id", row.get("sweep_id"))
    add("result key", row.get("result_key") or provenance.get("result_key"))
    add("model hash", row.get("model_hash") or provenance.get("model_hash"))
    add("dataset hash", row.get("dataset_hash") or provenance.get("dataset_hash"))
    add("engine version", provenance.get("engine_version"))
    add("technique", provenance.get("technique"))
    add("CPU", provenance.get("cpu_model"))
    add("CPU count", provenance.get("cpu_count"))
    threads = provenance.get("num_threads", row.get("num_threads"))
    add("interpreter threads", None if threads is None else str(threads))
    add("python", provenance.get("python"))
    add("platform", provenance.get("platform"))
    for library, version in sorted(_as_dict(provenance.get("versions")).items()):
        add(f"version: {library}", str(version))
    shown = {"result_key", "model_hash", "dataset_hash", "engine_version", "technique", "cpu_model",
             "cpu_count", "num_threads", "python", "platform", "versions", "model_notes"}
    for key, value in sorted(provenance.items()):
        if key not in shown:
            add(key.replace("_", " "), value)
    return pd.DataFrame(lines, columns=["field", "value"])


STANDARD_DETAIL_KEYS = ("inspection", "latency_samples_ms", "split_sizes", "conversion", "keras_layers",
                        "labels", "label_note", "predictions", "latency_others_cpu_share",
                        "error_kind", "before_work")  # the last two: how a failed row failed
QUANTIZER_DETAIL_KEYS = ("recipe", "recipe_notes", "quantizer_version", "op_coverage", "tensor_types",
                         "validation", "calibrated", "ranges", "float32_bytes", "warning")


@dataclass(frozen=True)
class QuantizerReport:
    """What the LiteRT Quantizer recorded for one row, ready for the Details page."""

    version: str
    summary: str
    coverage: Any                  # frame: op type, quantized, total
    tensor_types: str
    recipe_json: str
    validation: list[dict]
    notes: tuple[str, ...]
    warning: str | None


def quantizer_report(row: Mapping[str, Any]) -> QuantizerReport | None:
    """The quantizer's part of a row (recipe, op coverage, validation), or None for other rows."""
    import pandas as pd

    details = _as_dict(row.get("details"))
    if "recipe" not in details:
        return None
    coverage = details.get("op_coverage") or {}
    table = pd.DataFrame([{"op": op, "quantized": e.get("quantized", 0), "total": e.get("total", 0)}
                          for op, e in (coverage.get("by_type") or {}).items()],
                         columns=["op", "quantized", "total"])
    types = ", ".join(f"{name} {count}" for name, count in sorted((details.get("tensor_types") or {}).items()))
    validation = [r for r in details.get("validation") or [] if isinstance(r, dict)]
    notes = [r["error"] for r in validation if "error" in r] + list(details.get("recipe_notes") or [])
    if details.get("ranges") == "moving-average":
        notes.append("Activation ranges are the quantizer's default: a moving average (smoothing 0.95) of "
                     "each calibration sample's min/max, so values beyond it are clipped; "
                     "`ranges=min-max` keeps the extremes, as the converter does.")
    elif details.get("ranges") == "min-max":
        notes.append("Activation ranges are the extremes over the calibration split (ranges=min-max).")
    return QuantizerReport(version=str(details.get("quantizer_version") or "?"),
                           summary=str(coverage.get("summary") or ""), coverage=table, tensor_types=types,
                           recipe_json=json.dumps(details["recipe"], indent=2),
                           validation=[r for r in validation if "tensor" in r], notes=tuple(notes),
                           warning=details.get("warning"))


def extra_details(row: Mapping[str, Any]) -> dict[str, Any]:
    """Details beyond the standard ones: what a technique recorded about itself (e.g. fine-tuning).
    A parameter its technique does not declare is left out (rows stored before float16 stopped
    recording `weights` carry a "per-channel" that float16 does not have)."""
    details = _as_dict(row.get("details"))
    extra = {k: v for k, v in details.items() if k not in STANDARD_DETAIL_KEYS + QUANTIZER_DETAIL_KEYS}
    try:
        declared = {p.name for p in get_technique(str(row.get("technique"))).params}
    except QuantLabError:
        return extra
    return {k: v for k, v in extra.items() if not (k == "weights" and k not in declared)}


def row_frame(store: Store, row_id: str) -> Any:
    """One stored row as a one-line frame, JSON columns as stored text (what the exports expect)."""
    return store.query("SELECT * FROM results WHERE row_id = ?", [row_id])


def declared_params(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's parameters that its technique declares (a stray `weights` on a float16 row is not)."""
    params = _as_dict(row.get("params"))
    try:
        names = {p.name for p in get_technique(str(row.get("technique"))).params}
    except QuantLabError:
        return params
    return {k: v for k, v in params.items() if k in names}


def is_fine_tuned(row: Mapping[str, Any]) -> bool:
    try:
        return get_technique(str(row.get("technique"))).fine_tunes
    except QuantLabError:
        return False


def downloadable_artifact(row: Mapping[str, Any], cache_dir: Path) -> Path | None:
    """The row's artifact if it is an existing file inside the cache folder, else None."""
    text = row.get("artifact_path")
    if not text or not isinstance(text, str):
        return None
    try:
        path = Path(text).resolve(strict=True)
        root = Path(cache_dir).resolve()
    except (OSError, RuntimeError):
        return None
    if not path.is_file() or not path.is_relative_to(root):
        return None
    return path



# --- how uncertain one row's numbers are (Details) ------------------------------------------------


def interval_text(row: Mapping[str, Any], low_key: str, high_key: str, digits: int = 4,
                  unit: str = "") -> str | None:
    """`95% CI 0.9324–0.9710` from a row's interval columns, None when they are not recorded."""
    low, high = _number(row.get(low_key)), _number(row.get(high_key))
    if low is None or high is None:
        return None
    return f"95% CI {low:.{digits}f}–{high:.{digits}f}{unit}"


def uncertainty_lines(row: Mapping[str, Any]) -> list[str]:
    """The row's own intervals in words, for the key numbers of Details."""
    samples = _number(row.get("test_samples"))
    lines = []
    for name, key in (("Accuracy", "accuracy"), ("Agreement", "agreement")):
        text = interval_text(row, f"{key}_ci_low", f"{key}_ci_high")
        if text and not (key == "accuracy" and has_no_labels(row)):
            lines.append(f"{name} {float(row[key]):.4f}, {text} (Wilson"
                         + (f", {int(samples)} test samples: one sample is {100 / samples:.2g} points"
                            if samples else "") + ").")
    latency = interval_text(row, "latency_p50_ci_low_ms", "latency_p50_ci_high_ms", 4, " ms")
    if latency:
        lines.append(f"p50 latency {float(row['latency_p50_ms']):.4f} ms, {latency} "
                     f"(bootstrap of the timed runs).")
    if not lines and not error_text(row):  # a failed variant has no numbers to bound
        lines.append("No intervals recorded for this row (it was stored before QuantLab kept them; "
                     "run the sweep again to measure it with intervals).")
    return lines


def busy_cpu_warning(row: Mapping[str, Any]) -> str | None:
    """A warning when other processes used more than 30% of the CPU while this row was timed."""
    from .uncertainty import BUSY_CPU_SHARE

    share = _number(_as_dict(row.get("details")).get("latency_others_cpu_share"))
    if share is None or share <= BUSY_CPU_SHARE:
        return None
    return (f"Other processes used {share:.0%} of the CPU while this variant was timed (more than "
            f"{BUSY_CPU_SHARE:.0%}): its latency is not comparable with rows timed on a quiet "
            f"machine. Measure it again when the machine is idle: tick \"Measure again\" on the Run "
            f"page, or pass --remeasure to the command line (with --workers 1, so that no other "
            f"variant of the sweep is converted beside the timing).")


def latency_shape(row: Mapping[str, Any]) -> str | None:
    """`bimodal: 60% of runs near ...` when the kept timings have two modes, else None."""
    from .stats import latency_modes

    samples = _as_dict(row.get("details")).get("latency_samples_ms") or []
    modes = latency_modes(samples)
    return f"The latency distribution is {modes.describe()}." if modes.bimodal else None


def reference_lines(store: Store, row: Mapping[str, Any]) -> list[str]:
    """"Differs from the baseline?" (and from TFLite float32) with the exact McNemar test on the
    same samples, in the quality the workload is judged by."""
    from .uncertainty import change_test, stored_references

    if error_text(row):
        return []
    metric = quality_metric(row)
    against, noun = ("labels", "accuracy") if metric == "accuracy" else ("float", "agreement")
    references = stored_references(store, row.get("model_hash"), row.get("dataset_hash"))
    lines: list[str] = []
    seen = {row.get("row_id")}
    for reference in (references["reference"], references["float32"]):
        if reference is None or reference["row_id"] in seen:
            continue
        seen.add(reference["row_id"])
        name = "the Keras baseline" if reference["technique"] == "baseline" else "TFLite float32"
        test = change_test(row, reference, against)
        if test is None:
            lines.append(f"Differs from {name}? Unknown: the per-sample predictions of one of the two "
                         f"rows were not kept (stored before QuantLab kept them; run the sweep again).")
            continue
        interval = test.change_ci_points
        lines.append(f"Differs from {name} in {noun}? {'Yes' if test.differs else 'No'}: "
                     f"{(test.gained - test.lost) * 100 / test.samples:+.2f} points (95% CI {interval.low:+.2f} "
                     f"to {interval.high:+.2f}); {test.describe()}.")
    return lines


# --- stored sweeps --------------------------------------------------------------------------------

RECENT_SWEEPS = 10
SWEEP_STATUS_WORDS = {"running": "running", "done": "done", "cancelled": "cancelled",
                      "interrupted": "interrupted (its process stopped)"}


def sweep_statuses(store: Store) -> dict[str, str]:
    """sweep_id -> status of every stored sweep (`interrupted` when its process is gone)."""
    frame = store.sweeps()
    return {} if frame.empty else dict(zip(frame["sweep_id"], frame["status"]))


def stored_sweeps_table(frame: Any) -> Any:
    """Store.sweeps() rows as the Run page lists them: when, what, how it ended, how many rows."""
    import pandas as pd

    if frame is None or frame.empty:
        return pd.DataFrame(columns=["started", "model", "dataset", "status", "rows", "source", "sweep"])
    return pd.DataFrame({
        "started": [f"{pd.Timestamp(t):%Y-%m-%d %H:%M}" for t in frame["started_at"]],
        "model": frame["model_name"], "dataset": frame["dataset_name"],
        "status": [SWEEP_STATUS_WORDS.get(s, s) for s in frame["status"]],
        "rows": frame["rows"].astype(int), "source": frame["source"],
        "sweep": [str(s)[:8] for s in frame["sweep_id"]],
    })


def interrupted_note(sweep: Mapping[str, Any]) -> str:
    """One line about a sweep whose process stopped before it finished."""
    import pandas as pd

    where = f" (pid {int(sweep['pid'])} on {sweep['hostname']})" if not pd.isna(sweep.get("pid")) else ""
    rows = int(sweep.get("rows") or 0)
    return (f"The sweep of **{sweep['model_name']}** on **{sweep['dataset_name']}** started "
            f"{pd.Timestamp(sweep['started_at']):%Y-%m-%d %H:%M} was interrupted: its process{where} "
            f"stopped before it finished. The {rows} variant{'s' if rows != 1 else ''} it measured "
            f"{'are' if rows != 1 else 'is'} kept; run the sweep again to measure the rest.")


def interrupted_notes(frame: Any) -> list[str]:
    """interrupted_note for each workload whose newest stored sweep (in `frame`) was interrupted."""
    if frame is None or frame.empty:
        return []
    newest = frame.sort_values("started_at", ascending=False).drop_duplicates(["model_name", "dataset_name"])
    return [interrupted_note(row) for row in newest.to_dict(orient="records") if row["status"] == "interrupted"]
