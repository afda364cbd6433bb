"""Fine-tune a trained tf_keras model with tensorflow-model-optimization (tfmot 0.8.1, tf_keras 2.21).

For when post-training quantization costs too much accuracy. Each function takes the trained baseline
and the train split, fine-tunes a *copy* (the caller's model is never touched) and returns a
`FineTuneResult`: a plain tf_keras model ready for `TFLiteConverter.from_keras_model` (the caller
converts) and JSON-serialisable stats.

- `quantization_aware_train` ("qat-int8"): annotate the layers tfmot can quantize, `quantize_apply`,
  fine-tune; the returned model is the quantize-wrapped one (fake-quant), which converts to int8
  with `Optimize.DEFAULT`.
- `cluster` ("cluster"): `cluster_weights`, fine-tune, `strip_clustering`; every clustered kernel is
  checked to hold at most `number_of_clusters` distinct values.
- `prune` ("prune"): magnitude pruning to a target sparsity, fine-tune, `strip_pruning`; the sparsity
  actually reached is measured and a TechniqueError is raised when it is more than 1 point short.
- Collaborative optimization: `cluster_preserving_qat` ("cqat-int8"), `pruning_preserving_qat`
  ("pqat-int8") and `sparsity_preserving_cluster` ("prune-cluster"). All three work with these
  versions; `UNSUPPORTED` lists the ones that would not (none), see docs/tfmot-notes.md.

Real users' models: every technique works layer by layer. Layers tfmot cannot handle stay as they
are (float for QAT: preprocessing, Embedding, ...), recurrent layers are refused by the QAT techniques
before any work, and the stats list both sides: "optimized_layers" [{"layer", "class", "weights"?}]
and "untouched_layers" [{"layer", "class", "reason", "output_quantized"?}].

Why a copy (docs/tfmot-notes.md has the details): tfmot's `prune_low_magnitude` and `cluster_weights`
wrap the caller's own layer objects. Clustering replaces `layer.kernel` by a tensor, so a later
`prune_low_magnitude` on the same baseline failed with "'EagerTensor' object has no attribute
'assign'" (reported as a crash in `fit`); pruning writes its masks into the baseline's kernels. Every
function here rebuilds the model from its config and copies the weights first (no optimizer or
compile state).

Pruning schedules are derived from the real number of fine-tune steps: tfmot's default
`frequency=100` never updates the masks in a fine-tune of fewer than 100 steps (0% sparsity).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import DatasetError, ModelError, TechniqueError
from .keras_copy import clone_with_weights
from .tfcompat import import_tensorflow

CENTROID_INITS = ("linear", "kmeans++", "density-based", "random")
PRUNING_SCHEDULES = ("constant", "polynomial")
SPARSITY_TOLERANCE = 0.01  # fail when the overall sparsity reached is more than 1 point short
MAX_PRUNING_FREQUENCY = 100  # tfmot's default; shorter runs update masks more often (see _pruning_schedule)
MASK_UPDATES_PER_RUN = 10  # aim for about this many mask updates in a short fine-tune
POLYNOMIAL_RAMP = 0.7  # the polynomial schedule reaches the target at 70% of the steps, then recovers
PROGRESS_EVENTS_PER_EPOCH = 50  # at most this many on_progress calls per epoch (plus each epoch's last)
EVAL_BATCH_SIZE = 256
KERNEL_WEIGHT_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel", "recurrent_kernel", "embeddings")

# Technique id -> why it cannot run with tensorflow-model-optimization 0.8.1 + tf_keras 2.21.
# Empty: CQAT, PQAT and sparsity-preserving clustering all worked here (docs/tfmot-notes.md).
UNSUPPORTED: dict[str, str] = {}

ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class FineTuneResult:
    """A fine-tuned model and what happened.

    `model` is a plain tf_keras model for `TFLiteConverter.from_keras_model`: stripped of clustering
    and pruning wrappers; for QAT techniques the quantize-wrapped model (it converts to int8).
    `stats` is JSON-serialisable: steps, epochs, accuracy before/after on the held-out split (None
    without one), per-layer sparsity or distinct-value counts.
    """

    model: Any
    stats: dict


# --- public measurements --------------------------------------------------------------------------


LayerSelection = Iterable[str] | Mapping[str, Iterable[str]] | None


def measure_sparsity(model: Any, layers: LayerSelection = None) -> dict:
    """Fraction of exact zeros in the kernels of each layer (biases excluded), or of `layers` only.

    `layers` is a list of layer names, or {layer: [weight names]} to measure only those weights
    (e.g. {"separable_conv2d": ["pointwise_kernel"]}: tfmot prunes that one, not the depthwise one).
    Layers are named as in the baseline (a QAT wrapper "quant_dense" counts as "dense"). Returns
    {"layers": {layer: {"zeros", "total", "sparsity"}}, "zeros", "total", "overall"}.
    """
    per_layer, zeros, total = {}, 0, 0
    for layer_name, values in _kernels(model, layers):
        z = int(sum(int(np.count_nonzero(v == 0)) for v in values))
        n = int(sum(v.size for v in values))
        per_layer[layer_name] = {"zeros": z, "total": n, "sparsity": z / n if n else 0.0}
        zeros, total = zeros + z, total + n
    return {"layers": per_layer, "zeros": zeros, "total": total,
            "overall": zeros / total if total else 0.0}


def count_unique_weights(model: Any, layers: LayerSelection = None, *,
                         per_channel: bool = False) -> dict:
    """Number of distinct values in each layer's kernels: {layer: count} (the largest per layer).

    `layers` selects layers (and weights) as in `measure_sparsity`. With `per_channel`, the largest
    count within one output channel (the kernel's last axis).
    """
    def count(v: np.ndarray) -> int:
        if not per_channel or v.ndim < 2:
            return int(np.unique(v).size)
        channels = v.reshape(-1, v.shape[-1])
        return max(int(np.unique(channels[:, c]).size) for c in range(channels.shape[1]))

    return {layer_name: max(count(v) for v in values) for layer_name, values in _kernels(model, layers)}


def _kernels(model: Any, only: LayerSelection = None) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, [kernel values]) for each layer with kernel-like weights, nested models flattened.

    Matches weight names such as "conv2d/kernel:0" or "lstm/lstm_cell/recurrent_kernel:0" (also
    inside QAT wrappers), not "quant_conv2d/kernel_min:0". A wrapper (QAT, pruning, clustering) is
    named after its layer. `only` maps layer names to the weight names to read (see measure_sparsity).
    """
    if only is None or isinstance(only, Mapping):
        wanted = only
    else:
        wanted = {name: KERNEL_WEIGHT_NAMES for name in only}
    found = []
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and not hasattr(layer, "layer"):  # a nested model
            found.extend(_kernels(layer, wanted))
            continue
        name = layer.layer.name if hasattr(layer, "layer") else layer.name
        if wanted is not None and name not in wanted:
            continue
        names = KERNEL_WEIGHT_NAMES if wanted is None else tuple(wanted[name])
        values = [w.numpy() for w in layer.weights if _short_name(w) in names]
        if values:
            found.append((name, values))
    return found


def _short_name(weight: Any) -> str:
    """"kernel" for "lstm/lstm_cell/kernel:0"."""
    return weight.name.split("/")[-1].split(":")[0]


# --- techniques ---------------------------------------------------------------------------------


def quantization_aware_train(model: Any, x_train: Any, y_train: Any, *, epochs: int = 1,
                             learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                             x_val: Any = None, y_val: Any = None,
                             on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Quantization-aware training ("qat-int8"): annotate the layers tfmot can quantize, then
    `quantize_apply` on a copy and fine-tune.

    Layers tfmot cannot quantize (preprocessing, Embedding, ...) stay float; recurrent layers are
    refused. The returned model keeps its quantize wrappers (fake-quant ops with learned ranges);
    convert it with `Optimize.DEFAULT` to get int8 weights and activations.
    """
    _precheck_qat("qat-int8", model)
    run = _Run("qat-int8", model, x_train, y_train, x_val, y_val, epochs, learning_rate, batch_size,
               seed, on_progress)
    quantized, optimized, untouched = _quantize_layers(run)
    fine_tune = run.fine_tune(quantized)
    stats = run.stats(fine_tune, quantized)
    stats.update(quantized_layers=_quantized_layer_names(quantized), optimized_layers=optimized,
                 untouched_layers=untouched)
    return FineTuneResult(quantized, stats)


def cluster(model: Any, x_train: Any, y_train: Any, *, number_of_clusters: int = 16,
            centroid_init: str = "kmeans++", epochs: int = 1, learning_rate: float = 1e-4,
            batch_size: int = 32, seed: int = 0, preserve_sparsity: bool = False,
            x_val: Any = None, y_val: Any = None,
            on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Weight clustering ("cluster"): `cluster_weights`, fine-tune, `strip_clustering`.

    Every clustered kernel must end with at most `number_of_clusters` distinct values (checked).
    With `preserve_sparsity=True` (for an already pruned model) zero weights stay zero and one of the
    clusters is the zero centroid.
    """
    technique = "prune-cluster" if preserve_sparsity else "cluster"
    _check_choice(technique, "centroid_init", centroid_init, CENTROID_INITS)
    minimum = 3 if preserve_sparsity else 2
    if not isinstance(number_of_clusters, (int, np.integer)) or number_of_clusters < minimum:
        raise TechniqueError(f"{technique}: number_of_clusters must be an integer >= {minimum}, "
                             f"not {number_of_clusters!r}")
    run = _Run(technique, model, x_train, y_train, x_val, y_val, epochs, learning_rate, batch_size,
               seed, on_progress)
    cl = run.tfmot.clustering.keras
    init = {"linear": cl.CentroidInitialization.LINEAR,
            "kmeans++": cl.CentroidInitialization.KMEANS_PLUS_PLUS,
            "density-based": cl.CentroidInitialization.DENSITY_BASED,
            "random": cl.CentroidInitialization.RANDOM}[centroid_init]
    wrapped, optimized, untouched = _wrap_layers(run, "cluster", lambda layer: cl.cluster_weights(
        layer, number_of_clusters=int(number_of_clusters), cluster_centroids_init=init,
        preserve_sparsity=bool(preserve_sparsity)),
        skip=lambda layer: _too_few_weights(layer, int(number_of_clusters), bool(preserve_sparsity)))
    if preserve_sparsity:  # a pruned layer left unclustered must not train its zeros away
        by_name = {getattr(layer, "layer", layer).name: layer for layer in wrapped.layers}
        for entry in untouched:
            layer = by_name.get(entry["layer"])
            if layer is not None and layer.trainable_weights:
                layer.trainable = False
                entry["reason"] += "; frozen so its zeros survive"
    # tfmot clusters Conv, Dense, Embedding and recurrent kernels; measured on those weights only.
    clustered_layers = [entry["layer"] for entry in optimized]
    clustered = {entry["layer"]: entry["weights"] for entry in optimized}
    sparsity_before = measure_sparsity(run.base, clustered)
    # Clustering alone (before fine-tuning) already moves every weight to a centroid.
    accuracy_clustered = _accuracy(wrapped, run.x_val, run.y_val)
    fine_tune = run.fine_tune(wrapped)
    stripped = cl.strip_clustering(wrapped)
    unique = count_unique_weights(stripped, clustered)
    _require_clusters(technique, unique, clustered_layers, int(number_of_clusters))
    sparsity = measure_sparsity(stripped, clustered)
    if preserve_sparsity and sparsity["overall"] < sparsity_before["overall"] - SPARSITY_TOLERANCE:
        raise TechniqueError(f"{technique}: clustering with preserve_sparsity lowered the sparsity of "
                             f"the clustered kernels from {sparsity_before['overall']:.1%} to "
                             f"{sparsity['overall']:.1%}; this is a bug in tfmot, please report it")
    stats = run.stats(fine_tune, stripped)
    stats.update(accuracy_before_fine_tune=accuracy_clustered,
                 number_of_clusters=int(number_of_clusters), centroid_init=centroid_init,
                 preserve_sparsity=bool(preserve_sparsity), clustered_layers=clustered_layers,
                 unique_values=unique, optimized_layers=optimized, untouched_layers=untouched)
    if preserve_sparsity:
        stats.update(sparsity_before=sparsity_before, sparsity=sparsity)
    return FineTuneResult(stripped, stats)


def prune(model: Any, x_train: Any, y_train: Any, *, target_sparsity: float = 0.5,
          schedule: str = "constant", epochs: int = 2, learning_rate: float = 1e-4,
          batch_size: int = 32, seed: int = 0, x_val: Any = None, y_val: Any = None,
          on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Magnitude pruning ("prune"): `prune_low_magnitude`, fine-tune, `strip_pruning`.

    The schedule's frequency and end step come from the real number of fine-tune steps, so even a
    short fine-tune reaches the target. Raises TechniqueError when the overall sparsity reached is
    more than 1 point below `target_sparsity`.
    """
    _check_choice("prune", "schedule", schedule, PRUNING_SCHEDULES)
    if not 0.0 < _as_float("prune", "target_sparsity", target_sparsity) < 1.0:
        raise TechniqueError(f"prune: target_sparsity must be between 0 and 1 (e.g. 0.5 for 50%), "
                             f"not {target_sparsity!r}")
    run = _Run("prune", model, x_train, y_train, x_val, y_val, epochs, learning_rate, batch_size,
               seed, on_progress)
    sp = run.tfmot.sparsity.keras
    pruning_schedule, schedule_stats = _pruning_schedule(sp, schedule, float(target_sparsity),
                                                         run.total_steps)
    wrapped, optimized, untouched = _wrap_layers(run, "prune", lambda layer: sp.prune_low_magnitude(
        layer, pruning_schedule=pruning_schedule))
    # tfmot prunes Conv, Dense, Embedding and recurrent kernels (the pointwise kernel only of a
    # SeparableConv2D). The target applies to the weights it prunes.
    pruned_layers = [entry["layer"] for entry in optimized]
    pruned = {entry["layer"]: entry["weights"] for entry in optimized}
    # UpdatePruningStep sets the step counter the schedule reads and re-applies the masks at the end
    # of every epoch; without it fit fails ("Prune() wrapper requires the UpdatePruningStep callback").
    fine_tune = run.fine_tune(wrapped, callbacks=[sp.UpdatePruningStep()])
    stripped = sp.strip_pruning(wrapped)
    sparsity = measure_sparsity(stripped, pruned)
    _require_sparsity("prune", sparsity, float(target_sparsity))
    stats = run.stats(fine_tune, stripped)
    stats.update(target_sparsity=float(target_sparsity), schedule=schedule_stats,
                 pruned_layers=pruned_layers, sparsity=sparsity,
                 sparsity_all_kernels=measure_sparsity(stripped)["overall"],
                 optimized_layers=optimized, untouched_layers=untouched)
    return FineTuneResult(stripped, stats)


def cluster_preserving_qat(model: Any, x_train: Any, y_train: Any, *, number_of_clusters: int = 16,
                           centroid_init: str = "kmeans++", cluster_epochs: int = 1, epochs: int = 1,
                           learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                           x_val: Any = None, y_val: Any = None,
                           on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Cluster-preserving QAT ("cqat-int8"): `cluster`, then QAT with
    `Default8BitClusterPreserveQuantizeScheme`, then `strip_clustering_cqat`.

    The returned quantize-wrapped model converts to int8 whose kernels keep at most
    `number_of_clusters` distinct values (per output channel for per-channel quantized convolutions).
    """
    _check_positive_int("cqat-int8", "epochs", epochs)
    _precheck_qat("cqat-int8", model, "cluster")
    first = cluster(model, x_train, y_train, number_of_clusters=number_of_clusters,
                    centroid_init=centroid_init, epochs=cluster_epochs, learning_rate=learning_rate,
                    batch_size=batch_size, seed=seed, x_val=x_val, y_val=y_val,
                    on_progress=_part(on_progress, 1, 2))
    run = _Run("cqat-int8", first.model, x_train, y_train, x_val, y_val, epochs, learning_rate,
               batch_size, seed, _part(on_progress, 2, 2))
    combine = run.tfmot.experimental.combine
    quantized, optimized, untouched = _quantize_layers(run, "cluster",
                                                       freeze=first.stats["clustered_layers"])
    fine_tune = run.fine_tune(quantized)
    # Drops the centroid, index and original-weight variables CQAT adds; keeps the quantize wrappers.
    stripped = combine.strip_clustering_cqat(quantized)
    # CQAT keeps a Conv2D's clusters per output channel when the channels hold about as many distinct
    # values each (it then trains one set of centroids per channel): the whole kernel may end with
    # up to k x channels values, each channel with at most k. Check what tfmot guarantees.
    clustered = _after_qat(first.stats["optimized_layers"], run.base, stripped)
    unique = count_unique_weights(stripped, clustered)
    unique_per_channel = count_unique_weights(stripped, clustered, per_channel=True)
    _require_clusters("cqat-int8", unique_per_channel, list(clustered), int(number_of_clusters),
                      "per output channel ")
    stats = run.stats(fine_tune, stripped)
    stats.update(accuracy_before=first.stats["accuracy_before"], stages={"cluster": first.stats},
                 number_of_clusters=int(number_of_clusters), centroid_init=centroid_init,
                 clustered_layers=first.stats["clustered_layers"], unique_values=unique,
                 unique_values_per_channel=unique_per_channel,
                 quantized_layers=_quantized_layer_names(stripped), optimized_layers=optimized,
                 untouched_layers=untouched)
    return FineTuneResult(stripped, stats)


def pruning_preserving_qat(model: Any, x_train: Any, y_train: Any, *, target_sparsity: float = 0.5,
                           schedule: str = "constant", prune_epochs: int = 2, epochs: int = 1,
                           learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                           x_val: Any = None, y_val: Any = None,
                           on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Pruning-preserving QAT ("pqat-int8"): `prune`, then QAT with
    `Default8BitPrunePreserveQuantizeScheme`; the int8 kernels keep the sparsity (checked)."""
    _check_positive_int("pqat-int8", "epochs", epochs)
    _precheck_qat("pqat-int8", model, "prune")
    first = prune(model, x_train, y_train, target_sparsity=target_sparsity, schedule=schedule,
                  epochs=prune_epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                  x_val=x_val, y_val=y_val, on_progress=_part(on_progress, 1, 2))
    run = _Run("pqat-int8", first.model, x_train, y_train, x_val, y_val, epochs, learning_rate,
               batch_size, seed, _part(on_progress, 2, 2))
    quantized, optimized, untouched = _quantize_layers(run, "prune", freeze=first.stats["pruned_layers"])
    fine_tune = run.fine_tune(quantized)
    sparsity = measure_sparsity(quantized, _after_qat(first.stats["optimized_layers"], run.base, quantized))
    _require_sparsity("pqat-int8", sparsity, float(target_sparsity))
    stats = run.stats(fine_tune, quantized)
    stats.update(accuracy_before=first.stats["accuracy_before"], stages={"prune": first.stats},
                 target_sparsity=float(target_sparsity), pruned_layers=first.stats["pruned_layers"],
                 sparsity=sparsity, quantized_layers=_quantized_layer_names(quantized),
                 optimized_layers=optimized, untouched_layers=untouched)
    return FineTuneResult(quantized, stats)


def sparsity_preserving_cluster(model: Any, x_train: Any, y_train: Any, *,
                                target_sparsity: float = 0.5, schedule: str = "constant",
                                prune_epochs: int = 2, number_of_clusters: int = 16,
                                centroid_init: str = "kmeans++", epochs: int = 1,
                                learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                                x_val: Any = None, y_val: Any = None,
                                on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Sparsity-preserving clustering ("prune-cluster"): `prune`, then
    `cluster_weights(..., preserve_sparsity=True)`; checks both the sparsity and the cluster count."""
    _check_positive_int("prune-cluster", "epochs", epochs)
    _check_choice("prune-cluster", "centroid_init", centroid_init, CENTROID_INITS)
    first = prune(model, x_train, y_train, target_sparsity=target_sparsity, schedule=schedule,
                  epochs=prune_epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                  x_val=x_val, y_val=y_val, on_progress=_part(on_progress, 1, 2))
    second = cluster(first.model, x_train, y_train, number_of_clusters=number_of_clusters,
                     centroid_init=centroid_init, epochs=epochs, learning_rate=learning_rate,
                     batch_size=batch_size, seed=seed, preserve_sparsity=True, x_val=x_val,
                     y_val=y_val, on_progress=_part(on_progress, 2, 2))
    pruned = {entry["layer"]: entry["weights"] for entry in first.stats["optimized_layers"]}
    sparsity = measure_sparsity(second.model, pruned)
    _require_sparsity("prune-cluster", sparsity, float(target_sparsity))
    stats = dict(second.stats, accuracy_before=first.stats["accuracy_before"],
                 target_sparsity=float(target_sparsity), pruned_layers=first.stats["pruned_layers"],
                 sparsity=sparsity, stages={"prune": first.stats})
    return FineTuneResult(second.model, stats)


# Technique id -> the function that produces its Keras model (the registry converts it).
TECHNIQUES: dict[str, Callable[..., FineTuneResult]] = {
    "qat-int8": quantization_aware_train,
    "cluster": cluster,
    "prune": prune,
    "cqat-int8": cluster_preserving_qat,
    "pqat-int8": pruning_preserving_qat,
    "prune-cluster": sparsity_preserving_cluster,
}


# --- the shared fine-tuning run -------------------------------------------------------------------


class _Run:
    """One fine-tuning run: checked inputs, a fresh copy of the model, seeds, data and progress."""

    def __init__(self, technique: str, model: Any, x_train: Any, y_train: Any, x_val: Any, y_val: Any,
                 epochs: int, learning_rate: float, batch_size: int, seed: int,
                 on_progress: ProgressFn | None) -> None:
        self.tf, self.keras = import_tensorflow()
        import tensorflow_model_optimization as tfmot  # only after TF_USE_LEGACY_KERAS is set

        self.tfmot = tfmot
        self.technique = technique
        _check_positive_int(technique, "epochs", epochs)
        _check_positive_int(technique, "batch_size", batch_size)
        if not _as_float(technique, "learning_rate", learning_rate) > 0:
            raise TechniqueError(f"{technique}: learning_rate must be > 0, not {learning_rate!r}")
        self.epochs, self.batch_size = int(epochs), int(batch_size)
        self.learning_rate, self.seed = float(learning_rate), int(seed)
        _check_model_structure(self.keras, model, technique)
        self.label_output = _label_output(model, y_train, technique)
        self.x, self.y = _labelled_arrays(model, x_train, y_train, technique, "train")
        self.x_val = self.y_val = None
        if x_val is not None or y_val is not None:
            self.x_val, self.y_val = _labelled_arrays(model, x_val, y_val, technique, "validation")
        self.from_logits = _outputs_logits(self.keras, model, self.label_output)
        self.on_progress = on_progress
        self.samples = _samples(self.x)
        self.steps_per_epoch = math.ceil(self.samples / self.batch_size)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.keras.utils.set_random_seed(self.seed)
        self.base = _fresh_copy(self.keras, model)
        self.accuracy_before = _accuracy(self.base, self.x_val, self.y_val, self.label_output)

    def fine_tune(self, wrapped: Any, callbacks: list | None = None) -> dict:
        """Compile `wrapped` afresh and fit it on the train split with a seeded shuffle."""
        tf, keras = self.tf, self.keras
        keras.utils.set_random_seed(self.seed)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)
        targets = self.y
        if self.label_output is not None:   # several outputs: the loss is on the labelled one only
            name = _output_name(wrapped, self.label_output)
            loss, targets = {name: loss}, {name: self.y}
        wrapped.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss=loss,
                        metrics={name: ["accuracy"]} if self.label_output is not None else ["accuracy"])
        inputs = tuple(self.x) if isinstance(self.x, list) else self.x
        data = (tf.data.Dataset.from_tensor_slices((inputs, targets))
                .shuffle(self.samples, seed=self.seed, reshuffle_each_iteration=True)
                .batch(self.batch_size))
        callbacks = list(callbacks or [])
        if self.on_progress is not None:
            callbacks.append(_progress_callback(keras, self.on_progress, self.technique, self.epochs,
                                                self.steps_per_epoch))
        started = time.perf_counter()
        history = wrapped.fit(data, epochs=self.epochs, verbose=0, callbacks=callbacks)
        return {"final_loss": float(history.history["loss"][-1]),
                "fine_tune_seconds": round(time.perf_counter() - started, 3)}

    def stats(self, fine_tune: dict, final_model: Any) -> dict:
        return {"technique": self.technique, "epochs": self.epochs, "learning_rate": self.learning_rate,
                "batch_size": self.batch_size, "seed": self.seed, "train_samples": self.samples,
                "steps_per_epoch": self.steps_per_epoch, "steps": self.total_steps,
                "val_samples": None if self.x_val is None else _samples(self.x_val),
                "accuracy_before": self.accuracy_before,
                "accuracy_after": _accuracy(final_model, self.x_val, self.y_val, self.label_output),
                **({"label_output": self.label_output} if self.label_output else {}), **fine_tune}


def _fresh_copy(keras: Any, model: Any) -> Any:
    """The model rebuilt from its config with a copy of its weights: new layer objects and variables,
    no optimizer or compile state, so tfmot's wrappers never reach the caller's layers."""
    try:
        copy = clone_with_weights(keras, model)
    except (ValueError, TypeError, NotImplementedError) as error:
        raise ModelError(f"cannot copy the model to fine-tune it ({_first_line(error)}); make sure it "
                         f"is a Sequential or Functional tf_keras model of built-in layers") from None
    return copy


def _progress_callback(keras: Any, on_progress: ProgressFn, technique: str, epochs: int,
                       steps: int) -> Any:
    every = max(1, steps // PROGRESS_EVENTS_PER_EPOCH)

    class Progress(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.epoch = epoch

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            step = batch + 1
            if step % every and step != steps:
                return
            on_progress({"stage": "fine-tune", "technique": technique, "epoch": self.epoch + 1,
                         "epochs": epochs, "step": step, "steps": steps,
                         "loss": float((logs or {}).get("loss", float("nan")))})

    return Progress()


def _part(on_progress: ProgressFn | None, part: int, parts: int) -> ProgressFn | None:
    """Tag events with the stage of a two-stage technique (part 1 of 2: prune, 2 of 2: QAT...)."""
    if on_progress is None:
        return None
    return lambda event: on_progress({**event, "part": part, "parts": parts})


def _accuracy(model: Any, x: Any, y: np.ndarray | None, label_output: str | None = None) -> float | None:
    if x is None:
        return None
    logits = model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0)
    if isinstance(logits, (list, tuple)):
        logits = logits[_output_index(model, label_output)]
    return float(np.mean(np.argmax(logits, axis=-1) == y))


# --- pruning schedule and checks ----------------------------------------------------------------


def _pruning_schedule(sp: Any, schedule: str, target: float, total_steps: int) -> tuple[Any, dict]:
    """A tfmot schedule whose mask updates fall inside the real `total_steps` of the fine-tune.

    The wrapper's step counter (set to 0 by UpdatePruningStep, incremented before each batch) runs
    1..total_steps, and masks are recomputed only when (step - begin_step) % frequency == 0 and
    begin_step <= step <= end_step. tfmot's default frequency=100 therefore never prunes a shorter
    run. Here frequency gives ~MASK_UPDATES_PER_RUN updates (at most every 100 steps); the polynomial
    schedule's end_step is a multiple of frequency within the run, so its last update applies the
    full target, and the remaining ~30% of steps recover accuracy at that sparsity.
    """
    if schedule == "constant":
        frequency = max(1, min(MAX_PRUNING_FREQUENCY, total_steps // MASK_UPDATES_PER_RUN))
        end_step = total_steps
        result = sp.ConstantSparsity(target, begin_step=0, end_step=end_step, frequency=frequency)
    else:
        ramp = max(1, round(POLYNOMIAL_RAMP * total_steps))
        frequency = max(1, min(MAX_PRUNING_FREQUENCY, ramp // MASK_UPDATES_PER_RUN))
        end_step = frequency * (ramp // frequency)
        result = sp.PolynomialDecay(initial_sparsity=0.0, final_sparsity=target, begin_step=0,
                                    end_step=end_step, frequency=frequency)
    return result, {"name": schedule, "begin_step": 0, "end_step": end_step, "frequency": frequency,
                    "mask_updates": end_step // frequency, "total_steps": total_steps}


def _require_sparsity(technique: str, sparsity: dict, target: float) -> None:
    if sparsity["overall"] < target - SPARSITY_TOLERANCE:
        per_layer = ", ".join(f"{name} {layer['sparsity']:.1%}" for name, layer in sparsity["layers"].items())
        raise TechniqueError(f"{technique}: reached {sparsity['overall']:.1%} overall sparsity, more than "
                             f"1 point below the target {target:.1%} ({per_layer}); fine-tune for more "
                             f"steps (more epochs or a smaller batch_size) or lower target_sparsity")


def _require_clusters(technique: str, unique: dict, layers: list[str], clusters: int,
                      scope: str = "") -> None:
    over = {name: unique[name] for name in layers if unique.get(name, 0) > clusters}
    if over:
        detail = ", ".join(f"{name} has {count}" for name, count in over.items())
        raise TechniqueError(f"{technique}: clustered kernels should hold at most {clusters} distinct "
                             f"values {scope}but {detail}; tfmot did not keep the clusters, so this "
                             f"variant would not compress as expected: report it with the model")


# --- what tfmot can wrap ----------------------------------------------------------------------------


def _check_model_structure(keras: Any, model: Any, technique: str) -> None:
    """Refuse, in one line, models tfmot cannot wrap: Keras 3, subclassed, nested, unbuilt."""
    kind = type(model).__name__
    if not isinstance(model, keras.Model):
        if type(model).__module__.split(".")[0] == "keras":
            raise ModelError(f"{technique}: the model is a Keras 3 {kind} model; tfmot only wraps "
                             f"tf_keras (Keras 2) models: rebuild it with tf_keras, or save it as .h5 "
                             f"and load it with tf_keras.models.load_model")
        raise ModelError(f"{technique}: expected a tf_keras model, got {kind}")
    if not (isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)):
        raise ModelError(f"{technique}: {kind} is a subclassed model; tfmot only wraps Sequential or "
                         f"Functional models: rebuild it with keras.Sequential or the Functional API "
                         f"(keras.Input -> layers -> keras.Model)")
    if not model.built or not model.inputs:
        raise ModelError(f"{technique}: the model has no defined input shape; give it a keras.Input "
                         f"(or an InputLayer) before fine-tuning")
    tf, _ = import_tensorflow()
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            raise ModelError(f"{technique}: layer {layer.name!r} is a nested model "
                             f"({type(layer).__name__}) whose layers tfmot would leave untouched; "
                             f"rebuild the model flat, with that model's layers inline")
        for attribute in KERNEL_WEIGHT_NAMES:
            value = getattr(layer, attribute, None)
            if value is not None and not isinstance(value, tf.Variable):
                # tfmot's cluster_weights, applied to this very model object, replaces the kernel
                # variable by a tensor and stops tracking it: the original weights are gone.
                raise ModelError(f"{technique}: the {attribute} of layer {layer.name!r} is a "
                                 f"{type(value).__name__}, not a variable: a tfmot wrapper (e.g. "
                                 f"cluster_weights) was applied to this model object itself; load "
                                 f"the model again from its file and pass that")


# --- which layers a technique optimizes -----------------------------------------------------------
#
# Each technique wraps layer by layer (keras.models.clone_model with a clone_function), so a model
# with layers tfmot cannot handle is optimized where it can be and left as it is elsewhere. The
# stats name both sides: "optimized_layers" [{"layer", "class", "weights"?}] and "untouched_layers"
# [{"layer", "class", "reason"}] (for the QAT techniques the untouched layers stay float).

FOLDS_BATCH_NORM = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")  # tfmot's BN-fold patterns
NO_QUANTIZE_CONFIG = "tfmot has no quantize config for it"
PREPROCESSING_REASON = "preprocessing layer: tfmot has no quantize config"


def _layer_entry(layer: Any, reason: str | None = None, weights: Iterable[str] = ()) -> dict:
    entry = {"layer": layer.name, "class": type(layer).__name__}
    if weights:
        entry["weights"] = list(weights)
    if reason:
        entry["reason"] = reason
    return entry


def _inbound_layers(layer: Any) -> list[Any]:
    nodes = getattr(layer, "_inbound_nodes", [])
    return _flatten(nodes[0].inbound_layers) if nodes else []


def _input_dtypes(layer: Any) -> list[Any]:
    nodes = getattr(layer, "_inbound_nodes", [])
    return [t.dtype for t in _flatten(nodes[0].input_tensors)] if nodes else []


def _flatten(value: Any) -> list[Any]:
    tf, _ = import_tensorflow()
    return list(tf.nest.flatten(value))


def _is_builtin(layer: Any) -> bool:
    return type(layer).__module__.startswith("tf_keras.")


def _refuse_recurrent(keras: Any, model: Any, technique: str) -> None:
    """QAT techniques: tfmot 0.8.1 has no quantization-aware training for recurrent layers."""
    for layer in model.layers:
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            raise ModelError(f"{technique}: layer {layer.name!r} ({type(layer).__name__}) has no "
                             f"quantization-aware training in tfmot 0.8.1; use int8-fallback or "
                             f"dynamic (post-training) for this model, or cluster / prune")


def _refuse_custom(keras: Any, layer: Any, technique: str, action: str) -> None:
    """Lambda and custom layers: refused for QAT, and for prune / cluster when tfmot cannot wrap them."""
    kind = type(layer).__name__
    if action == "quantize" and isinstance(layer, keras.layers.Lambda):
        raise ModelError(f"{technique}: layer {layer.name!r} is a Lambda layer, which tfmot cannot "
                         f"quantize (its computation cannot be inspected); replace it with built-in "
                         f"Keras layers")
    if action == "quantize" and not _is_builtin(layer):
        raise ModelError(f"{technique}: layer {layer.name!r} is a custom layer ({kind}) that tfmot "
                         f"cannot quantize without a QuantizeConfig; replace it with built-in "
                         f"Keras layers")
    if action != "quantize" and not _is_builtin(layer) and not _wrappable(layer, action):
        what_to_do = {
            "prune": "replace it with built-in Keras layers, or give it a get_prunable_weights() "
                     "method (tfmot.sparsity.keras.PrunableLayer)",
            "cluster": "replace it with built-in Keras layers, or make it a "
                       "tfmot.clustering.keras.ClusterableLayer",
        }[action]
        raise ModelError(f"{technique}: layer {layer.name!r} ({kind}) is not supported by tfmot's "
                         f"{action} API; {what_to_do}")


# --- quantization-aware training: annotate the layers tfmot can quantize --------------------------


def _plan_quantization(keras: Any, model: Any, technique: str, registry: Any,
                       own_configs: bool) -> tuple[dict[str, Any], list[dict]]:
    """{layer name: QuantizeConfig, or None for tfmot's own} of the layers QAT quantizes, and the
    layers left float with why. Raises, naming the layer, for recurrent, Lambda and custom layers.

    `own_configs` adds QuantLab's configs for layers tfmot's registry lacks (Conv1D, MaxPooling1D);
    the collaborative schemes have no cluster- or sparsity-preserving quantizer for them.
    """
    _refuse_recurrent(keras, model, technique)
    configs: dict[str, Any] = {}
    untouched = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        _refuse_custom(keras, layer, technique, "quantize")
        reason = _float_reason(keras, layer, configs, registry, own_configs)
        if reason:
            untouched.append(_layer_entry(layer, reason))
        else:
            own = own_configs or not layer.trainable_weights
            configs[layer.name] = _own_quantize_config(keras, layer) if own else None
    if not any(layer.trainable_weights for layer in model.layers if layer.name in configs):
        floats = ", ".join(f"{e['layer']} ({e['class']})" for e in untouched)
        raise ModelError(f"{technique}: no layer of this model with weights can be quantization-aware "
                         f"trained by tfmot 0.8.1 (float: {floats or 'none'}); use int8-fallback or "
                         f"dynamic (post-training) instead")
    _quantize_boundary_outputs(model, configs, untouched)
    return configs, untouched


def _quantize_boundary_outputs(model: Any, configs: dict[str, Any], untouched: list[dict]) -> None:
    """Give each float layer that feeds a quantized one an output-only config (its computation stays
    float, its output gets a fake-quant), so the next layer has an input range and converts to int8.

    Without it the converter folded Rescaling + Normalization into the next Conv2D and left that
    kernel float32. Not for layers fed by integer inputs: tfmot would quantize the integer input
    itself (TypeError in QuantizeLayer).
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_configs as quantize_configs)

    by_name = {layer.name: layer for layer in model.layers}
    for entry in untouched:
        layer = by_name[entry["layer"]]
        feeds = [node.outbound_layer.name for node in getattr(layer, "_outbound_nodes", [])]
        floats = all(d.is_floating for d in _input_dtypes(layer)) and layer.dtype.startswith("float")
        if not (floats and any(name in configs for name in feeds)):
            continue
        if _wrapper_can_shape(layer):
            configs[layer.name] = quantize_configs.Default8BitOutputQuantizeConfig()
            entry["reason"] += "; it runs in float and its output is quantized for the next layer"
            entry["output_quantized"] = True
        else:
            entry["reason"] += "; tfmot cannot wrap it to quantize its output either, so it runs in float"


def _wrapper_can_shape(layer: Any) -> bool:
    """Whether tfmot's QuantizeWrapper can build around `layer`: it asks the layer for its output
    shape from one input shape, which a layer of several call arguments (MultiHeadAttention's query
    and value) cannot answer ("compute_output_shape() missing ... 'value_shape'")."""
    try:
        layer.compute_output_shape(layer.input_shape)
    except (TypeError, NotImplementedError, ValueError, AttributeError):
        return False
    return True


def _precheck_qat(technique: str, model: Any, first_stage: str | None = None) -> None:
    """Refuse, naming the layer and before any fine-tuning, a model the QAT stage cannot handle.

    `first_stage` is "cluster" (cqat-int8) or "prune" (pqat-int8), whose QAT uses a collaborative scheme.
    """
    _, keras = import_tensorflow()
    import tensorflow_model_optimization as tfmot  # only after TF_USE_LEGACY_KERAS is set

    _check_model_structure(keras, model, technique)
    _plan_quantization(keras, model, technique, _qat_scheme(tfmot, first_stage).get_quantize_registry(),
                       own_configs=first_stage is None)


def _qat_scheme(tfmot: Any, first_stage: str | None) -> Any:
    """tfmot's 8-bit scheme, or its cluster- or sparsity-preserving one after a first stage."""
    combine = tfmot.experimental.combine
    default = tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()
    if first_stage is None:
        return default
    if first_stage == "cluster":
        scheme = combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=False)
    else:
        scheme = combine.Default8BitPrunePreserveQuantizeScheme()
    return _StrictScheme(scheme, default.get_quantize_registry())


class _StrictScheme:
    """A collaborative scheme whose registry supports only what tfmot's 8-bit registry supports.

    The cluster- and prune-preserving registries claim every layer without trainable weights
    (Normalization, Embedding's neighbours...), then fail in `get_quantize_config` ("called on an
    unsupported layer ... Normalization") when quantize_apply asks them to quantize the output of a
    float layer feeding a quantized one. quantize_apply only calls these two methods.
    """

    def __init__(self, scheme: Any, default_registry: Any) -> None:
        self._scheme, self._default = scheme, default_registry

    def get_layout_transformer(self) -> Any:
        return self._scheme.get_layout_transformer()

    def get_quantize_registry(self) -> Any:
        registry, default = self._scheme.get_quantize_registry(), self._default

        class Strict:
            def supports(self, layer: Any) -> bool:
                return registry.supports(layer) and default.supports(layer)

            def get_quantize_config(self, layer: Any) -> Any:
                return registry.get_quantize_config(layer)

        return Strict()


def _float_reason(keras: Any, layer: Any, annotated: dict, registry: Any, own_configs: bool) -> str | None:
    """Why QAT leaves `layer` float, or None when it quantizes it."""
    tf, _ = import_tensorflow()
    kind = type(layer).__name__
    if type(layer).__module__.startswith("tf_keras.src.layers.preprocessing"):
        return PREPROCESSING_REASON
    if isinstance(layer, keras.layers.Embedding):
        return "integer token lookup: tfmot has no quantize config for Embedding"
    integer = [d for d in _input_dtypes(layer) if d.is_integer]
    if integer:
        return f"integer input ({integer[0].name}): tfmot quantizes float tensors only"
    if isinstance(layer, keras.layers.BatchNormalization):
        inbound = _inbound_layers(layer)
        if (len(inbound) == 1 and inbound[0].name in annotated
                and type(inbound[0]).__name__ in FOLDS_BATCH_NORM
                and getattr(inbound[0], "activation", None) is keras.activations.linear):
            return None
        return ("BatchNormalization not right after a Conv2D, DepthwiseConv2D, SeparableConv2D or Dense "
                "without activation: tfmot only quantizes it folded into that layer")
    if isinstance(layer, (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)):
        return None  # tfmot's transforms split it into a depthwise and a 1x1 convolution
    if registry.supports(layer):
        return None
    if _own_quantize_config(keras, layer) is not None:
        if own_configs or not layer.trainable_weights:
            return None
        return (f"tfmot's cluster- and sparsity-preserving QAT has no {kind} quantizer; it stays "
                f"float")
    return f"tfmot 0.8.1 has no quantize config for {kind}"


def _own_quantize_config(keras: Any, layer: Any) -> Any:
    """QuantLab's QuantizeConfig for a layer tfmot's 8-bit registry lacks, or None.

    Both are tfmot's own classes (they serialize inside `quantize_scope()`). Conv1D gets the config
    tfmot gives Conv2D with per-axis disabled (its commented-out Conv1D entry): an 8-bit symmetric
    narrow-range LastValue kernel quantizer, per tensor, and an 8-bit MovingAverage activation.
    Per-channel is not possible: tfmot's per-channel quantizer handles 2-D and 4-D kernels only
    ("'reduce_dims' is used before assignment" on a 3-D Conv1D kernel). MaxPooling1D passes its
    quantized input through, like MaxPooling2D.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry as registry)

    if type(layer) is keras.layers.Conv1D:
        return registry.Default8BitQuantizeConfig(["kernel"], ["activation"], False)
    if type(layer) is keras.layers.MaxPooling1D:
        return registry.Default8BitQuantizeConfig([], [], False)
    return None


def _quantize_layers(run: "_Run", first_stage: str | None = None,
                     freeze: Iterable[str] = ()) -> tuple[Any, list[dict], list[dict]]:
    """The quantize-wrapped copy of `run.base`: supported layers fake-quantized, the rest float.

    `first_stage` ("cluster", "prune") picks the collaborative scheme (then no QuantLab configs);
    `freeze` names the first stage's layers: those that stay float, and those tfmot wraps without a
    weight quantizer (see _without_weight_quantizer), are made non-trainable so their clusters or
    zeros survive the QAT fine-tune. Returns (model, optimized_layers, untouched_layers).
    """
    q, keras, technique = run.tfmot.quantization.keras, run.keras, run.technique
    scheme = _qat_scheme(run.tfmot, first_stage)
    configs, untouched = _plan_quantization(keras, run.base, technique, scheme.get_quantize_registry(),
                                            own_configs=first_stage is None)
    by_name = {layer.name: layer for layer in run.base.layers}
    frozen = set(freeze) & {entry["layer"] for entry in untouched}  # float layers the first stage optimized
    for entry in untouched:
        if entry["layer"] in frozen and by_name[entry["layer"]].trainable_weights:
            by_name[entry["layer"]].trainable = False
            entry["reason"] += "; frozen during QAT so its clusters or zeros survive"

    def annotate(layer: Any) -> Any:
        if layer.name not in configs:
            return layer
        return q.quantize_annotate_layer(layer, configs[layer.name])

    _reserve_layer_names(run.base)
    with q.quantize_scope():
        annotated = keras.models.clone_model(run.base, clone_function=annotate)
        quantized = _wrap(technique, lambda: q.quantize_apply(annotated, scheme))
    held = _without_weight_quantizer(quantized, set(freeze) - frozen) if first_stage else set()
    for layer in quantized.layers:  # a QuantizeWrapper around a frozen layer would train it again
        if getattr(layer, "layer", layer).name in frozen | held:
            _hold(layer)
    boundary = {entry["layer"] for entry in untouched if entry.get("output_quantized")}
    optimized = [_layer_entry(by_name[name], HELD_REASON if name in held else None)
                 for name in configs if name not in boundary]
    return quantized, optimized, untouched


def _hold(layer: Any) -> None:
    """Make `layer` (a QuantizeWrapper or a plain layer) train nothing.

    tfmot's QuantizeWrapperV2 copies its layer's trainable weights into its own list and returns
    that list whatever `trainable` says, so they are taken out of it (in place: assigning a list of
    variables to a Keras layer's attribute tracks them as trainable again). They stay among the
    wrapper's weights through its layer's non-trainable ones. Measured: without this, a "frozen"
    squeeze-excite kernel lost all its zeros in one epoch.
    """
    layer.trainable = False
    inner = getattr(layer, "layer", None)
    own = getattr(layer, "_trainable_weights", None)
    if inner is None or not isinstance(own, list):
        return
    own[:] = [w for w in own if not any(w is v for v in inner.weights)]


HELD_REASON = ("tfmot fuses it with the ReLU after it and gives it no weight quantizer, so the "
               "collaborative QAT would train its clusters or zeros away; held (not trained) during QAT, "
               "the converter still makes its kernel int8")


def _without_weight_quantizer(quantized: Any, names: set[str]) -> set[str]:
    """The layers of `names` whose QuantizeWrapper quantizes no weight.

    tfmot's LayerReLUQuantize transform gives a Conv2D, DepthwiseConv2D or Dense followed directly by
    a ReLU (no batch norm between: MobileNetV3's squeeze-excite convolutions) a NoOpQuantizeConfig, so
    the cluster- or sparsity-preserving weight quantizer never applies to it. Measured on
    MobileNetV3Small: those kernels ended QAT with 96-573 distinct values per channel against 16, and
    0-15% zeros against 50%.
    """
    found = set()
    for layer in quantized.layers:
        inner, config = getattr(layer, "layer", None), getattr(layer, "quantize_config", None)
        if inner is not None and inner.name in names and config is not None \
                and not config.get_weights_and_quantizers(inner):
            found.add(inner.name)
    return found


def _after_qat(optimized: list[dict], base: Any, quantized: Any) -> dict[str, list[str]]:
    """{layer: [weight names]} of first-stage optimized layers, as named in the QAT model.

    tfmot's transforms split a SeparableConv2D into a DepthwiseConv2D and a new 1x1 Conv2D that
    holds its pointwise kernel; the i-th SeparableConv2D maps to the i-th new 1x1 Conv2D (the
    transform keeps the layer order; shapes are checked).
    """
    inner = [getattr(layer, "layer", layer) for layer in quantized.layers]
    known = {layer.name for layer in base.layers}
    pointwise = [layer for layer in inner if layer.name not in known and type(layer).__name__ == "Conv2D"]
    separable = [layer for layer in base.layers if type(layer).__name__ == "SeparableConv2D"]
    renamed = {}
    if len(pointwise) == len(separable):
        renamed = {old.name: new.name for old, new in zip(separable, pointwise)
                   if tuple(old.pointwise_kernel.shape) == tuple(new.kernel.shape)}
    selection = {}
    for entry in optimized:
        name, weights = entry["layer"], entry["weights"]
        if name in renamed:
            name, weights = renamed[name], ["kernel" if w == "pointwise_kernel" else w for w in weights]
        selection[name] = weights
    return selection


def _reserve_layer_names(model: Any) -> None:
    """Make Keras's automatic layer names skip the names already in `model`.

    tfmot's SeparableConv2D transform creates a DepthwiseConv2D and a Conv2D with automatic names
    ("conv2d", "conv2d_1", ... counted per process), and its ModelTransformer wires layers and copies
    weights by name. A model loaded from a file in a fresh process already holds a "conv2d", so the
    new 1x1 convolution took that name and tfmot connected layers to the wrong inputs ("Inputs have
    incompatible shapes (30, 30, 8) and (30, 30, 16)" on a mini-Xception loaded from .h5).
    """
    from tensorflow_model_optimization.python.core.keras import compat as tfmot_compat
    from tf_keras.src import backend

    for uids in (backend.get_default_graph_uid_map(), tfmot_compat.get_default_graph_uid_map()):
        for layer in model.layers:
            candidates = [(layer.name, 0)]
            prefix, _, suffix = layer.name.rpartition("_")
            if prefix and suffix.isdigit():
                candidates.append((prefix, int(suffix)))
            for name, number in candidates:
                uids[("", name)] = max(uids[("", name)], number + 1)


# --- pruning and clustering: wrap the layers tfmot can --------------------------------------------


def _wrap_layers(run: "_Run", action: str, wrap: Callable[[Any], Any],
                 skip: Callable[[Any], str | None] = lambda layer: None) -> tuple[Any, list[dict], list[dict]]:
    """`run.base` with `wrap(layer)` (prune_low_magnitude or cluster_weights) around each layer tfmot
    can `action`, the others as they are (also those `skip` gives a reason for). Returns (model,
    optimized_layers, untouched_layers); an optimized entry lists the weights tfmot optimizes (e.g.
    only the pointwise kernel of a SeparableConv2D)."""
    keras, technique = run.keras, run.technique
    optimized, untouched, wrappers = [], [], {}
    skipped = {layer.name: reason for layer in run.base.layers if (reason := skip(layer))}
    for layer in run.base.layers:
        if not isinstance(layer, keras.layers.InputLayer):
            _refuse_custom(keras, layer, technique, action)

    def clone(layer: Any) -> Any:
        if not layer.trainable_weights or not _wrappable(layer, action) or layer.name in skipped:
            return layer
        wrappers[layer.name] = _wrap(technique, lambda: wrap(layer))
        return wrappers[layer.name]

    wrapped = keras.models.clone_model(run.base, clone_function=clone)
    for layer in run.base.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        weights = _optimized_weights(wrappers[layer.name], action) if layer.name in wrappers else []
        if weights:
            optimized.append(_layer_entry(layer, weights=weights))
        elif layer.name in skipped:
            untouched.append(_layer_entry(layer, skipped[layer.name]))
        else:
            untouched.append(_layer_entry(layer, _untouched_reason(layer, action, layer.name in wrappers)))
    if not optimized:
        verb = {"prune": "prune", "cluster": "cluster"}[action]
        raise ModelError(f"{technique}: no layer of this model has weights tfmot can {verb} (it "
                         f"{verb}s Conv, Dense, Embedding and recurrent kernels)")
    return wrapped, optimized, untouched


def _too_few_weights(layer: Any, clusters: int, preserve_sparsity: bool) -> str | None:
    """Why a layer's kernel is too small to cluster, or None. tfmot's centroid initialisation fails
    ("Expected num_to_sample <= points.rows(). 9 vs 7") on a kernel with fewer values than clusters;
    with preserve_sparsity it clusters positive and negative weights apart, so it needs about twice
    as many non-zero values."""
    needed = 2 * clusters if preserve_sparsity else clusters
    for name in KERNEL_WEIGHT_NAMES:
        weight = getattr(layer, name, None)
        if weight is None or not hasattr(weight, "numpy"):
            continue
        values = weight.numpy()
        count = int(np.count_nonzero(values)) if preserve_sparsity else int(values.size)
        if count < needed:
            which = "non-zero values" if preserve_sparsity else "values"
            return (f"its {name} has {count} {which}, fewer than the {needed} that {clusters} "
                    f"clusters need{' with preserve_sparsity' if preserve_sparsity else ''}")
    return None


def _optimized_weights(wrapper: Any, action: str) -> list[str]:
    if action == "prune":
        return [_short_name(w) for w in wrapper.prunable_weights]
    return [_short_name(w) for w in getattr(wrapper, "original_clusterable_weights", {}).values()]


def _untouched_reason(layer: Any, action: str, wrapped: bool) -> str:
    kind = type(layer).__name__
    if not layer.trainable_weights:
        return "no trainable weights"
    if wrapped:
        return f"tfmot wraps {kind} but has no weights of it to {action}"
    if type(layer).__module__.startswith("tf_keras.src.layers.preprocessing"):
        return f"preprocessing layer: tfmot has no {action} config"
    return f"tfmot 0.8.1 has no {action} config for {kind}"


def _wrappable(layer: Any, action: str) -> bool:
    """Whether tfmot's `action` wrapper accepts `layer` (its registries, private modules pinned to 0.8.1)."""
    if action == "prune":
        from tensorflow_model_optimization.python.core.sparsity.keras import (prunable_layer,
                                                                               prune_registry)
        return (isinstance(layer, prunable_layer.PrunableLayer)
                or hasattr(layer, "get_prunable_weights")
                or prune_registry.PruneRegistry.supports(layer))
    from tensorflow_model_optimization.python.core.clustering.keras import (clusterable_layer,
                                                                            clustering_registry)
    return (isinstance(layer, clusterable_layer.ClusterableLayer)
            or clustering_registry.ClusteringRegistry.supports(layer))


def _wrap(technique: str, make: Callable[[], Any]) -> Any:
    """Run a tfmot wrapping call; its error (often many lines) becomes a one-line ModelError."""
    try:
        return make()
    except (ValueError, NotImplementedError, RuntimeError, TypeError) as error:
        raise ModelError(f"{technique}: tfmot could not wrap the model: {_first_line(error)}") from error


def _quantized_layer_names(model: Any) -> list[str]:
    return [layer.name for layer in model.layers if type(layer).__name__.startswith("QuantizeWrapper")]


# --- inputs -------------------------------------------------------------------------------------


def _label_output(model: Any, y: Any, technique: str) -> str | None:
    """The output the labels belong to: None for a one-output model; for several outputs, the one
    key of the labels dict ({output name: class ids}, as Keras takes targets)."""
    if len(model.outputs) == 1:
        return None
    names = list(model.output_names)
    if not isinstance(y, dict) or len(y) != 1 or next(iter(y)) not in names:
        raise DatasetError(f"{technique}: the model has {len(names)} outputs ({', '.join(names)}); give "
                           f"the labels as {{output name: class ids}} for the output they belong to")
    return next(iter(y))


def _output_index(model: Any, label_output: str | None) -> int:
    """Where the labelled output is among the model's outputs (tfmot may prefix wrapped names)."""
    if label_output is None:
        return 0
    names = list(model.output_names)
    for index, name in enumerate(names):
        if name == label_output or name.endswith(f"_{label_output}"):
            return index
    raise ModelError(f"the fine-tuned model has no output {label_output!r} (it has {', '.join(names)})")


def _output_name(model: Any, label_output: str) -> str:
    return list(model.output_names)[_output_index(model, label_output)]


def _samples(x: Any) -> int:
    return len(x[0]) if isinstance(x, list) else len(x)


def _labelled_arrays(model: Any, x: Any, y: Any, technique: str, split: str) -> tuple[Any, np.ndarray]:
    """Inputs in each model input's dtype (float32, or int32 token ids; a list for several inputs, in
    the model's input order) and int64 labels of the labelled output's shape; the caller's arrays
    are not modified."""
    if x is None or y is None:
        raise DatasetError(f"{technique}: the {split} split needs both inputs and labels")
    label_output = _label_output(model, y, technique)
    y = np.asarray(y[label_output] if label_output is not None else y)
    several = len(model.inputs) > 1
    if several != isinstance(x, (list, tuple)) or several and len(x) != len(model.inputs):
        raise DatasetError(f"{technique}: the model has {len(model.inputs)} input(s); give the {split} "
                           f"inputs as {'a list of ' + str(len(model.inputs)) + ' arrays' if several else 'one array'}")
    shapes = model.input_shape if several else [model.input_shape]
    arrays = [np.asarray(part, dtype=_dtype_of(tensor))
              for part, tensor in zip(x if several else [x], model.inputs)]
    for array, shape in zip(arrays, shapes):
        if len(array) == 0:
            raise DatasetError(f"{technique}: the {split} split is empty")
        if len(array) != len(y):
            raise DatasetError(f"{technique}: the {split} split has {len(array)} inputs but {len(y)} labels")
        expected = tuple(shape[1:])
        if len(expected) != array.ndim - 1 or any(e is not None and e != a
                                                  for e, a in zip(expected, array.shape[1:])):
            raise DatasetError(f"{technique}: {split} inputs have shape {array.shape[1:]}, the model "
                               f"expects {expected}")
    x = arrays if several else arrays[0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{technique}: {split} labels must be one integer class id per sample "
                           f"(not one-hot), got shape {y.shape} of {y.dtype}")
    output_shape = model.output_shape[_output_index(model, label_output)] if label_output else model.output_shape
    classes = output_shape[-1]
    if y.min() < 0 or (classes and y.max() >= classes):
        raise DatasetError(f"{technique}: {split} labels run from {y.min()} to {y.max()}, the model "
                           f"has {classes} outputs")
    return x, y.astype(np.int64)


def _dtype_of(tensor: Any) -> np.dtype:
    dtype = getattr(tensor, "dtype", None)
    return np.dtype(dtype.as_numpy_dtype) if dtype is not None and dtype.is_integer else np.dtype(np.float32)


def _outputs_logits(keras: Any, model: Any, label_output: str | None = None) -> bool:
    """Whether the (labelled) output is logits (the default) rather than softmax probabilities."""
    last = model.layers[-1] if label_output is None else model.get_layer(label_output)
    activation = getattr(last, "activation", None)
    return not (isinstance(last, keras.layers.Softmax)
                or getattr(activation, "__name__", "") == "softmax")


def _check_choice(technique: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise TechniqueError(f"{technique}: {name} must be one of {', '.join(choices)}, not {value!r}")


def _check_positive_int(technique: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise TechniqueError(f"{technique}: {name} must be a whole number >= 1, not {value!r}")


def _as_float(technique: str, name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TechniqueError(f"{technique}: {name} must be a number, not {value!r}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
