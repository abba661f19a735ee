import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

import dp_bitfit_keras as dpk


def _data(n=400):
    return np.arange(n, dtype=np.float32)[:, None], np.arange(n, dtype=np.int32)


def test_batches_are_poisson_samples():
    n, q = 400, 0.05
    ds = dpk.poisson_batches(_data(n), q, steps_per_epoch=400, seed=3)
    counts = np.zeros(n)
    sizes = []
    for x, y, mask in ds:
        assert x.shape[0] == ds.dp_sampler.max_batch_size  # Static shape: the step never retraces.
        chosen = y.numpy()[mask.numpy() > 0]
        assert len(set(chosen)) == len(chosen)  # Without replacement within a step.
        counts[chosen] += 1
        sizes.append(len(chosen))
    # Batch sizes ~ Binomial(n, q): mean and variance within a few standard errors.
    steps = len(sizes)
    assert abs(np.mean(sizes) - n * q) < 4 * np.sqrt(n * q * (1 - q) / steps)
    assert np.var(sizes) == pytest.approx(n * q * (1 - q), rel=0.25)
    # Each example's inclusion count ~ Binomial(steps, q), independently of the others.
    assert abs(counts.mean() - steps * q) < 0.2
    assert counts.var() == pytest.approx(steps * q * (1 - q), rel=0.2)


def test_padding_rows_are_masked_and_epochs_draw_new_batches():
    ds = dpk.poisson_batches(_data(), 0.1, seed=0)
    first = [m.numpy().copy() for _, _, m in ds]
    second = [m.numpy().copy() for _, _, m in ds]
    assert len(first) == 10 == ds.dp_sampler.steps_per_epoch
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in first)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    assert int(ds.dp_sampler.step.numpy()) == 20


def test_same_seed_same_stream():
    a = [y.numpy()[m.numpy() > 0].tolist() for _, y, m in dpk.poisson_batches(_data(), 0.1, seed=5)]
    b = [y.numpy()[m.numpy() > 0].tolist() for _, y, m in dpk.poisson_batches(_data(), 0.1, seed=5)]
    assert a == b


def test_overflow_fails_loudly_instead_of_truncating():
    ds = dpk.poisson_batches(_data(), 0.5, max_batch_size=10, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="exceeded max_batch_size"):
        next(iter(ds))


def test_default_max_batch_size_is_a_binomial_tail():
    size = dpk.max_batch_size_for(60000, 256 / 60000, 1e-9)
    assert 256 < size < 400
    assert stats.binom.sf(size - 1, 60000, 256 / 60000) <= 1e-9


def test_bad_inputs():
    with pytest.raises(ValueError, match="sampling_rate"):
        dpk.poisson_batches(_data(), 0.0)
    with pytest.raises(ValueError, match="finite dataset"):
        dpk.poisson_batches(tf.data.Dataset.range(5).repeat(), 0.1)
    with pytest.raises(ValueError, match="same number of examples"):
        dpk.poisson_batches((np.zeros((5, 1)), np.zeros(4)), 0.1)


def test_accepts_a_dataset_of_examples_with_dict_features():
    ds = tf.data.Dataset.from_tensor_slices(({"ids": np.ones((50, 3), np.int32)}, np.zeros(50, np.int32)))
    x, y, mask = next(iter(dpk.poisson_batches(ds, 0.2, seed=1)))
    assert x["ids"].shape[1:] == (3,) and x["ids"].shape[0] == mask.shape[0]
