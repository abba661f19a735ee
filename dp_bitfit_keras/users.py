"""User-level privacy by the clipped sum of each user's gradient: users packed as examples.

`DPModel.fit(x, y, user_ids=u, max_examples_per_user=k)` clips every row at C/k (any gradient
path, no change to the model). This module offers the other construction: each user's rows are
packed into one example (`pack_users`: `[users, k, ...]` arrays and `[users, k]` weights), a
`PerUserModel` runs the wrapped model on the k rows of each user, and the user's loss is the
weighted mean of their rows' losses (`DPModel`'s per-token weights), so **the gradient of the
user's whole contribution is clipped once at C**. Users are then Poisson-sampled as examples
are, ε is accounted per user (`optimizer.privacy_unit == "user"`), and it works under
`tf.distribute` strategies as example-level training does. Per-user gradients come from
`tf.vectorized_map` (book-keeping attributes rows, not users: it is not used).

    >>> import numpy as np, keras
    >>> x, y = np.random.rand(12, 4).astype("float32"), np.arange(12) % 2
    >>> xu, yu, wu = pack_users(x, y, user_ids=np.arange(12) // 3, max_examples_per_user=3)
    >>> xu.shape, yu.shape, wu.shape
    ((4, 3, 4), (4, 3), (4, 3))
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from dp_bitfit_keras.privacy import sampling


def pack_users(x, y, user_ids, max_examples_per_user: int, sample_weight=None):
    """Rows grouped by user: `(x_users, y_users, weights)`, each `[users, k, ...]`.

    A user's first k rows in data order (rows past them are dropped, as at row level), zero
    rows where a user has fewer (weight 0: they add nothing to the user's loss). `weights` is
    `[users, k]`: 1 for a real row (times `sample_weight`, `[n]`, if given). Users are ordered by
    their id (`np.unique`).

    Args:
        x, y: arrays (x may be a dict of arrays, keras-hub inputs) with n rows.
        user_ids: `[n]` ids, any hashable values.
        max_examples_per_user: k, the rows kept per user.
        sample_weight: optional `[n]` row weights.
    """
    users, rank, count = sampling.user_ranks(user_ids, max_examples_per_user)
    k = int(max_examples_per_user)
    n = len(users)
    rows = np.flatnonzero(rank < k)
    slot = (users[rows], rank[rows])

    def pack(a):
        a = np.asarray(a)
        if a.shape[0] != n:
            raise ValueError(f"pack_users: an array has {a.shape[0]} rows for {n} user_ids.")
        out = np.zeros((count, k, *a.shape[1:]), a.dtype)
        out[slot] = a[rows]
        return out

    weights = np.zeros((count, k), np.float32)
    weights[slot] = 1.0 if sample_weight is None else np.asarray(sample_weight, np.float32)[rows]
    return tf.nest.map_structure(pack, x), pack(y), weights


@keras.saving.register_keras_serializable(package="dp_bitfit_keras")
class PerUserModel(keras.Model):
    """Runs `model` on each user's k rows: inputs `[users, k, ...]`, outputs `[users, k, ...]`.

    Wrap it in a `DPModel` and fit it on `pack_users` arrays (with their weights as
    `sample_weight`): each user is one example, clipped as a whole at C, and the ledger accounts
    per user. The wrapped model keeps its own weights: evaluate, predict with and export it (the
    row-level model) after training.
    """

    def __init__(self, model, rows_per_user: int, **kwargs):
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        if not (isinstance(rows_per_user, int) and rows_per_user >= 1):
            raise ValueError(f"rows_per_user must be an int >= 1; got {rows_per_user!r}.")
        kwargs.setdefault("name", f"per_user_{model.name}")
        super().__init__(**kwargs)
        self.model = model
        self.rows_per_user = rows_per_user
        self.built = model.built

    def call(self, inputs, training=False):
        k = self.rows_per_user
        rows = tf.nest.map_structure(lambda t: keras.ops.reshape(t, (-1, *t.shape[2:])), inputs)
        outputs = self.model(rows, training=training)
        return tf.nest.map_structure(lambda t: keras.ops.reshape(t, (-1, k, *t.shape[1:])), outputs)

    def get_config(self):
        return {
            "model": keras.saving.serialize_keras_object(self.model),
            "rows_per_user": self.rows_per_user,
            "name": self.name,
        }


__all__ = ["PerUserModel", "pack_users"]
