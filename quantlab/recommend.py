"""Which technique to try first: an interactive post-training quantization decision tree.

After the decision tree on TensorFlow Lite's "Post-training quantization" page
(https://www.tensorflow.org/lite/performance/post_training_quantization) and its summary table:
dynamic range needs no data and suits CPUs; full integer needs representative data and is what
integer-only hardware (Edge TPU, microcontrollers) requires; float16 suits GPUs; quantization-aware
training recovers accuracy that post-training int8 loses; 16x8 keeps activations in int16 when they
are sensitive to quantization. The docs draw the tree as an image; the questions below restate it
with the inputs a deployment actually has, and every leaf carries a fallback chain that
`back_with_measurements` walks with this model's measured rows.

Pure: no Streamlit, no store access; the page passes a compare frame in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

import pandas as pd

DOCS_URL = "https://www.tensorflow.org/lite/performance/post_training_quantization"

HARDWARE = {"cpu": "CPU (phone, desktop)", "gpu": "GPU (mobile GPU delegate)",
            "edgetpu": "Edge TPU", "mcu": "Microcontroller"}
INTEGER_HARDWARE = ("edgetpu", "mcu")

# Labels for techniques this install may not register yet (the registry wins when it has them).
KNOWN_LABELS = {"qat-int8": "Quantization-aware training (int8)", "cluster": "Weight clustering",
                "prune": "Pruning", "cqat": "Cluster-preserving QAT", "pqat": "Pruning-preserving QAT"}


def technique_label(technique_id: str | None) -> str:
    if technique_id is None:
        return "no technique yet"
    try:
        from .techniques import get_technique

        return get_technique(technique_id).label
    except Exception:  # TechniqueError: not registered in this install
        return KNOWN_LABELS.get(technique_id, technique_id)


@dataclass(frozen=True)
class Answers:
    """The questions of the tree; `max_drop_points` only counts when a drop is acceptable."""

    hardware: str = "cpu"
    accuracy_drop_ok: bool = True
    max_drop_points: float = 1.0
    representative_data: bool = True
    can_retrain: bool = False
    integer_io: bool = False
    uint8_io: bool = False

    def __post_init__(self) -> None:
        if self.hardware not in HARDWARE:
            raise ValueError(f"hardware must be one of {', '.join(HARDWARE)}, not {self.hardware!r}")
        if self.max_drop_points < 0:
            raise ValueError(f"max_drop_points must be 0 or more, not {self.max_drop_points}")

    @property
    def tolerance_points(self) -> float:
        """The accuracy drop (points) a measured variant may show and still fit."""
        return float(self.max_drop_points) if self.accuracy_drop_ok else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Answers":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


# --- the tree ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    id: str
    text: str
    field: str | None = None          # the Answers field a question reads; None for a leaf
    technique: str | None = None      # a leaf's recommendation (None: nothing can be run yet)
    reason: str = ""
    claim: str = ""                   # the docs' generic figures: shown only until this model is measured


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    label: str
    values: tuple[Any, ...]           # the answers that take this edge


NODES: tuple[Node, ...] = (
    Node("hardware", "Which hardware runs the model?", field="hardware"),
    Node("gpu_drop", "Any accuracy drop acceptable?", field="accuracy_drop_ok"),
    Node("gpu_float16", "Float16", technique="float16",
         reason="GPU delegates run float16 natively, the docs' choice for GPUs",
         claim="the docs expect about 2x smaller with a negligible accuracy loss"),
    Node("gpu_float32", "Float32 (no quantization)", technique="float32",
         reason="you accept no accuracy loss and GPUs run float models well: keep float32; "
                "check the measured float16 row, which is often lossless too"),
    Node("cpu_io", "Integer-only input/output required?", field="integer_io"),
    Node("cpu_drop", "Any accuracy drop acceptable?", field="accuracy_drop_ok"),
    Node("cpu_float16", "Float16", technique="float16",
         reason="you accept no accuracy loss: float16 weights are usually lossless (a CPU computes "
                "them in float32, so no speedup)",
         claim="the docs expect half the size"),
    Node("cpu_data", "Representative data (~100-500 samples)?", field="representative_data"),
    Node("cpu_dynamic", "Dynamic range", technique="dynamic",
         reason="without representative data, dynamic range quantization is the docs' starting "
                "point: int8 weights, no calibration",
         claim="the docs expect about 4x smaller and 2-3x faster on CPU"),
    Node("cpu_int8", "Full integer, float fallback", technique="int8-fallback",
         reason="with representative data, full integer quantization runs integer kernels while "
                "keeping float input/output",
         claim="the docs expect about 4x smaller and 3x+ faster on CPU"),
    Node("int_data", "Representative data (~100-500 samples)?", field="representative_data"),
    Node("int_uint8", "Toolchain expects uint8 I/O (older accelerators)?", field="uint8_io"),
    Node("int_int8", "Integer only (int8 I/O)", technique="int8-only",
         reason="integer-only hardware (Edge TPU, microcontrollers) needs every op and the "
                "input/output in int8: full integer quantization calibrated on your data"),
    Node("int_uint8_only", "Integer only (uint8 I/O)", technique="uint8-only",
         reason="integer-only hardware whose toolchain expects uint8 input/output (older "
                "accelerators): full integer quantization with uint8 I/O"),
    Node("int_retrain", "Can you retrain (fine-tune) the model?", field="can_retrain"),
    Node("int_qat", "Quantization-aware training", technique="qat-int8",
         reason="no calibration data, but you can retrain: quantization-aware training learns "
                "the int8 ranges while fine-tuning, and usually loses less accuracy than "
                "post-training int8"),
    Node("int_blocked", "Collect data or retrain first", technique=None,
         reason="integer-only targets need calibration data or retraining: collect about "
                "100-500 representative samples (then int8-only), or make fine-tuning possible "
                "(then qat-int8)"),
)
NODE_BY_ID = {node.id: node for node in NODES}

EDGES: tuple[Edge, ...] = (
    Edge("hardware", "gpu_drop", "GPU", ("gpu",)),
    Edge("hardware", "cpu_io", "CPU", ("cpu",)),
    Edge("hardware", "int_data", "Edge TPU / MCU", INTEGER_HARDWARE),
    Edge("gpu_drop", "gpu_float16", "yes", (True,)),
    Edge("gpu_drop", "gpu_float32", "no", (False,)),
    Edge("cpu_io", "int_data", "yes", (True,)),
    Edge("cpu_io", "cpu_drop", "no", (False,)),
    Edge("cpu_drop", "cpu_data", "yes", (True,)),
    Edge("cpu_drop", "cpu_float16", "no", (False,)),
    Edge("cpu_data", "cpu_int8", "yes", (True,)),
    Edge("cpu_data", "cpu_dynamic", "no", (False,)),
    Edge("int_data", "int_uint8", "yes", (True,)),
    Edge("int_data", "int_retrain", "no", (False,)),
    Edge("int_uint8", "int_uint8_only", "yes", (True,)),
    Edge("int_uint8", "int_int8", "no", (False,)),
    Edge("int_retrain", "int_qat", "yes", (True,)),
    Edge("int_retrain", "int_blocked", "no", (False,)),
)
ROOT = "hardware"


# --- walking it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One answered question on the path: the node, its question and the answer given."""

    node_id: str
    question: str
    answer: str


@dataclass(frozen=True)
class Fallback:
    technique: str
    why: str


@dataclass(frozen=True)
class Recommendation:
    answers: Answers
    path: tuple[Step, ...]
    leaf: str
    technique: str | None
    reason: str
    fallbacks: tuple[Fallback, ...] = ()
    claim: str = ""

    @property
    def label(self) -> str:
        return technique_label(self.technique)

    @property
    def chain(self) -> tuple[str, ...]:
        """The recommended technique, then its fallbacks in order."""
        head = (self.technique,) if self.technique else ()
        return head + tuple(f.technique for f in self.fallbacks)

    @property
    def path_node_ids(self) -> tuple[str, ...]:
        return tuple(step.node_id for step in self.path) + (self.leaf,)

    @property
    def tolerance_points(self) -> float:
        return self.answers.tolerance_points

    def to_dict(self) -> dict[str, Any]:
        return {"answers": self.answers.to_dict(), "path": [asdict(s) for s in self.path],
                "leaf": self.leaf, "technique": self.technique, "reason": self.reason,
                "claim": self.claim, "fallbacks": [asdict(f) for f in self.fallbacks]}


def _answer_text(node: Node, value: Any) -> str:
    if node.field == "hardware":
        return HARDWARE[value]
    return "yes" if value else "no"


def recommend(answers: Answers) -> Recommendation:
    """Walk the tree with `answers`: the answered path, the technique, why, and what to try next."""
    path: list[Step] = []
    node = NODE_BY_ID[ROOT]
    while node.field is not None:
        value = getattr(answers, node.field)
        edge = next(e for e in EDGES if e.source == node.id and value in e.values)
        path.append(Step(node.id, node.text, _answer_text(node, value)))
        node = NODE_BY_ID[edge.target]
    return Recommendation(answers, tuple(path), node.id, node.technique, node.reason,
                          fallback_chain(node.technique, answers), node.claim)


def fallback_chain(technique: str | None, answers: Answers) -> tuple[Fallback, ...]:
    """What to try when `technique` loses more accuracy than the tolerance, best first."""
    chain: list[Fallback] = []
    retrain = answers.can_retrain
    integer_target = answers.hardware in INTEGER_HARDWARE or answers.integer_io
    if technique in ("int8-only", "uint8-only"):
        if retrain:
            chain.append(Fallback("qat-int8", "quantization-aware training recovers most of the "
                                              "accuracy full-integer PTQ loses"))
        if answers.hardware != "edgetpu":
            chain.append(Fallback("int16x8", "16-bit activations keep integer-only execution with "
                                             "better accuracy (reference kernels: slower; the Edge "
                                             "TPU cannot run it)"))
    elif technique == "int8-fallback":
        if retrain:
            chain.append(Fallback("qat-int8", "quantization-aware training recovers accuracy "
                                              "while keeping int8 speed"))
        chain.append(Fallback("dynamic", "dynamic range keeps activations in float: usually "
                                         "closer to the float model, a little slower"))
        chain.append(Fallback("float16", "float16 weights: usually lossless"))
    elif technique == "dynamic":
        if retrain:
            chain.append(Fallback("qat-int8", "quantization-aware training: int8 with accuracy "
                                              "recovered by fine-tuning"))
        chain.append(Fallback("float16", "float16 weights: usually lossless"))
        chain.append(Fallback("float32", "no quantization"))
    elif technique == "float16":
        chain.append(Fallback("float32", "no quantization"))
    elif technique == "qat-int8":
        if integer_target and answers.hardware != "edgetpu" and answers.representative_data:
            chain.append(Fallback("int16x8", "16-bit activations: integer-only with better "
                                             "accuracy (slower kernels)"))
    return tuple(chain)


# --- the tree as data for drawing ------------------------------------------------------------------


def _layout() -> dict[str, tuple[float, float]]:
    """x, y per node: y = -(longest path from the root); leaves spread in depth-first order, a
    question centred over the children it is the deepest parent of."""
    children: dict[str, list[str]] = {}
    for edge in EDGES:
        children.setdefault(edge.source, []).append(edge.target)
    depth = {ROOT: 0}
    changed = True
    while changed:  # longest-path depth; the tree is a small DAG
        changed = False
        for edge in EDGES:
            if edge.source in depth and depth.get(edge.target, -1) < depth[edge.source] + 1:
                depth[edge.target] = depth[edge.source] + 1
                changed = True
    primary = {}
    for edge in EDGES:
        if depth[edge.source] == depth[edge.target] - 1:
            primary.setdefault(edge.target, edge.source)
    x: dict[str, float] = {}
    next_leaf = [0.0]

    def place(node_id: str) -> float:
        own = [c for c in children.get(node_id, []) if primary.get(c) == node_id]
        if not own:
            x[node_id] = next_leaf[0]
            next_leaf[0] += 1.0
        else:
            x[node_id] = sum(place(c) for c in own) / len(own)
        return x[node_id]

    place(ROOT)
    return {node_id: (x[node_id], -float(depth[node_id])) for node_id in NODE_BY_ID}


_POSITIONS = _layout()


def tree_frames(recommendation: Recommendation | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(nodes, edges) frames for charts.decision_tree_figure, the answered path flagged.

    nodes: id, text, kind (question|leaf), technique, label, x, y, on_path, chosen.
    edges: source, target, label, x0, y0, x1, y1, on_path.
    """
    on_path = set(recommendation.path_node_ids) if recommendation else set()
    taken = set()
    if recommendation:
        ids = recommendation.path_node_ids
        taken = set(zip(ids, ids[1:]))
    nodes = pd.DataFrame([{
        "id": n.id, "text": n.text, "kind": "question" if n.field else "leaf",
        "technique": n.technique, "label": technique_label(n.technique) if n.technique else n.text,
        "x": _POSITIONS[n.id][0], "y": _POSITIONS[n.id][1], "on_path": n.id in on_path,
        "chosen": bool(recommendation) and n.id == recommendation.leaf} for n in NODES])
    edges = pd.DataFrame([{
        "source": e.source, "target": e.target, "label": e.label,
        "x0": _POSITIONS[e.source][0], "y0": _POSITIONS[e.source][1],
        "x1": _POSITIONS[e.target][0], "y1": _POSITIONS[e.target][1],
        "on_path": (e.source, e.target) in taken} for e in EDGES])
    return nodes, edges


# --- backing the recommendation with this model's measurements ------------------------------------


@dataclass(frozen=True)
class Backing:
    """What this model's measured rows say about a recommendation.

    status: fits (a technique of the chain is measured within tolerance), exceeds (every measured
    option loses too much; `to_run` may name the next unmeasured one), not-measured, no-reference
    (no baseline to compare accuracy with), blocked (the tree recommends nothing runnable).
    """

    status: str
    text: str
    technique: str | None = None       # the technique that fits
    row_id: str | None = None          # its measured row
    to_run: tuple[str, ...] = ()       # technique ids to run next
    checked: tuple[tuple[str, float | None], ...] = field(default_factory=tuple)
    metric: str = "accuracy"           # the quality the drops are in (agreement without labels)


def _has_reference(frame: pd.DataFrame | None) -> bool:
    return frame is not None and not frame.empty and frame["reference_technique"].notna().any()


def _best_row(frame: pd.DataFrame, technique: str, change: str = "accuracy_change_points"
              ) -> dict[str, Any] | None:
    """The successful row of `technique` with the smallest loss in the `change` column."""
    if frame is None or frame.empty:
        return None
    rows = frame[(frame["technique"] == technique) & frame["error"].isna()]
    if rows.empty:
        return None
    if change in rows.columns:
        rows = rows.sort_values(change, ascending=False, na_position="last")
    return rows.iloc[0].to_dict()


def _row_label(technique: str, row: Mapping[str, Any] | None) -> str:
    """The technique's name, with the parameters of the measured row when they are not the defaults."""
    from .techniques import variant_label

    label = technique_label(technique)
    variant = variant_label(technique, row.get("params")) if row is not None else technique
    return label if variant == technique else f"{label} [{variant}]"


def back_with_measurements(recommendation: Recommendation, frame: pd.DataFrame | None) -> Backing:
    """A sentence with this model's measured numbers for the recommendation (or its fallbacks).

    The tolerance applies to the accuracy drop, or, for a dataset without labels
    (analysis.quality_metric), to the drop in top-1 agreement with the float model, and the
    sentence says so.
    """
    from .analysis import QUALITY, change_noise, describe_gain, quality_metric

    metric = quality_metric(frame)
    words = QUALITY[metric]
    if recommendation.technique is None:
        return Backing("blocked", f"Nothing to measure yet: {recommendation.reason}.", metric=metric)
    tolerance = recommendation.tolerance_points
    chain = recommendation.chain
    exceeded: list[tuple[str, float, str | None]] = []
    checked: list[tuple[str, float | None]] = []
    for technique in chain:
        row = _best_row(frame, technique, words.change)
        label = _row_label(technique, row)
        if row is None:
            if not exceeded:
                rest = [t for t in chain[1:] if _best_row(frame, t) is None]
                also = f" (fallbacks: {', '.join(rest)})" if rest else ""
                reference = () if _has_reference(frame) else ("baseline",)
                return Backing("not-measured", f"Not measured yet on this model: run {technique}{also}.",
                               to_run=(*reference, technique, *rest), checked=tuple(checked),
                               metric=metric)
            return Backing("exceeds", _exceeded_words(exceeded, tolerance, words) +
                           f"; the next option, {label} ({technique}), is not measured yet: run it.",
                           to_run=(technique,), checked=tuple(checked), metric=metric)
        change = row.get(words.change)
        if change is None or pd.isna(change):
            checked.append((technique, None))
            return Backing("no-reference", f"{label} is measured ({describe_gain(row, metric)}), but "
                           f"there is no baseline row to measure its {words.noun} drop against: run "
                           f"the baseline technique too.", row_id=row["row_id"], to_run=("baseline",),
                           checked=tuple(checked), metric=metric)
        checked.append((technique, float(change)))
        if change >= -tolerance - 1e-9:
            gain = describe_gain(row, metric)
            if not exceeded:
                text = f"On this model{_judged_by(metric)}, against the {row['reference_note']}: " \
                       f"{label} is {gain}."
            else:
                text = (_exceeded_words(exceeded, tolerance, words) + f"; the next option, {label}, "
                        f"fits: {gain}.")
            return Backing("fits", text, technique=technique, row_id=row["row_id"],
                           checked=tuple(checked), metric=metric)
        exceeded.append((technique, float(change), change_noise(row, metric)))
    return Backing("exceeds", _exceeded_words(exceeded, tolerance, words) +
                   "; no further option in the chain: relax the tolerance, or try retraining "
                   "techniques (qat-int8) if you can fine-tune.", checked=tuple(checked),
                   metric=metric)


def back_a_ready_tflite(backing: Backing, model: str, chain: tuple[str, ...] | list[str]) -> Backing:
    """The backing for a ready .tflite: the tree's techniques convert a Keras model and can never be
    measured on it, so "not measured yet: run ..." becomes why (the rows measured are still shown)."""
    if backing.status not in ("not-measured", "no-reference"):
        return backing
    return replace(backing, status="blocked", to_run=(),
                   text=f"{model} is a ready TensorFlow Lite file, measured as it is: the tree's techniques "
                        f"({', '.join(chain)}) convert a Keras model; upload that model to check the tree "
                        f"against measurements.")


def _judged_by(metric: str) -> str:
    """` (no labels: ...)` after "On this model" when the drop is in agreement, else nothing."""
    from .analysis import NO_LABELS_NOTE

    return "" if metric == "accuracy" else f" ({NO_LABELS_NOTE}, so the tolerance applies to it)"


def _noise_aside(noise: str | None) -> str:
    """` (measured; within noise on 120 samples, so not proven)`: a loss beyond the tolerance that the
    test cannot tell from noise is still the measured loss, and the sentence says both."""
    if not noise:
        return ""
    return f" (measured; {noise}, so not proven)" if noise.startswith("within noise") else f" ({noise})"


def _exceeded_words(exceeded: list[tuple[str, float, str | None]], tolerance: float,
                    words: Any = None) -> str:
    """Each option's loss, with how it stands against the noise when the predictions are kept
    (a loss inside the noise is said to be: it is measured, not proven)."""
    from .analysis import QUALITY

    words = words or QUALITY["accuracy"]
    parts = [f"{technique_label(t)} loses {-change:.1f} points{words.points_suffix}" + _noise_aside(noise)
             for t, change, noise in exceeded]
    return (f"On this model{_judged_by(words.metric)}, {', and '.join(parts)}, more than your "
            f"{tolerance:g}-point tolerance")


# --- the measured recommendation: what this model's rows say to use -------------------------------

GPU_TECHNIQUES = ("float32", "float16", "cluster", "prune", "prune-cluster")  # float kernels end to end
INTEGER_DTYPES = ("int8", "uint8", "int16")


@dataclass(frozen=True)
class MeasuredPick:
    """The measured variant to use: the smallest of those the answers allow inside the tolerance."""

    technique: str
    row: dict[str, Any]
    label: str
    gain: str                          # analysis.describe_gain of the row
    reason: str                        # why this one, in words
    candidates: int                    # measured variants the answers allow
    metric: str = "accuracy"

    @property
    def row_id(self) -> str:
        return str(self.row["row_id"])


def _technique_facts(technique_id: str) -> tuple[bool, bool, bool]:
    """(needs calibration data, fine-tunes, integer input/output) from the registry."""
    try:
        from .techniques import get_technique

        technique = get_technique(technique_id)
    except Exception:  # not registered in this install: judged by its measured dtypes only
        return False, technique_id in KNOWN_LABELS, False
    return technique.needs_calibration, technique.fine_tunes, technique.integer_only


def io_dtype(row: Mapping[str, Any]) -> str:
    """The row's measured input dtype, or, when it was not recorded, the one its technique gives."""
    measured = row.get("input_dtype")
    if isinstance(measured, str) and measured:
        return measured
    technique = str(row.get("technique"))
    if technique == "uint8-only":
        return "uint8"
    if technique == "int16x8":
        return "int16"
    return "int8" if _technique_facts(technique)[2] else "float32"


def why_not_deployable(row: Mapping[str, Any], answers: Answers) -> str | None:
    """Why the deployment the answers describe cannot use this measured row (None: it can)."""
    technique = str(row.get("technique"))
    needs_data, fine_tunes, _ = _technique_facts(technique)
    dtype = io_dtype(row)
    if technique == "baseline":
        return "the Keras model is not a TensorFlow Lite file"
    if needs_data and not answers.representative_data:
        return "it needs representative data"
    if fine_tunes and not answers.can_retrain:
        return "it needs retraining"
    if answers.hardware == "gpu":
        return None if technique in GPU_TECHNIQUES else "a GPU delegate runs float kernels"
    if answers.hardware not in INTEGER_HARDWARE and not answers.integer_io:
        return "its input and output are integer" if dtype in INTEGER_DTYPES else None
    if dtype not in INTEGER_DTYPES:
        return "its input and output are float"
    if answers.uint8_io and dtype != "uint8":
        return f"its input and output are {dtype}, not uint8"
    if answers.hardware == "edgetpu" and dtype == "int16":
        return "the Edge TPU has no 16-bit kernels"
    float_ops = row.get("float_ops")
    if answers.hardware in INTEGER_HARDWARE and isinstance(float_ops, (int, float)) and float_ops > 0:
        return f"{int(float_ops)} of its ops stayed float"
    return None


def measured_pick(recommendation: Recommendation, frame: pd.DataFrame | None) -> MeasuredPick | None:
    """The smallest measured variant the answers allow that stays within the tolerance (ties: the
    faster, then the better), or None when no measured variant does. The tolerance is in the
    workload's quality (analysis.quality_metric: agreement without labels)."""
    from .analysis import QUALITY, describe_gain, quality_metric, sweet_spot

    if frame is None or frame.empty or not _has_reference(frame):
        return None
    answers = recommendation.answers
    allowed = frame[[why_not_deployable(row, answers) is None for row in frame.to_dict("records")]]
    allowed = allowed[allowed["error"].isna()]
    if allowed.empty:
        return None
    metric = quality_metric(frame)
    spot = sweet_spot(allowed, None, answers.tolerance_points, "size", metric)
    if not spot.found:
        return None
    row = spot.row
    technique = str(row["technique"])
    words = QUALITY[metric]
    reason = (f"the smallest of {len(allowed)} measured variant(s) your deployment can run, among the "
              f"{spot.candidates} losing at most {words.points(answers.tolerance_points)}")
    if spot.tie_break:  # differences inside the noise are ties: say which criterion decided
        reason += f"; {spot.tie_break}"
    return MeasuredPick(technique, row, _row_label(technique, row), describe_gain(row, metric), reason,
                        len(allowed), metric)


def measured_gain(technique: str | None, frame: pd.DataFrame | None) -> str | None:
    """This model's measured figures for `technique` (its best row), or None when it is not measured:
    the page shows these instead of the docs' generic claims."""
    from .analysis import QUALITY, describe_gain, quality_metric

    if technique is None or not _has_reference(frame):
        return None
    metric = quality_metric(frame)
    row = _best_row(frame, technique, QUALITY[metric].change)
    return None if row is None else describe_gain(row, metric)


# --- a smaller file than 8 bits: int4 weights (LiteRT Quantizer) ------------------------------------

INT4_TECHNIQUE = "lq-int4-dynamic"


@dataclass(frozen=True)
class SizeOffer:
    """int4 weights, offered when the deployment can run them: measured or still to measure."""

    status: str                        # not-measured | fits | exceeds
    text: str
    to_run: tuple[str, ...] = ()
    row_id: str | None = None


def int4_offer(recommendation: Recommendation, frame: pd.DataFrame | None) -> SizeOffer | None:
    """Whether int4 weights suit this deployment, and what this model's rows say about them.

    Offered on a CPU with float input/output when an accuracy drop is acceptable (int4 dynamic keeps
    float activations and I/O): "run it" when not measured, its measured figures when it fits the
    tolerance, and its loss when it does not. None for GPUs, integer-only targets or no drop allowed.
    """
    from .analysis import QUALITY, change_noise, describe_gain, quality_metric

    answers = recommendation.answers
    if answers.hardware != "cpu" or answers.integer_io or not answers.accuracy_drop_ok:
        return None
    metric = quality_metric(frame)
    words = QUALITY[metric]
    row = _best_row(frame, INT4_TECHNIQUE, words.change)
    label = technique_label(INT4_TECHNIQUE)
    if row is None:
        return SizeOffer("not-measured", f"Smaller than any 8-bit variant: {label} ({INT4_TECHNIQUE}) "
                                         f"stores int4 weights, about half the bytes of int8; it is not "
                                         f"measured on this model yet.", to_run=(INT4_TECHNIQUE,))
    change = row.get(words.change)
    if change is None or pd.isna(change) or not _has_reference(frame):
        return None
    if change >= -answers.tolerance_points - 1e-9:
        return SizeOffer("fits", f"{label} fits your tolerance: {describe_gain(row, metric)}.",
                         row_id=str(row["row_id"]))
    noise = change_noise(row, metric)
    return SizeOffer("exceeds", f"{label} was measured and loses {-float(change):.1f} points"
                                f"{words.points_suffix}" + _noise_aside(noise) +
                     f", more than your {answers.tolerance_points:g}-point tolerance.",
                     row_id=str(row["row_id"]))


# --- running what is missing ---------------------------------------------------------------------


def runnable_techniques(technique_ids: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """(registered in this install, not registered) of `technique_ids`, order kept."""
    from .techniques import get_technique

    known, unknown = [], []
    for technique_id in dict.fromkeys(technique_ids):
        try:
            get_technique(technique_id)
            known.append(technique_id)
        except Exception:  # TechniqueError
            unknown.append(technique_id)
    return known, unknown


def split_by_model_kind(technique_ids: tuple[str, ...] | list[str],
                        model_kind: str) -> tuple[list[str], list[str]]:
    """(can run, cannot run) on a model of `model_kind` (keras, savedmodel, tflite), order kept: a
    ready .tflite is measured as it is, so nothing a recommendation names can run on it."""
    from .techniques import get_technique

    can, cannot = [], []
    for technique_id in technique_ids:
        (can if model_kind in get_technique(technique_id).sources else cannot).append(technique_id)
    return can, cannot


def follow_up_spec(previous: Mapping[str, Any] | None, model: str, dataset: str,
                   technique_ids: tuple[str, ...] | list[str]) -> Any:
    """A SweepSpec for `technique_ids` with the previous sweep's model file, dataset file and
    training/measurement settings (so new rows compare like for like); built-in names otherwise."""
    from .config import MeasureSettings, SweepSpec, TechniqueSpec, TrainSettings
    from .techniques import resolve_spec

    techniques = tuple(resolve_spec(TechniqueSpec(t)) for t in technique_ids)
    previous = previous or {}
    return SweepSpec(model=str(previous.get("model") or model),
                     dataset=str(previous.get("dataset") or dataset), techniques=techniques,
                     train=TrainSettings.from_dict(previous.get("train") or {}),
                     measure=MeasureSettings.from_dict(previous.get("measure") or {}),
                     label_output=previous.get("label_output"))  # a model with several outputs
