"""Per-example clipping: the norms, the clip factors and the clipped sum every method shares.

Vectorized over the batch (TF Privacy's `preprocess_record` inside `vectorized_map` falls back to
a slow while_loop). Every clipping style bounds an example's whole clipped gradient by C, so the
sensitivity of the sum, and with it the noise and ε, are the same for all of them. Adaptive
clipping moves C between steps from a noisy count of the unclipped examples: the count is here,
its noise and the update of C are TF Privacy's quantile query (`queries`).
"""

from __future__ import annotations

import re

import tensorflow as tf

CLIPPING = ("abadi", "automatic")
# Stability constant of automatic clipping (Bu et al., "Automatic clipping", and DP-BiTFiT code).
AUTOMATIC_CLIPPING_GAMMA = 0.01
# What one clip covers (DP-BiTFiT paper §3).
CLIPPING_STYLES = ("all_layer", "layer_wise", "param_wise", "group_wise")


def group_index(clipping_style, groups, variables):
    """Group index of each variable for the clipping style (None: one group).

    `groups` (for `"group_wise"`): regular expressions (a variable joins the first group whose
    pattern `re.search`es its path; the rest form one more group) or a callable
    `variable -> hashable key`.
    """
    if clipping_style == "all_layer":
        return None
    if clipping_style == "param_wise":
        keys = list(range(len(variables)))
    elif clipping_style == "layer_wise":
        keys = [getattr(v, "path", v.name).rsplit("/", 1)[0] for v in variables]
    elif callable(groups):
        keys = [groups(v) for v in variables]
    else:
        keys = [
            next((i for i, p in enumerate(groups) if re.search(p, getattr(v, "path", v.name))), len(groups))
            for v in variables
        ]
    order = {}
    return [order.setdefault(k, len(order)) for k in keys]


def squared_norms(per_example_grads):
    """Each variable's per-example squared L2 norm: a list of `[batch]` float32 tensors."""
    return [
        tf.reduce_sum(tf.reshape(tf.square(tf.cast(g, tf.float32)), [tf.shape(g)[0], -1]), axis=1)
        for g in per_example_grads
    ]


def per_example_norms(per_example_grads):
    """Global L2 norm of each example's gradient over all variables: `[batch]`, in float32."""
    return tf.sqrt(tf.add_n(squared_norms(per_example_grads)))


def clip_factors(norms, l2_norm_clip, clipping="abadi"):
    """Per-example scale so that each clipped gradient has norm ≤ `l2_norm_clip`.

    `"abadi"`: min(1, C/‖g‖). `"automatic"`: C/(‖g‖ + 0.01), always rescaling (Bu et al.).
    """
    if clipping == "abadi":
        return tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
    if clipping == "automatic":
        return l2_norm_clip / (norms + AUTOMATIC_CLIPPING_GAMMA)
    raise ValueError(f"clipping must be one of {CLIPPING}; got {clipping!r}.")


def group_norms(per_example_grads, groups, num_groups):
    """Per-example L2 norm of each group of variables: `[batch, num_groups]`, in float32.

    `groups[j]` is the group index of variable j.
    """
    return _group_norms_of(squared_norms(per_example_grads), groups, num_groups)


def _group_norms_of(squared, groups, num_groups):
    per_group = [tf.add_n([sq for sq, k in zip(squared, groups) if k == group]) for group in range(num_groups)]
    return tf.sqrt(tf.stack(per_group, axis=1))


def clip_weights(squared_norms, l2_norm_clip, clipping="abadi", mask=None, groups=None):
    """Every example's clip factor, from each variable's per-example squared norms.

    Returns `(factors [batch, G], index, norms [batch], finite [batch])`: variable j's clipped
    sum is Σ_i factors[i, index[j]] · g_ij over the examples with `finite`; `norms` are the
    global norms before clipping. Factors are 0 for masked rows (padding) and for examples
    whose norm is not finite (see `clipped_sum`). `groups`: as in `clipped_sum`.
    """
    if groups is None:
        norms = tf.sqrt(tf.add_n(list(squared_norms)))
        factors = clip_factors(norms, l2_norm_clip, clipping)[:, None]
        index = [0] * len(squared_norms)
    else:
        num_groups = max(groups) + 1
        by_group = _group_norms_of(squared_norms, groups, num_groups)
        norms = tf.sqrt(tf.reduce_sum(tf.square(by_group), axis=1))
        factors = clip_factors(by_group, l2_norm_clip / tf.sqrt(float(num_groups)), clipping)
        index = list(groups)
    if mask is not None:
        factors = factors * tf.cast(tf.reshape(mask, [-1, 1]), factors.dtype)
    # A non-finite entry makes the example's norm inf or NaN (so does a finite gradient whose
    # squares overflow: dropping it is as private as clipping it).
    finite = tf.math.is_finite(norms)
    factors = tf.where(finite[:, None], factors, 0.0)
    return factors, index, norms, finite


def kept_rows(t, keep):
    """`t` `[batch, ...]` with the rows of the examples not kept set to 0 (0·NaN would be NaN)."""
    return tf.where(tf.reshape(keep, [-1] + [1] * (len(t.shape) - 1)), t, tf.zeros_like(t))


def clipped_sum(per_example_grads, l2_norm_clip, clipping="abadi", mask=None, groups=None):
    """Σ_i mask_i · clip(g_i), per variable, and the per-example global norms before clipping.

    `groups`: None (all-layer clipping: one norm over all variables, bound C), or the group
    index of each variable; each group is then clipped to C/√G on its own (G groups), so an
    example's whole clipped gradient still has norm ≤ C (layer-, param- and group-wise
    clipping of the DP-BiTFiT paper, §3).

    An example whose gradient is not finite (a NaN/inf feature that slipped past the input
    checks, a loss that overflows, float16 overflow) gets weight 0 instead of turning the sum,
    and then every weight, into NaN, which would both lose the run and reveal that the example
    was sampled. Privacy: whether an example is dropped depends on that example alone (and the
    current weights, which are public to the step), so adding or removing one example still
    changes the sum by at most its clipped contribution, ≤ C: the sensitivity is unchanged.

    Example:
        >>> grads = [tf.constant([[3.0, 4.0], [0.3, 0.4]])]   # norms 5 and 0.5
        >>> sums, norms = clipped_sum(grads, 1.0)
        >>> [round(float(v), 3) for v in sums[0]]            # (0.6, 0.8) + (0.3, 0.4)
        [0.9, 1.2]
    """
    factors, index, norms, finite = clip_weights(squared_norms(per_example_grads), l2_norm_clip, clipping, mask, groups)
    per_example_grads = [kept_rows(g, finite) for g in per_example_grads]
    sums = [
        tf.cast(tf.tensordot(factors[:, k], tf.cast(g, tf.float32), axes=[[0], [0]]), g.dtype)
        for g, k in zip(per_example_grads, index)
    ]
    return sums, norms


def unclipped_count_minus_half(norms, l2_norm_clip, mask=None):
    """Adaptive clipping's count query (Andrew et al. 2021): Σ over the real examples of
    1[‖g‖ ≤ C] − ½. Each example moves it by ½ at most (its sensitivity); the noised count moves
    C towards the target quantile of the norms (`queries.SeededQuantileAdaptiveClipSumQuery`)."""
    real = tf.ones_like(norms) if mask is None else tf.cast(tf.reshape(mask, [-1]) > 0, tf.float32)
    return tf.reduce_sum(real * (tf.cast(norms <= l2_norm_clip, tf.float32) - 0.5))
