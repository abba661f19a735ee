"""Input checks before any step: one broken example must neither destroy a run nor reveal itself.

A NaN or inf feature, or a class label the model cannot output, makes that example's gradient
non-finite; summed into a step it would turn every trained weight into NaN exactly when the
example is sampled, so the released model would disclose its membership. `DPModel.fit` and
`poisson_batches` therefore check the data they hold in memory and raise a `ValueError` naming
the first offending example before anything is trained. (Inside the step, an example whose
gradient is still not finite gets weight 0: `privacy.clipping.clipped_sum`.)
"""

from __future__ import annotations

import numpy as np


def _leaves(structure, path=""):
    """(path, array) for every array of a nest of dicts / lists / tuples."""
    if isinstance(structure, dict):
        for key in sorted(structure, key=str):
            yield from _leaves(structure[key], f"{path}[{key!r}]")
    elif isinstance(structure, (list, tuple)):
        for i, item in enumerate(structure):
            yield from _leaves(item, f"{path}[{i}]")
    elif structure is not None:
        yield path, structure


def _numpy(array):
    return array.numpy() if hasattr(array, "numpy") else np.asarray(array)


def _first_bad(bad: np.ndarray):
    """(row, column tuple) of the first True entry, in row-major order."""
    index = np.unravel_index(int(np.argmax(bad.reshape(-1))), bad.shape)
    return int(index[0]), tuple(int(i) for i in index[1:])


def _where(name, row, column):
    return f"{name}, row {row}" + (f", column {column if len(column) > 1 else column[0]}" if column else "")


def check_finite(structure, name: str = "x") -> None:
    """Raises a `ValueError` naming the first row (and column) with a NaN or inf float value."""
    for path, array in _leaves(structure):
        values = _numpy(array)
        if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating)):
            continue
        bad = ~np.isfinite(values)
        if values.ndim == 0 or not bad.any():
            continue
        row, column = _first_bad(bad)
        raise ValueError(
            f"{_where(name + path, row, column)} is {values[(row, *column)]}: DP training needs every "
            f"value finite ({int(bad.reshape(len(bad), -1).any(axis=1).sum())} example(s) are not). One "
            "such example would turn the trained weights into NaN in the step that samples it, revealing "
            "that it was sampled. Fix or remove these rows before training."
        )


def check_labels(y, num_outputs: int | None, loss=None, name: str = "y") -> None:
    """Raises a `ValueError` if integer labels fall outside the model's `num_outputs` classes,
    or one-hot (float, last axis > 1) labels do not have the output's width.

    `num_outputs`: the size of the model output's last axis (None: unknown, nothing checked).
    With a single output, integer labels are checked to be 0 or 1 only for a binary
    cross-entropy `loss` (a regression may have integer targets).
    """
    if num_outputs is None or y is None or isinstance(y, (dict, list, tuple)):
        return
    labels = _numpy(y)
    if labels.ndim == 0:
        return
    if np.issubdtype(labels.dtype, np.integer):
        if num_outputs == 1 and "binary" not in _loss_name(loss):
            return
        high = max(int(num_outputs), 2)
        bad = (labels < 0) | (labels >= high)
        if bad.any():
            row, column = _first_bad(bad)
            raise ValueError(
                f"{_where(name, row, column)} is the label {labels[(row, *column)]}, outside the model's "
                f"{num_outputs} output(s): integer labels must be in [0, {high}). Such an example makes a NaN "
                "loss that would reveal it when sampled. Fix the labels or the model's number of classes."
            )
    elif np.issubdtype(labels.dtype, np.floating) and labels.ndim >= 2 and labels.shape[-1] > 1:
        if labels.shape[-1] != num_outputs:
            raise ValueError(
                f"{name} has one-hot labels of width {labels.shape[-1]} but the model has {num_outputs} "
                "output(s): give labels as wide as the output (or integer class ids)."
            )


def _loss_name(loss) -> str:
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return str(name).lower()


def output_width(model, x) -> int | None:
    """The size of the last axis of `model`'s (single) output, or None if it cannot be told."""
    import keras

    outputs = getattr(model, "outputs", None)
    try:
        if outputs and len(outputs) == 1 and outputs[0].shape[-1] is not None:
            return int(outputs[0].shape[-1])
        first = keras.tree.map_structure(lambda t: t[:1], x)
        spec = model.compute_output_spec(first)
        if isinstance(spec, keras.KerasTensor) and len(spec.shape) >= 1 and spec.shape[-1] is not None:
            return int(spec.shape[-1])
    except Exception:  # noqa: BLE001 - a model whose output cannot be inferred: skip the label check
        return None
    return None


__all__ = ["check_finite", "check_labels", "output_width"]


def sample_weights(sample_weight, class_weight, y, num_examples: int):
    """The per-example (or per-token) weights of a `fit` on arrays, checked: `sample_weight`
    (`[n]` or `[n, T]`, finite, ≥ 0) times `class_weight[y_i]` (integer class labels); None if
    neither is given. Weights scale an example's loss before clipping: the clip still bounds
    each example, so any weights keep the guarantee."""
    weights = None
    if sample_weight is not None:
        weights = np.asarray(_numpy(sample_weight), np.float32)
        if weights.ndim not in (1, 2) or weights.shape[0] != num_examples:
            raise ValueError(
                f"sample_weight must be [n] or per token [n, T] with n = {num_examples}; got shape {weights.shape}."
            )
        check_finite(weights, "sample_weight")
        if (weights < 0).any():
            raise ValueError(
                f"sample_weight must be >= 0; {_where('sample_weight', *_first_bad(weights < 0))} is negative."
            )
    if class_weight is not None:
        if not isinstance(class_weight, dict) or not class_weight:
            raise ValueError(f"class_weight must be a dict {{class index: weight}}; got {class_weight!r}.")
        labels = np.asarray(_numpy(y))
        if labels.ndim > 1 and labels.shape[-1] == 1:
            labels = labels.reshape(labels.shape[:-1])
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                "class_weight needs integer class labels, one per example (y of shape [n]); got "
                f"{labels.dtype} labels of shape {labels.shape}. Fold the weights into sample_weight instead."
            )
        table = np.ones(int(max(max(class_weight), labels.max())) + 1, np.float32)
        for label, value in class_weight.items():
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"class_weight[{label}] must be finite and >= 0; got {value}.")
            table[int(label)] = value
        per_class = table[labels]
        weights = per_class if weights is None else weights * per_class.reshape((-1,) + (1,) * (weights.ndim - 1))
    return weights
