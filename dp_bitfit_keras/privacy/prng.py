"""Secret randomness for everything DP releases: noise, Poisson samples, DPZero directions.

The privacy argument assumes the noise and the sample are unknown to the adversary. Two
things would break that and are excluded here:

- **Guessable keys.** Keys are 256 bits from the operating system (`secrets`), never from
  Python's, NumPy's, TensorFlow's or Keras' global seeds: `keras.utils.set_random_seed` keeps
  initialisation, dropout and splits reproducible but says nothing about the noise. An explicit
  seed (`DPOptimizer(seed=...)`, `poisson_batches(seed=...)`) derives the key from that seed
  with SHA-256 and warns: the run is then not private against anyone who knows the seed.
- **A predictable generator.** The bits come from ChaCha20 (RFC 8439), a stream cipher: with a
  secret 256-bit key its output cannot be told apart from random, nor its key recovered, by any
  known attack (TensorFlow's Philox and ThreeFry are statistical generators with 64-bit keys;
  2^64 candidate keys can be searched). ChaCha20 is built here from 32-bit integer additions,
  xors and rotations, which XLA compiles into the training step (no host round trip), and is
  checked against the RFC's test vector. The block counter is the position in the stream, the
  nonce is (stream, step): every step and purpose gets its own stream, none is ever reused.

Gaussian samples resist the floating-point attacks of Jin et al. (arXiv 2107.10138) as Opacus'
`secure_mode` does: each noise value is the sum of 4 independent N(0, 1/4) samples (Box-Muller on
32-bit uniforms, computed in float64, rounded once to the output dtype), so the values that can
come out no longer follow the lattice of one sampler's output that the attack reads. A 32-bit
uniform bounds each Box-Muller radius at 6.8, so a coordinate of the sum is at most 13.5σ:
a truncation with probability below 2^-32 per sample, far inside any δ used in practice.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings

import numpy as np
import tensorflow as tf

KEY_WORDS = 8  # 256-bit ChaCha20 key, as 32-bit words (stored in int64 variables)

# Streams: the first nonce word (a step's noise for all its variables is one stream).
NOISE = 0
COUNT_NOISE = 1 << 20  # adaptive clipping's noisy count
DPZERO_DIRECTION = 2 << 20
POISSON_SAMPLE = 3 << 20
CANARY = 4 << 20  # tests and audits

GENERATORS = ("chacha20", "philox")


class PredictableNoiseWarning(UserWarning):
    """An explicit seed keys the noise or the sample: not private against whoever knows it."""


_warned = set()


def new_key() -> np.ndarray:
    """A fresh secret 256-bit key from the operating system's entropy (`secrets`)."""
    return np.frombuffer(secrets.token_bytes(4 * KEY_WORDS), dtype="<u4").astype(np.int64)


def key_from_seed(seed: int, purpose: str) -> np.ndarray:
    """The key that an explicit `seed` gives for `purpose` ("noise", "sampling"), with a warning.

    SHA-256 of the seed and the purpose, so the noise and the sample of one seed are unrelated.
    """
    seed = int(seed)
    if seed not in _warned:
        _warned.add(seed)
        warnings.warn(
            f"seed={seed} makes the DP noise and Poisson sampling reproducible: the run is NOT private "
            "against anyone who knows (or can guess) this seed, since they can regenerate the noise and "
            "the batches. Leave seed=None (secret keys from the operating system) for runs you release.",
            PredictableNoiseWarning,
            stacklevel=3,
        )
    return derive_key(f"dp_bitfit_keras/v1/{purpose}/{seed}")


def derive_key(label: str) -> np.ndarray:
    """A key that is a public function of `label` (SHA-256): reproducible, hence not secret."""
    digest = hashlib.sha256(label.encode()).digest()
    return np.frombuffer(digest, dtype="<u4").astype(np.int64)


def key_for(seed: int | None, purpose: str) -> np.ndarray:
    """`new_key()` without a seed, `key_from_seed(seed, purpose)` with one."""
    return new_key() if seed is None else key_from_seed(seed, purpose)


# --- ChaCha20 (RFC 8439, §2.3) ----------------------------------------------------------------

_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def _rotl(x, bits):
    return tf.bitwise.bitwise_or(
        tf.bitwise.left_shift(x, tf.constant(bits, tf.uint32)),
        tf.bitwise.right_shift(x, tf.constant(32 - bits, tf.uint32)),
    )


def _quarter_rounds(a, b, c, d):
    a = a + b
    d = _rotl(tf.bitwise.bitwise_xor(d, a), 16)  # noqa: E702
    c = c + d
    b = _rotl(tf.bitwise.bitwise_xor(b, c), 12)  # noqa: E702
    a = a + b
    d = _rotl(tf.bitwise.bitwise_xor(d, a), 8)  # noqa: E702
    c = c + d
    b = _rotl(tf.bitwise.bitwise_xor(b, c), 7)  # noqa: E702
    return a, b, c, d


def _double_round(i, a, b, c, d):
    # The state as 4 rows of 4 words ([4, m] each). Column round: the 4 quarter rounds on the
    # columns at once. Diagonal round: rotate rows b, c, d left by 1, 2, 3 so the diagonals
    # become columns, run the same quarter rounds, rotate back (the usual SIMD form).
    a, b, c, d = _quarter_rounds(a, b, c, d)
    a, b, c, d = _quarter_rounds(a, tf.roll(b, -1, 0), tf.roll(c, -2, 0), tf.roll(d, -3, 0))
    return i + 1, a, tf.roll(b, 1, 0), tf.roll(c, 2, 0), tf.roll(d, 3, 0)


def chacha20_blocks(key, nonce, counters):
    """ChaCha20 blocks: `[len(counters), 16]` uint32 words (RFC 8439, §2.3).

    The 20 rounds run as a 10-step `tf.while_loop` of vectorized double rounds, so the graph
    (and XLA's compile time) stays small whatever the output size.

    Args:
        key: 8 words (any integer dtype holding values in [0, 2^32)).
        nonce: 3 words.
        counters: `[m]` block counters.
    """
    key = tf.cast(tf.convert_to_tensor(key), tf.uint32)
    nonce = tf.cast(tf.convert_to_tensor(nonce), tf.uint32)
    counters = tf.cast(tf.reshape(counters, [1, -1]), tf.uint32)
    ones = tf.ones_like(counters)
    a0 = tf.constant(_CONSTANTS, tf.uint32)[:, None] * ones
    b0 = key[:4, None] * ones
    c0 = key[4:, None] * ones
    d0 = tf.concat([counters, nonce[:, None] * ones], axis=0)
    _, a, b, c, d = tf.while_loop(
        lambda i, *_: i < 10,
        _double_round,
        (tf.constant(0), a0, b0, c0, d0),
        maximum_iterations=10,
    )
    state = tf.concat([a + a0, b + b0, c + c0, d + d0], axis=0)  # [16, m]
    return tf.transpose(state)


def _nonce(step, stream):
    step = tf.cast(step, tf.int64)
    return tf.stack(
        [
            tf.cast(stream, tf.int64),
            tf.bitwise.bitwise_and(step, 0xFFFFFFFF),
            tf.bitwise.right_shift(step, 32),
        ]
    )


def random_words(key, count: int, step, stream):
    """`count` uint32 words of the ChaCha20 stream (key, nonce = (stream, step))."""
    blocks = -(-int(count) // 16)
    words = chacha20_blocks(key, _nonce(step, stream), tf.range(blocks, dtype=tf.int64))
    return tf.reshape(words, [-1])[:count]


def _unit_interval(words):
    # (w + 1/2) / 2^32: in (0, 1), never 0 (Box-Muller takes its log).
    return (tf.cast(words, tf.float64) + 0.5) * (1.0 / 4294967296.0)


def uniform(key, shape, step, stream):
    """Uniform float64 samples in (0, 1) of static `shape`."""
    size = int(np.prod(shape, dtype=np.int64))
    return tf.reshape(_unit_interval(random_words(key, size, step, stream)), shape)


def normal(key, shape, step, stream, stddev=1.0, dtype=tf.float32, generator="chacha20"):
    """N(0, stddev²) samples of static `shape`, each the sum of 4 Gaussians (see module doc).

    `generator="philox"`: TensorFlow's `stateless_normal` keyed by 64 bits of the key instead
    (fast, not cryptographic, one sample per value); only to measure what the secure path costs.
    """
    shape = [int(d) for d in shape]
    size = int(np.prod(shape, dtype=np.int64))
    if generator == "philox":
        key = tf.cast(tf.convert_to_tensor(key), tf.int64)
        seed = tf.stack([key[0] * 4294967296 + key[1], tf.cast(step, tf.int64) * 16777216 + tf.cast(stream, tf.int64)])
        return tf.random.stateless_normal(shape, seed=seed, stddev=tf.cast(stddev, dtype), dtype=dtype)
    if generator != "chacha20":
        raise ValueError(f"generator must be one of {GENERATORS}; got {generator!r}.")
    if size <= NORMAL_CHUNK:
        u = tf.reshape(_unit_interval(random_words(key, 4 * size, step, stream)), [2, 2, max(size, 0)])
        return tf.reshape(_four_gaussians(u, stddev, dtype), shape)
    # Large outputs (full fine-tuning's noise: one value per parameter) are drawn NORMAL_CHUNK
    # values at a time, so the 4 words and the float64 Box-Muller temporaries of each value
    # (~48 bytes) are live for one chunk only. Value i still takes words i, size + i,
    # 2·size + i and 3·size + i of the stream: the same numbers as drawing all at once.
    nonce = _nonce(step, stream)
    chunks = -(-size // NORMAL_CHUNK)

    def body(j, out):
        start = tf.cast(j, tf.int64) * NORMAL_CHUNK
        words = [_words_at(key, nonce, k * size + start, NORMAL_CHUNK) for k in range(4)]
        u = tf.reshape(_unit_interval(tf.stack(words)), [2, 2, NORMAL_CHUNK])
        return j + 1, out.write(j, _four_gaussians(u, stddev, dtype))

    _, out = tf.while_loop(
        lambda j, _: j < chunks,
        body,
        (tf.constant(0), tf.TensorArray(dtype, size=chunks, element_shape=[NORMAL_CHUNK])),
        maximum_iterations=chunks,
    )
    return tf.reshape(out.concat()[:size], shape)


# Values per chunk when drawing many Gaussians (see `normal`).
NORMAL_CHUNK = 1 << 20


def _four_gaussians(u, stddev, dtype):
    """From uniforms `[2, 2, n]`: n samples of N(0, stddev²), each the sum of 4 Box-Muller normals."""
    radius = tf.sqrt(-2.0 * tf.math.log(u[:, 0]))  # [2, n]
    angle = (2.0 * math.pi) * u[:, 1]
    total = tf.reduce_sum(radius * tf.cos(angle) + radius * tf.sin(angle), axis=0)  # 4 N(0,1)
    return tf.cast(total * (0.5 * tf.cast(stddev, tf.float64)), dtype)


def _words_at(key, nonce, start, count: int):
    """`count` words of the stream from position `start` (a tensor): the blocks covering them."""
    blocks = count // 16 + 1
    first = start // 16
    words = tf.reshape(chacha20_blocks(key, nonce, first + tf.range(blocks, dtype=tf.int64)), [-1])
    return tf.slice(words, [start % 16], [count])


def normal_list(key, shapes, step, stream, stddev=1.0, dtypes=tf.float32, generator="chacha20"):
    """One tensor of N(0, stddev²) samples per shape, all from one stream (one generator call,
    so the step's graph grows by one generator whatever the number of variables)."""
    shapes = [[int(d) for d in shape] for shape in shapes]
    dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes] * len(shapes)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    flat = normal(key, [sum(sizes)], step, stream, stddev, tf.float32, generator)
    parts = tf.split(flat, sizes) if shapes else []
    return [tf.cast(tf.reshape(p, shape), dtype) for p, shape, dtype in zip(parts, shapes, dtypes)]


__all__ = [
    "GENERATORS",
    "KEY_WORDS",
    "PredictableNoiseWarning",
    "chacha20_blocks",
    "derive_key",
    "key_for",
    "key_from_seed",
    "new_key",
    "normal",
    "normal_list",
    "random_words",
    "uniform",
]
