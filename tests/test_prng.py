"""privacy/prng.py: ChaCha20 against RFC 8439, secret keys, and the noise's distribution."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from dp_bitfit_keras.privacy import prng


def test_chacha20_block_matches_rfc8439():
    # RFC 8439 §2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1.
    key = np.frombuffer(bytes(range(32)), "<u4").astype(np.int64)
    nonce = np.frombuffer(bytes.fromhex("000000090000004a00000000"), "<u4").astype(np.int64)
    block = prng.chacha20_blocks(key, nonce, tf.constant([1], tf.int64)).numpy()[0]
    expected = bytes.fromhex(
        "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
        "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
    )
    assert block.astype("<u4").tobytes() == expected


def test_rolled_and_unrolled_chacha20_agree():
    key, nonce = prng.new_key(), np.array([5, 9, 0])
    counters = tf.range(50, dtype=tf.int64)
    rolled = tf.function(prng._rolled_blocks, jit_compile=True)(key, nonce, counters)
    np.testing.assert_array_equal(rolled.numpy(), prng.chacha20_blocks(key, nonce, counters).numpy())


def test_chacha20_is_the_same_under_xla():
    key = prng.new_key()
    eager = prng.random_words(key, 100, 7, prng.NOISE).numpy()
    compiled = tf.function(lambda k: prng.random_words(k, 100, 7, prng.NOISE), jit_compile=True)(
        tf.constant(key)
    ).numpy()
    np.testing.assert_array_equal(eager, compiled)


def test_keys_come_from_the_os_not_the_global_seed():
    keras.utils.set_random_seed(0)
    a = prng.new_key()
    keras.utils.set_random_seed(0)
    b = prng.new_key()
    assert a.shape == (prng.KEY_WORDS,) and a.dtype == np.int64
    assert np.all((a >= 0) & (a < 2**32))
    assert not np.array_equal(a, b)


def test_explicit_seed_derives_a_key_per_purpose_and_warns():
    prng._warned.discard(424242)
    with pytest.warns(prng.PredictableNoiseWarning, match="NOT private"):
        noise = prng.key_from_seed(424242, "noise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per seed
        again = prng.key_from_seed(424242, "noise")
        sampling = prng.key_from_seed(424242, "sampling")
    np.testing.assert_array_equal(noise, again)
    assert not np.array_equal(noise, sampling)


def test_streams_are_distinct_and_repeatable():
    key = prng.new_key()
    a = prng.normal(key, [1000], 3, prng.NOISE).numpy()
    np.testing.assert_array_equal(a, prng.normal(key, [1000], 3, prng.NOISE).numpy())
    for other in (
        prng.normal(key, [1000], 4, prng.NOISE),
        prng.normal(key, [1000], 3, prng.NOISE + 1),
        prng.normal(prng.new_key(), [1000], 3, prng.NOISE),
    ):
        assert abs(np.corrcoef(a, other.numpy())[0, 1]) < 0.15


@pytest.mark.parametrize("generator", prng.GENERATORS)
def test_normal_is_gaussian_with_the_given_stddev(generator):
    z = prng.normal(prng.new_key(), [200, 1000], 1, prng.NOISE, stddev=2.5, generator=generator).numpy()
    assert z.shape == (200, 1000) and z.dtype == np.float32
    assert abs(z.mean()) < 4 * 2.5 / np.sqrt(z.size)
    assert z.std() == pytest.approx(2.5, rel=0.01)
    # A wrong shape (uniform, a 2x scale, a missing sum term) fails this at 200,000 samples.
    assert stats.kstest(z.reshape(-1)[:50_000] / 2.5, "norm").pvalue > 1e-4


def test_uniform_is_in_the_open_unit_interval():
    u = prng.uniform(prng.new_key(), [100_000], 0, prng.POISSON_SAMPLE).numpy()
    assert u.dtype == np.float64 and u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_large_draws_are_chunked_with_the_same_values(monkeypatch):
    """Drawing NORMAL_CHUNK values at a time (bounded memory) gives exactly the values of one draw
    (the one-chunk draw runs the rolled ChaCha20, the chunked one the unrolled: same words)."""
    key = prng.new_key()

    def draw(size):
        return tf.function(lambda: prng.normal(key, [size], 7, prng.NOISE, stddev=1.5), jit_compile=True)().numpy()

    whole = {size: draw(size) for size in (4096, 4097, 20_001)}
    monkeypatch.setattr(prng, "NORMAL_CHUNK", 4096)
    for size, expected in whole.items():
        np.testing.assert_array_equal(draw(size), expected)


def test_cos_sin_of_a_turn_match_extended_precision():
    """The polynomial cos/sin (exact integer argument reduction) are within 2 ulp of 1 everywhere."""
    rng = np.random.default_rng(0)
    edges = [0, 1, 2**29 - 1, 2**29, 2**30 - 1, 2**30, 2**31 - 1, 2**31, 3 * 2**30, 2**32 - 1]
    words = np.concatenate([rng.integers(0, 2**32, 200_000, dtype=np.uint64), np.arange(0, 2**32, 2**20), edges])
    words = words.astype(np.uint32)
    cos, sin = tf.function(prng._cos_sin_of_turn, jit_compile=True)(tf.constant(words))
    theta = 2 * np.longdouble(np.pi) * (words.astype(np.longdouble) + np.longdouble(0.5)) / np.longdouble(2**32)
    assert np.max(np.abs(cos.numpy() - np.cos(theta))) <= 2 * 2.0**-52
    assert np.max(np.abs(sin.numpy() - np.sin(theta))) <= 2 * 2.0**-52


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_noise_moments_and_shape_of_the_distribution(dtype):
    """KS at the claimed σ passes; at ⅔σ and 3⁄2σ it fails; mean, variance, skew and kurtosis
    of a Gaussian; no value beyond the 13.6σ bound of 32-bit uniforms."""
    sigma = 0.7
    z = prng.normal(prng.new_key(), [1_000_000], 5, prng.NOISE, stddev=sigma, dtype=dtype).numpy()
    assert z.dtype == dtype.as_numpy_dtype
    n = z.size
    assert abs(z.mean()) < 5 * sigma / np.sqrt(n)
    assert z.var() / sigma**2 == pytest.approx(1.0, abs=5 * np.sqrt(2 / n))
    assert abs(stats.skew(z)) < 5 * np.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert np.abs(z).max() < 13.6 * sigma
    sample = z[:200_000]
    assert stats.kstest(sample, "norm", args=(0, sigma)).pvalue > 1e-4
    for wrong in (2 / 3 * sigma, 3 / 2 * sigma):
        assert stats.kstest(sample, "norm", args=(0, wrong)).pvalue < 1e-6


@pytest.mark.parametrize("dtype, bits", [(tf.float32, 24), (tf.float64, 53)])
def test_noise_uses_the_full_resolution_of_its_dtype(dtype, bits):
    """No lattice coarser than the dtype's own (the precision attack, arXiv 2207.13793): in the
    binade [½, 1), where the spacing is 2^-bits, the last mantissa bit of the noise is set for
    half of the values, and so is each of the 3 above it. (Noise from a float32 draw added to a
    float64 sum would fail the float64 case: its values sit on a 2^-24 lattice there.)"""
    z = prng.normal(prng.new_key(), [400_000], 9, prng.NOISE, dtype=dtype).numpy().astype(np.float64)
    z = np.abs(z[(np.abs(z) >= 0.5) & (np.abs(z) < 1)])
    units = np.round(z * 2.0**bits).astype(np.int64)  # exact: the values are multiples of 2^-bits here
    np.testing.assert_array_equal(units / 2.0**bits, z)
    for bit in range(4):
        share = np.mean((units >> bit) & 1)
        assert share == pytest.approx(0.5, abs=5 * 0.5 / np.sqrt(units.size))


def test_float64_variables_get_float64_noise():
    shapes, dtypes = [[3, 4], [5]], [tf.float64, tf.float32]
    a, b = prng.normal_list(prng.new_key(), shapes, 1, prng.NOISE, dtypes=dtypes)
    assert a.dtype == tf.float64 and b.dtype == tf.float32
    # float64 noise is not float32 noise widened: its values are not all float32-representable.
    assert np.any(a.numpy() != a.numpy().astype(np.float32).astype(np.float64))


def test_noise_differs_at_every_step_and_in_every_run():
    key = prng.new_key()
    draws = [prng.normal(key, [4096], step, prng.NOISE).numpy() for step in range(4)]
    draws.append(prng.normal(prng.new_key(), [4096], 0, prng.NOISE).numpy())
    for i in range(len(draws)):
        for j in range(i):
            assert abs(np.corrcoef(draws[i], draws[j])[0, 1]) < 0.08
            assert not np.any(draws[i] == draws[j]) or np.mean(draws[i] == draws[j]) < 1e-3
