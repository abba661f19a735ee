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
    """Drawing NORMAL_CHUNK values at a time (bounded memory) gives exactly the values of one draw."""
    key = prng.new_key()

    def draw(size):
        return tf.function(lambda: prng.normal(key, [size], 7, prng.NOISE, stddev=1.5), jit_compile=True)().numpy()

    whole = {size: draw(size) for size in (4096, 4097, 20_001)}
    monkeypatch.setattr(prng, "NORMAL_CHUNK", 4096)
    for size, expected in whole.items():
        np.testing.assert_array_equal(draw(size), expected)
