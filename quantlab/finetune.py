"""Fine-tune a trained tf_keras model with tensorflow-model-optimization (tfmot 0.8.1, tf_keras 2.21).

For when post-training quantization costs too much accuracy. Each function takes the trained baseline
and the train split, fine-tunes a *copy* (the caller's model is never touched) and returns a
`FineTuneResult`: a plain tf_keras model ready for `TFLiteConverter.from_keras_model` (the caller
converts) and JSON-serialisable stats.

- `quantization_aware_train` ("qat-int8"): `quantize_model`, fine-tune; the returned model is the
  quantize-wrapped one (fake-quant), which converts to int8 with `Optimize.DEFAULT`.
- `cluster` ("cluster"): `cluster_weights`, fine-tune, `strip_clustering`; every clustered kernel is
  checked to hold at most `number_of_clusters` distinct values.
- `prune` ("prune"): magnitude pruning to a target sparsity, fine-tune, `strip_pruning`; the sparsity
  actually reached is measured and a TechniqueError is raised when it is more than 1 point short.
- Collaborative optimization: `cluster_preserving_qat` ("cqat-int8"), `pruning_preserving_qat`
  ("pqat-int8") and `sparsity_preserving_cluster` ("prune-cluster"). All three work with these
  versions; `UNSUPPORTED` lists the ones that would not (none), see docs/tfmot-notes.md.

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
from typing import Any, Callable, Iterable

import numpy as np

from .errors import DatasetError, ModelError, TechniqueError
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


def measure_sparsity(model: Any, layers: Iterable[str] | None = None) -> dict:
    """Fraction of exact zeros in the kernels of each layer (biases excluded), or of `layers` only.

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


def count_unique_weights(model: Any, layers: Iterable[str] | None = None, *,
                         per_channel: bool = False) -> dict:
    """Number of distinct values in each layer's kernels: {layer: count} (the largest per layer).

    With `per_channel`, the largest count within one output channel (the kernel's last axis).
    """
    def count(v: np.ndarray) -> int:
        if not per_channel or v.ndim < 2:
            return int(np.unique(v).size)
        channels = v.reshape(-1, v.shape[-1])
        return max(int(np.unique(channels[:, c]).size) for c in range(channels.shape[1]))

    return {layer_name: max(count(v) for v in values) for layer_name, values in _kernels(model, layers)}


def _kernels(model: Any, only: Iterable[str] | None = None) -> list[tuple[str, list[np.ndarray]]]:
    """(layer name, [kernel values]) for each layer with kernel-like weights, nested models flattened.

    Matches weight names such as "conv2d/kernel:0" (also inside QAT wrappers), not
    "quant_conv2d/kernel_min:0". A wrapper (QAT, pruning, clustering) is named after its layer.
    """
    wanted = None if only is None else set(only)
    found = []
    for layer in getattr(model, "layers", []):
        if hasattr(layer, "layers") and not hasattr(layer, "layer"):  # a nested model
            found.extend(_kernels(layer, wanted))
            continue
        name = layer.layer.name if hasattr(layer, "layer") else layer.name
        if wanted is not None and name not in wanted:
            continue
        values = [w.numpy() for w in layer.weights
                  if w.name.split("/")[-1].split(":")[0] in KERNEL_WEIGHT_NAMES]
        if values:
            found.append((name, values))
    return found


# --- techniques ---------------------------------------------------------------------------------


def quantization_aware_train(model: Any, x_train: Any, y_train: Any, *, epochs: int = 1,
                             learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                             x_val: Any = None, y_val: Any = None,
                             on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Quantization-aware training ("qat-int8"): `quantize_model` on a copy, then fine-tune.

    The returned model keeps its quantize wrappers (fake-quant ops with learned ranges); convert it
    with `Optimize.DEFAULT` to get int8 weights and activations.
    """
    run = _Run("qat-int8", model, x_train, y_train, x_val, y_val, epochs, learning_rate, batch_size,
               seed, on_progress)
    tfmot = run.tfmot
    _check_layers(run.base, "qat-int8", "quantize")
    quantized = _wrap("qat-int8", lambda: tfmot.quantization.keras.quantize_model(run.base))
    fine_tune = run.fine_tune(quantized)
    stats = run.stats(fine_tune, quantized)
    stats["quantized_layers"] = _quantized_layer_names(quantized)
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
    _check_layers(run.base, technique, "cluster")
    init = {"linear": cl.CentroidInitialization.LINEAR,
            "kmeans++": cl.CentroidInitialization.KMEANS_PLUS_PLUS,
            "density-based": cl.CentroidInitialization.DENSITY_BASED,
            "random": cl.CentroidInitialization.RANDOM}[centroid_init]
    wrapped = _wrap(technique, lambda: cl.cluster_weights(
        run.base, number_of_clusters=int(number_of_clusters), cluster_centroids_init=init,
        preserve_sparsity=bool(preserve_sparsity)))
    # tfmot clusters Conv/Dense kernels; some supported layers (DepthwiseConv2D, BatchNormalization)
    # are left as they are.
    clustered_layers = [layer.layer.name for layer in wrapped.layers
                        if getattr(layer, "original_clusterable_weights", None)]
    if not clustered_layers:
        raise ModelError(f"{technique}: no layer of this model has weights tfmot can cluster "
                         f"(it clusters Conv and Dense kernels)")
    sparsity_before = measure_sparsity(run.base, clustered_layers)
    # Clustering alone (before fine-tuning) already moves every weight to a centroid.
    accuracy_clustered = _accuracy(wrapped, run.x_val, run.y_val)
    fine_tune = run.fine_tune(wrapped)
    stripped = cl.strip_clustering(wrapped)
    unique = count_unique_weights(stripped)
    _require_clusters(technique, unique, clustered_layers, int(number_of_clusters))
    sparsity = measure_sparsity(stripped, clustered_layers)
    if preserve_sparsity and sparsity["overall"] < sparsity_before["overall"] - SPARSITY_TOLERANCE:
        raise TechniqueError(f"{technique}: clustering with preserve_sparsity lowered the sparsity of "
                             f"the clustered kernels from {sparsity_before['overall']:.1%} to "
                             f"{sparsity['overall']:.1%}; this is a bug in tfmot, please report it")
    stats = run.stats(fine_tune, stripped)
    stats.update(accuracy_before_fine_tune=accuracy_clustered,
                 number_of_clusters=int(number_of_clusters), centroid_init=centroid_init,
                 preserve_sparsity=bool(preserve_sparsity), clustered_layers=clustered_layers,
                 unique_values=unique)
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
    _check_layers(run.base, "prune", "prune")
    pruning_schedule, schedule_stats = _pruning_schedule(sp, schedule, float(target_sparsity),
                                                         run.total_steps)
    wrapped = _wrap("prune", lambda: sp.prune_low_magnitude(run.base, pruning_schedule=pruning_schedule))
    # tfmot prunes Conv/Dense kernels; some supported layers (DepthwiseConv2D, BatchNormalization)
    # have no prunable weights. The target applies to the weights it prunes.
    pruned_layers = [layer.layer.name for layer in wrapped.layers
                     if getattr(layer, "prunable_weights", None)]
    if not pruned_layers:
        raise ModelError("prune: no layer of this model has weights tfmot can prune "
                         "(it prunes Conv and Dense kernels)")
    # UpdatePruningStep sets the step counter the schedule reads and re-applies the masks at the end
    # of every epoch; without it fit fails ("Prune() wrapper requires the UpdatePruningStep callback").
    fine_tune = run.fine_tune(wrapped, callbacks=[sp.UpdatePruningStep()])
    stripped = sp.strip_pruning(wrapped)
    sparsity = measure_sparsity(stripped, pruned_layers)
    _require_sparsity("prune", sparsity, float(target_sparsity))
    stats = run.stats(fine_tune, stripped)
    stats.update(target_sparsity=float(target_sparsity), schedule=schedule_stats,
                 pruned_layers=pruned_layers, sparsity=sparsity,
                 sparsity_all_kernels=measure_sparsity(stripped)["overall"])
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
    first = cluster(model, x_train, y_train, number_of_clusters=number_of_clusters,
                    centroid_init=centroid_init, epochs=cluster_epochs, learning_rate=learning_rate,
                    batch_size=batch_size, seed=seed, x_val=x_val, y_val=y_val,
                    on_progress=_part(on_progress, 1, 2))
    run = _Run("cqat-int8", first.model, x_train, y_train, x_val, y_val, epochs, learning_rate,
               batch_size, seed, _part(on_progress, 2, 2))
    q, combine = run.tfmot.quantization.keras, run.tfmot.experimental.combine
    _check_layers(run.base, "cqat-int8", "quantize")
    quantized = _wrap("cqat-int8", lambda: q.quantize_apply(
        q.quantize_annotate_model(run.base),
        combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=False)))
    fine_tune = run.fine_tune(quantized)
    # Drops the centroid, index and original-weight variables CQAT adds; keeps the quantize wrappers.
    stripped = combine.strip_clustering_cqat(quantized)
    # CQAT keeps a Conv2D's clusters per output channel when the channels hold about as many distinct
    # values each (it then trains one set of centroids per channel): the whole kernel may end with
    # up to k x channels values, each channel with at most k. Check what tfmot guarantees.
    unique = count_unique_weights(stripped)
    unique_per_channel = count_unique_weights(stripped, per_channel=True)
    _require_clusters("cqat-int8", unique_per_channel, first.stats["clustered_layers"],
                      int(number_of_clusters), "per output channel ")
    stats = run.stats(fine_tune, stripped)
    stats.update(accuracy_before=first.stats["accuracy_before"], stages={"cluster": first.stats},
                 number_of_clusters=int(number_of_clusters), centroid_init=centroid_init,
                 clustered_layers=first.stats["clustered_layers"], unique_values=unique,
                 unique_values_per_channel=unique_per_channel,
                 quantized_layers=_quantized_layer_names(stripped))
    return FineTuneResult(stripped, stats)


def pruning_preserving_qat(model: Any, x_train: Any, y_train: Any, *, target_sparsity: float = 0.5,
                           schedule: str = "constant", prune_epochs: int = 2, epochs: int = 1,
                           learning_rate: float = 1e-4, batch_size: int = 32, seed: int = 0,
                           x_val: Any = None, y_val: Any = None,
                           on_progress: ProgressFn | None = None) -> FineTuneResult:
    """Pruning-preserving QAT ("pqat-int8"): `prune`, then QAT with
    `Default8BitPrunePreserveQuantizeScheme`; the int8 kernels keep the sparsity (checked)."""
    _check_positive_int("pqat-int8", "epochs", epochs)
    first = prune(model, x_train, y_train, target_sparsity=target_sparsity, schedule=schedule,
                  epochs=prune_epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                  x_val=x_val, y_val=y_val, on_progress=_part(on_progress, 1, 2))
    run = _Run("pqat-int8", first.model, x_train, y_train, x_val, y_val, epochs, learning_rate,
               batch_size, seed, _part(on_progress, 2, 2))
    q, combine = run.tfmot.quantization.keras, run.tfmot.experimental.combine
    _check_layers(run.base, "pqat-int8", "quantize")
    quantized = _wrap("pqat-int8", lambda: q.quantize_apply(
        q.quantize_annotate_model(run.base), combine.Default8BitPrunePreserveQuantizeScheme()))
    fine_tune = run.fine_tune(quantized)
    sparsity = measure_sparsity(quantized, first.stats["pruned_layers"])
    _require_sparsity("pqat-int8", sparsity, float(target_sparsity))
    stats = run.stats(fine_tune, quantized)
    stats.update(accuracy_before=first.stats["accuracy_before"], stages={"prune": first.stats},
                 target_sparsity=float(target_sparsity), pruned_layers=first.stats["pruned_layers"],
                 sparsity=sparsity, quantized_layers=_quantized_layer_names(quantized))
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
    sparsity = measure_sparsity(second.model, first.stats["pruned_layers"])
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
        self.x, self.y = _labelled_arrays(model, x_train, y_train, technique, "train")
        self.x_val = self.y_val = None
        if x_val is not None or y_val is not None:
            self.x_val, self.y_val = _labelled_arrays(model, x_val, y_val, technique, "validation")
        self.from_logits = _outputs_logits(self.keras, model)
        self.on_progress = on_progress
        self.steps_per_epoch = math.ceil(len(self.x) / self.batch_size)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.keras.utils.set_random_seed(self.seed)
        self.base = _fresh_copy(self.keras, model)
        self.accuracy_before = _accuracy(self.base, self.x_val, self.y_val)

    def fine_tune(self, wrapped: Any, callbacks: list | None = None) -> dict:
        """Compile `wrapped` afresh and fit it on the train split with a seeded shuffle."""
        tf, keras = self.tf, self.keras
        keras.utils.set_random_seed(self.seed)
        wrapped.compile(optimizer=keras.optimizers.Adam(self.learning_rate),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits),
                        metrics=["accuracy"])
        data = (tf.data.Dataset.from_tensor_slices((self.x, self.y))
                .shuffle(len(self.x), seed=self.seed, reshuffle_each_iteration=True)
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
                "batch_size": self.batch_size, "seed": self.seed, "train_samples": len(self.x),
                "steps_per_epoch": self.steps_per_epoch, "steps": self.total_steps,
                "val_samples": None if self.x_val is None else len(self.x_val),
                "accuracy_before": self.accuracy_before,
                "accuracy_after": _accuracy(final_model, self.x_val, self.y_val), **fine_tune}


def _fresh_copy(keras: Any, model: Any) -> Any:
    """The model rebuilt from its config with a copy of its weights: new layer objects and variables,
    no optimizer or compile state, so tfmot's wrappers never reach the caller's layers."""
    try:
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
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


def _accuracy(model: Any, x: np.ndarray | None, y: np.ndarray | None) -> float | None:
    if x is None:
        return None
    logits = model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0)
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
    if len(model.outputs) != 1:
        raise ModelError(f"{technique}: fine-tuning needs a model with one class-score output, this one "
                         f"has {len(model.outputs)}")
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


def _check_layers(model: Any, technique: str, action: str) -> None:
    """Refuse, naming the layer, a layer tfmot cannot `action` (prune, cluster or quantize).

    Pruning and clustering ask tfmot's registries, as their wrappers do. Quantization refuses Lambda
    layers (tfmot skips them with a warning, then fails to clone the model) and custom layers (they
    need a QuantizeConfig); other built-in layers are left to quantize_model, whose transforms handle
    more than its registry lists (e.g. BatchNormalization folded into the preceding convolution).
    """
    _, keras = import_tensorflow()
    supported = _support_test(action)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or supported(layer):
            continue
        kind = type(layer).__name__
        if action == "quantize" and isinstance(layer, keras.layers.Lambda):
            raise ModelError(f"{technique}: layer {layer.name!r} is a Lambda layer, which tfmot cannot "
                             f"quantize (its computation cannot be inspected); replace it with built-in "
                             f"Keras layers")
        if action == "quantize":
            raise ModelError(f"{technique}: layer {layer.name!r} is a custom layer ({kind}) that tfmot "
                             f"cannot quantize without a QuantizeConfig; replace it with built-in "
                             f"Keras layers")
        what_to_do = {
            "prune": "replace it with built-in Keras layers, or give it a get_prunable_weights() "
                     "method (tfmot.sparsity.keras.PrunableLayer)",
            "cluster": "replace it with built-in Keras layers, or make it a "
                       "tfmot.clustering.keras.ClusterableLayer",
        }[action]
        raise ModelError(f"{technique}: layer {layer.name!r} ({kind}) is not supported by tfmot's "
                         f"{action} API; {what_to_do}")


def _support_test(action: str) -> Callable[[Any], bool]:
    # tfmot's own registries (private modules, pinned to 0.8.1): the checks its wrappers make.
    if action == "prune":
        from tensorflow_model_optimization.python.core.sparsity.keras import (prunable_layer,
                                                                               prune_registry)
        return lambda layer: (isinstance(layer, prunable_layer.PrunableLayer)
                              or hasattr(layer, "get_prunable_weights")
                              or prune_registry.PruneRegistry.supports(layer))
    if action == "cluster":
        from tensorflow_model_optimization.python.core.clustering.keras import (clusterable_layer,
                                                                                clustering_registry)
        return lambda layer: (isinstance(layer, clusterable_layer.ClusterableLayer)
                              or clustering_registry.ClusteringRegistry.supports(layer))
    _, keras = import_tensorflow()
    return lambda layer: (type(layer).__module__.startswith("tf_keras.")
                          and not isinstance(layer, keras.layers.Lambda))


def _wrap(technique: str, make: Callable[[], Any]) -> Any:
    """Run a tfmot wrapping call; its ValueError (often many lines) becomes a one-line ModelError."""
    try:
        return make()
    except (ValueError, NotImplementedError) as error:
        raise ModelError(f"{technique}: tfmot could not wrap the model: {_first_line(error)}") from error


def _quantized_layer_names(model: Any) -> list[str]:
    return [layer.name for layer in model.layers if type(layer).__name__.startswith("QuantizeWrapper")]


# --- inputs -------------------------------------------------------------------------------------


def _labelled_arrays(model: Any, x: Any, y: Any, technique: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 inputs and int64 labels of the model's shape; the caller's arrays are not modified."""
    if x is None or y is None:
        raise DatasetError(f"{technique}: the {split} split needs both inputs and labels")
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(x) == 0:
        raise DatasetError(f"{technique}: the {split} split is empty")
    if len(x) != len(y):
        raise DatasetError(f"{technique}: the {split} split has {len(x)} inputs but {len(y)} labels")
    expected = tuple(model.input_shape[1:])
    if len(expected) != x.ndim - 1 or any(e is not None and e != a for e, a in zip(expected, x.shape[1:])):
        raise DatasetError(f"{technique}: {split} inputs have shape {x.shape[1:]}, the model expects "
                           f"{expected}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{technique}: {split} labels must be one integer class id per sample "
                           f"(not one-hot), got shape {y.shape} of {y.dtype}")
    classes = model.output_shape[-1]
    if y.min() < 0 or (classes and y.max() >= classes):
        raise DatasetError(f"{technique}: {split} labels run from {y.min()} to {y.max()}, the model "
                           f"has {classes} outputs")
    return x, y.astype(np.int64)


def _outputs_logits(keras: Any, model: Any) -> bool:
    """Whether the output is logits (the default) rather than softmax probabilities."""
    last = model.layers[-1]
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
