"""Poisson subsampling as a `tf.data` pipeline with static shapes.

DP-SGD's usual privacy analysis (the one `compute_epsilon` performs) assumes each step's batch is
a Poisson sample: every example joins independently with probability q, so the batch size varies.
Many libraries instead shuffle and cut fixed-size batches while accounting as if Poisson; that is
a different mechanism whose true ε can be larger. `poisson_batches` samples as the analysis
assumes, then pads each batch to `max_batch_size` and returns a 0/1 mask as the sample weight,
so the compiled training step sees one shape and never retraces.

Which examples join a step is as secret as the noise: the sample is drawn from ChaCha20 keyed by
a 256-bit key from the operating system (`prng`), unless an explicit `seed` asks for a
reproducible (and therefore not private against whoever knows the seed) stream. The data held
in memory is checked first (`checks.check_finite`): a NaN/inf example raises before any step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from scipy import stats

from dp_bitfit_keras.privacy import checks, prng


def max_batch_size_for(num_examples: int, sampling_rate: float, overflow_probability: float = 1e-9) -> int:
    """Smallest padded size that one step's Poisson batch exceeds with probability at most
    `overflow_probability` (binomial quantile)."""
    return int(stats.binom.ppf(1.0 - overflow_probability, num_examples, sampling_rate)) + 1


@dataclasses.dataclass
class PoissonSampler:
    """The state of a Poisson batch stream: step t's batch is drawn from the stream (key, t).

    `step` counts dataset elements drawn (micro-batches); element `c` is part `c % micro_batches`
    of logical batch `c // micro_batches`. It is a `tf.Variable`: `DPModel.fit` sets it from
    the optimizer's restored ledger on resume, so no batch is replayed or skipped. The key is
    held by the dataset's graph only; `seed` is the explicit seed, if one was given.
    """

    num_examples: int  # units: examples, or users at user level
    sampling_rate: float
    max_batch_size: int
    steps_per_epoch: int
    seed: int | None
    step: tf.Variable
    micro_batches: int = 1
    examples: object = dataclasses.field(default=None, repr=False)  # the held data (label checks)
    unit: str = "example"  # what is sampled and protected: "example" or "user"
    examples_per_unit: int = 1  # at most this many rows of one unit per batch (each clipped at C/k)

    @property
    def expected_batch_size(self) -> float:
        """Expected units per batch: examples, or users at user level."""
        return self.num_examples * self.sampling_rate


def _materialize(data):
    """Stacks a finite dataset of examples (or passes arrays through) into tensors."""
    if isinstance(data, tf.data.Dataset):
        n = int(data.cardinality())
        if n < 0:
            raise ValueError(
                "poisson_batches needs a finite dataset of single examples with known length; "
                "got an infinite or unknown-length dataset. Use `.take(n)` or "
                "`tf.data.experimental.assert_cardinality(n)`."
            )
        if n == 0:
            raise ValueError("poisson_batches got an empty dataset.")
        return data.batch(n).get_single_element()
    return tf.nest.map_structure(tf.convert_to_tensor, data)


def poisson_batches(
    dataset,
    sampling_rate: float,
    max_batch_size: int | None = None,
    *,
    steps_per_epoch: int | None = None,
    seed: int | None = None,
    overflow_probability: float = 1e-9,
    micro_batches: int = 1,
    user_ids=None,
    max_examples_per_user: int | None = None,
) -> tf.data.Dataset:
    """Poisson-sampled logical batches, padded to a static size, with a per-example mask.

    Args:
        dataset: a finite `tf.data.Dataset` of single examples (`(x, y)` or
            `(x, y, sample_weight)`, dicts allowed), or a tuple of arrays with the examples on
            the first axis. It is held in memory. Sample weights are `[n]` or per token
            `[n, T]`; the batches carry them times the padding mask.
        sampling_rate: q, the probability that an example joins a given step's batch
            (expected batch size / number of examples).
        max_batch_size: the padded size. A step whose sample is larger raises an
            `InvalidArgumentError` (never a silent truncation, which would change the mechanism).
            `None`: the binomial quantile at which an overflow has probability
            `overflow_probability`.
        steps_per_epoch: batches per pass of `fit`; default `round(1/q)` (each example seen once
            per epoch in expectation).
        seed: `None` (default): a secret key from the operating system, which no global seed
            (`keras.utils.set_random_seed`) reproduces. An int makes the batches reproducible
            and warns (`PredictableNoiseWarning`): whoever knows it knows every batch.
        micro_batches: split each logical (Poisson) batch into this many consecutive
            elements of `max_batch_size / micro_batches` rows (rounded up), for gradient
            accumulation (`DPOptimizer(gradient_accumulation_steps=...)`).
        user_ids: `[n]` ids (any hashable values): **user-level** sampling. Users are
            Poisson-sampled (q over users; `num_examples` and the expected batch then count
            users) and a sampled user brings their first `max_examples_per_user` rows (in data
            order); `DPModel.fit` then clips each row at C/k, so a user's whole contribution has
            norm ≤ C and ε protects each user. See the threat model guide for choosing the unit.
        max_examples_per_user: k, required with `user_ids`; rows beyond a user's first k are
            never used.

    Raises:
        ValueError: a float value of the data is NaN or inf (the first such row is named).

    Returns:
        A dataset of `(x, y, mask)` with leading axis `max_batch_size` (divided by
        `micro_batches`); padding rows repeat the first example with mask 0. Its `dp_sampler`
        attribute holds the `PoissonSampler`.

    Example:
        >>> ds = poisson_batches((np.zeros((100, 3)), np.zeros(100)), 0.1, seed=0)
        >>> x, y, mask = next(iter(ds))
        >>> x.shape[0] == ds.dp_sampler.max_batch_size
        True
    """
    examples = _materialize(dataset)
    checks.check_finite(examples, "data")
    return poisson_batches_from_tensors(
        examples,
        sampling_rate,
        max_batch_size,
        steps_per_epoch=steps_per_epoch,
        seed=seed,
        overflow_probability=overflow_probability,
        micro_batches=micro_batches,
        user_ids=user_ids,
        max_examples_per_user=max_examples_per_user,
    )


def user_index(user_ids, max_examples_per_user):
    """(user of each row as 0 … U − 1, whether the row is among its user's first k, U)."""
    users, rank, count = user_ranks(user_ids, max_examples_per_user)
    return users, rank < max_examples_per_user, count


def user_ranks(user_ids, max_examples_per_user):
    """(user of each row as 0 … U − 1 in id order, the row's rank among its user's rows in data
    order, U), after checking `user_ids` and k."""
    if not (isinstance(max_examples_per_user, int) and max_examples_per_user >= 1):
        raise ValueError(
            "User-level sampling needs max_examples_per_user=k (an int >= 1): each row is clipped at "
            f"C/k so that a user's k rows together have norm <= C; got {max_examples_per_user!r}."
        )
    ids = np.asarray(user_ids)
    if ids.ndim != 1:
        raise ValueError(f"user_ids must be one id per example ([n]); got shape {ids.shape}.")
    _, users = np.unique(ids, return_inverse=True)
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(users)
    rank[order] = np.arange(users.size) - np.repeat(starts, counts)
    return users.astype(np.int32), rank, int(counts.size)


def poisson_batches_from_tensors(
    examples,
    sampling_rate,
    max_batch_size=None,
    *,
    steps_per_epoch=None,
    seed=None,
    overflow_probability=1e-9,
    micro_batches=1,
    key=None,
    user_ids=None,
    max_examples_per_user=None,
):
    """`poisson_batches` of tensors already in memory and already checked (`DPModel.fit` checks
    its arrays itself, naming them `x` and `y`). `key`: the sampling key itself (workers of one
    run share one; see `dp_bitfit_keras.distribute`), else from `seed` or the OS."""
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}.")
    flat = tf.nest.flatten(examples)
    n = int(flat[0].shape[0])
    if any(int(t.shape[0]) != n for t in flat):
        raise ValueError(f"All arrays must have the same number of examples; got {[t.shape[0] for t in flat]}.")
    units, per_unit, users, eligible = n, 1, None, None
    if user_ids is not None:
        if len(user_ids) != n:
            raise ValueError(f"user_ids has {len(user_ids)} entries for {n} examples.")
        users, eligible, units = user_index(user_ids, max_examples_per_user)
        per_unit = int(max_examples_per_user)
        users, eligible = tf.constant(users), tf.constant(eligible)
    elif max_examples_per_user is not None:
        raise ValueError("max_examples_per_user is for user-level sampling: give user_ids too.")
    if max_batch_size is None:
        max_batch_size = max_batch_size_for(units, sampling_rate, overflow_probability) * per_unit
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
    if not (isinstance(micro_batches, int) and micro_batches >= 1):
        raise ValueError(f"micro_batches must be an int >= 1; got {micro_batches!r}.")
    max_batch_size = -(-int(max_batch_size) // micro_batches) * micro_batches
    part = max_batch_size // micro_batches
    steps_per_epoch = steps_per_epoch or max(1, round(1.0 / sampling_rate))
    seed = None if seed is None else int(seed)
    key = tf.constant(prng.key_for(seed, "sampling") if key is None else key, tf.int64)
    sampler = PoissonSampler(
        num_examples=units,
        sampling_rate=float(sampling_rate),
        max_batch_size=int(max_batch_size),
        steps_per_epoch=int(steps_per_epoch),
        seed=seed,
        step=tf.Variable(0, dtype=tf.int64, trainable=False, name="poisson_step"),
        micro_batches=micro_batches,
        examples=examples,
        unit="example" if users is None else "user",
        examples_per_unit=per_unit,
    )

    def draw(_):
        element = sampler.step.assign_add(1) - 1
        step, part_index = element // micro_batches, element % micro_batches
        keep = prng.uniform(key, [units], step, prng.POISSON_SAMPLE) < sampling_rate
        if users is not None:
            keep = tf.logical_and(tf.gather(keep, users), eligible)
        indices = tf.cast(tf.where(keep)[:, 0], tf.int32)
        size = tf.size(indices)
        check = tf.debugging.assert_less_equal(
            size,
            max_batch_size,
            message=(
                f"A Poisson batch exceeded max_batch_size={max_batch_size} (n={n}, q={sampling_rate}). "
                "Truncating it would break the privacy analysis: raise max_batch_size."
            ),
        )
        with tf.control_dependencies([check]):
            padded = tf.pad(indices, [[0, max_batch_size - size]])
        mask = tf.cast(tf.range(max_batch_size) < size, tf.float32)
        rows = tf.range(part) + tf.cast(part_index, tf.int32) * part
        padded, mask = tf.gather(padded, rows), tf.gather(mask, rows)
        batch = tf.nest.map_structure(lambda t: tf.gather(t, padded), examples)
        if isinstance(batch, tuple) and len(batch) == 2:
            return batch[0], batch[1], mask
        if isinstance(batch, tuple) and len(batch) == 3:  # (x, y, sample_weight): [n] or per token [n, T]
            weights = tf.cast(batch[2], tf.float32)
            return batch[0], batch[1], weights * tf.reshape(mask, [-1] + [1] * (len(weights.shape) - 1))
        return batch, mask

    # The step counter is shared state: keep the map sequential so steps are drawn in order.
    ds = tf.data.Dataset.range(steps_per_epoch * micro_batches).map(draw)
    ds = ds.prefetch(2)
    ds.dp_sampler = sampler
    return ds


__all__ = ["PoissonSampler", "max_batch_size_for", "poisson_batches"]
