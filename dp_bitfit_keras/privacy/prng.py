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
float64 outputs are not rounded through float32 (float32 noise would leave a float64 sum's low
bits readable).

Speed: the draw is XLA-compiled wherever it is called, one ChaCha20 block per 2 values, cos/sin
from polynomials with exact integer argument reduction (`_gaussian_blocks`; one chunk or less:
`_small_gaussian_blocks`, the same values from a program quicker to compile); the profile, the
privacy argument for each choice and the statistical tests are in docs/guides/secure-noise.md.
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

# The 8 quarter rounds of a double round: 4 on the columns of the 4×4 state, 4 on its diagonals.
_DOUBLE_ROUND = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15)) + (
    (0, 5, 10, 15),
    (1, 6, 11, 12),
    (2, 7, 8, 13),
    (3, 4, 9, 14),
)


def _rotl(x, bits):
    return tf.bitwise.bitwise_or(
        tf.bitwise.left_shift(x, tf.constant(bits, tf.uint32)),
        tf.bitwise.right_shift(x, tf.constant(32 - bits, tf.uint32)),
    )


def _quarter_round(a, b, c, d):
    a = a + b
    d = _rotl(tf.bitwise.bitwise_xor(d, a), 16)
    c = c + d
    b = _rotl(tf.bitwise.bitwise_xor(b, c), 12)
    a = a + b
    d = _rotl(tf.bitwise.bitwise_xor(d, a), 8)
    c = c + d
    b = _rotl(tf.bitwise.bitwise_xor(b, c), 7)
    return a, b, c, d


def _block_words(key, nonce, counters):
    """The 16 words of the ChaCha20 blocks at `counters` (`[m]`): a list of 16 `[m]` uint32 tensors.

    The 20 rounds are unrolled over 16 separate word tensors, so the whole block function is one
    chain of elementwise 32-bit additions, xors and shifts: XLA fuses it into one loop that keeps
    the state in registers (no intermediate array is written to memory).
    """
    key = tf.cast(tf.convert_to_tensor(key), tf.uint32)
    nonce = tf.cast(tf.convert_to_tensor(nonce), tf.uint32)
    counters = tf.cast(tf.reshape(counters, [-1]), tf.uint32)
    zeros = tf.zeros_like(counters)
    initial = (
        [tf.constant(c, tf.uint32) + zeros for c in _CONSTANTS]
        + [key[i] + zeros for i in range(8)]
        + [counters]
        + [nonce[i] + zeros for i in range(3)]
    )
    s = list(initial)
    for _ in range(10):
        for a, b, c, d in _DOUBLE_ROUND:
            s[a], s[b], s[c], s[d] = _quarter_round(s[a], s[b], s[c], s[d])
    return [w + w0 for w, w0 in zip(s, initial)]


def _rolled_blocks(key, nonce, counters):
    """`[m, 16]` ChaCha20 blocks, the same words as `_block_words`, as a 10-step `while_loop` of
    vectorised double rounds over a `[4, m]` state: a small program, quick to compile, slow on
    millions of blocks (the state is written to memory at every round). Draws of one chunk or
    less use it: there XLA's compile time, not the draw, is what a step pays."""

    def double_round(i, a, b, c, d):
        # Column round on the 4 columns at once; diagonal round: rows b, c, d rotated left by 1, 2,
        # 3 so the diagonals become columns, the same quarter rounds, rotated back.
        a, b, c, d = _quarter_round(a, b, c, d)
        a, b, c, d = _quarter_round(a, tf.roll(b, -1, 0), tf.roll(c, -2, 0), tf.roll(d, -3, 0))
        return i + 1, a, tf.roll(b, 1, 0), tf.roll(c, 2, 0), tf.roll(d, 3, 0)

    key = tf.cast(tf.convert_to_tensor(key), tf.uint32)
    nonce = tf.cast(tf.convert_to_tensor(nonce), tf.uint32)
    counters = tf.cast(tf.reshape(counters, [1, -1]), tf.uint32)
    ones = tf.ones_like(counters)
    a0 = tf.constant(_CONSTANTS, tf.uint32)[:, None] * ones
    b0, c0 = key[:4, None] * ones, key[4:, None] * ones
    d0 = tf.concat([counters, nonce[:, None] * ones], axis=0)
    _, a, b, c, d = tf.while_loop(
        lambda i, *_: i < 10, double_round, (tf.constant(0), a0, b0, c0, d0), maximum_iterations=10
    )
    return tf.transpose(tf.concat([a + a0, b + b0, c + c0, d + d0], axis=0))


def chacha20_blocks(key, nonce, counters):
    """ChaCha20 blocks: `[len(counters), 16]` uint32 words (RFC 8439, §2.3).

    Args:
        key: 8 words (any integer dtype holding values in [0, 2^32)).
        nonce: 3 words.
        counters: `[m]` block counters.
    """
    return tf.stack(_block_words(key, nonce, counters), axis=1)


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

    Value 2b + k (k = 0, 1) comes from words 4k … 4k + 3 of ChaCha20 block b of the stream
    (key, nonce = (stream, step)); for float64, value b from words 0 … 3 of block b. The draw
    is XLA-compiled wherever it is called (see `_gaussian_blocks`) and runs `NORMAL_CHUNK`
    values at a time, so its memory stays bounded; the values do not depend on the chunk size.

    `generator="philox"`: TensorFlow's `stateless_normal` keyed by 64 bits of the key instead
    (not cryptographic, one sample per value); only to measure what the secure path costs.
    """
    shape = [int(d) for d in shape]
    size = int(np.prod(shape, dtype=np.int64))
    if generator == "philox":
        key = tf.cast(tf.convert_to_tensor(key), tf.int64)
        seed = tf.stack([key[0] * 4294967296 + key[1], tf.cast(step, tf.int64) * 16777216 + tf.cast(stream, tf.int64)])
        return tf.random.stateless_normal(shape, seed=seed, stddev=tf.cast(stddev, dtype), dtype=dtype)
    if generator != "chacha20":
        raise ValueError(f"generator must be one of {GENERATORS}; got {generator!r}.")
    if size == 0:
        return tf.zeros(shape, dtype)
    if size > MAX_VALUES:
        raise ValueError(f"One noise draw holds at most {MAX_VALUES} values (the 32-bit block counter); got {size}.")
    # float32 (and narrower) values: 2 per block, as float32; float64 values: 1 per block, kept in
    # float64 (noise rounded to float32 would leave a float64 sum's low bits readable).
    per_block = 1 if tf.as_dtype(dtype) == tf.float64 else 2
    chunk_blocks = min(NORMAL_CHUNK // per_block, -(-size // per_block))
    chunks = -(-size // (per_block * chunk_blocks))
    args = (tf.cast(tf.convert_to_tensor(key), tf.int64), _nonce(step, stream), tf.cast(stddev, tf.float64))
    if chunks > 1:
        values = _gaussian_blocks(*args, chunk_blocks=chunk_blocks, chunks=chunks, per_block=per_block)
    else:
        values = _small_gaussian_blocks(*args, blocks=chunk_blocks, per_block=per_block)
    return tf.cast(tf.reshape(tf.reshape(values, [-1])[:size], shape), dtype)


# Values per chunk when drawing Gaussians (see `normal`), and per draw.
NORMAL_CHUNK = 1 << 17
MAX_VALUES = 1 << 33


def _gaussians(words, scale):
    """From 4 `[m]` uint32 words: m samples of N(0, (2·scale)²), in float64.

    Two Box-Muller pairs (radius from one word, angle from the next), both outputs of each:
    r₁cos θ₁ + r₁sin θ₁ + r₂cos θ₂ + r₂sin θ₂, four independent N(0, 1).
    """
    total = 0.0
    for radius_word, angle_word in (words[0:2], words[2:4]):
        radius = tf.sqrt(-2.0 * tf.math.log(_unit_interval(radius_word)))
        cos, sin = _cos_sin_of_turn(angle_word)
        total += radius * (cos + sin)
    return total * scale


# Taylor coefficients of sin(φ)/φ and cos(φ) in φ²; on |φ| ≤ π/4 the first omitted terms are
# below 10⁻¹⁶ (sin) and 10⁻¹⁷ (cos).
_SIN = tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(8))
_COS = tuple((-1) ** k / math.factorial(2 * k) for k in range(9))


def _horner(x, coefficients):
    total = tf.constant(coefficients[-1], tf.float64) + tf.zeros_like(x)
    for c in reversed(coefficients[:-1]):
        total = total * x + c
    return total


def _cos_sin_of_turn(word):
    """cos θ, sin θ (float64) of θ = 2π(w + ½)/2³², from the uint32 word w.

    The top 3 bits of w pick the octant, the other 29 the position inside it, so the argument
    reduction is exact integer arithmetic; sin and cos on [0, π/4] are polynomials (within
    2 ulp of 1 of the exact values; the test compares with extended precision). Polynomials
    vectorise where XLA's float64 sin and cos on CPU do not (4× faster here).
    """
    octant = tf.bitwise.right_shift(word, tf.constant(29, tf.uint32))
    low = tf.cast(tf.bitwise.bitwise_and(word, tf.constant((1 << 29) - 1, tf.uint32)), tf.float64)
    odd = tf.equal(tf.bitwise.bitwise_and(octant, tf.constant(1, tf.uint32)), 1)
    # φ in (0, π/4): the distance from the nearer axis (octant k covers [kπ/4, (k+1)π/4)).
    phi = tf.where(odd, (2.0**29 - 0.5) - low, low + 0.5) * (math.pi / 4 / 2.0**29)
    phi2 = phi * phi
    s = phi * _horner(phi2, _SIN)
    c = _horner(phi2, _COS)
    # θ = qπ/2 + φ (even octant) or qπ/2 + π/2 − φ (odd): rotate (cos, sin) by q quarter turns.
    x, y = tf.where(odd, s, c), tf.where(odd, c, s)
    quarter = tf.bitwise.right_shift(octant, tf.constant(1, tf.uint32))
    cos = tf.where(quarter == 0, x, tf.where(quarter == 1, -y, tf.where(quarter == 2, -x, y)))
    sin = tf.where(quarter == 0, y, tf.where(quarter == 1, x, tf.where(quarter == 2, -y, -x)))
    return cos, sin


@tf.function(jit_compile=True, autograph=False)
def _small_gaussian_blocks(key, nonce, stddev, blocks, per_block):
    """`_gaussian_blocks` for one chunk, from `_rolled_blocks` (quick to compile); the same values."""
    words = tf.unstack(_rolled_blocks(key, nonce, tf.range(blocks, dtype=tf.int64)), axis=1)
    scale = 0.5 * stddev
    if per_block == 1:
        return _gaussians(words[0:4], scale)
    return tf.stack([tf.cast(_gaussians(words[i : i + 4], scale), tf.float32) for i in (0, 4)], axis=1)


@tf.function(jit_compile=True, autograph=False)
def _gaussian_blocks(key, nonce, stddev, chunk_blocks, chunks, per_block):
    """`[chunks · chunk_blocks, per_block]` Gaussians, one ChaCha20 block per row: 2 float32
    values (rounded once from float64) or 1 float64 value.

    Why this shape: XLA's CPU code generator computes each element of a fused output on its own,
    so an output element holding less than a block's values would repeat the block's 20 rounds
    for each. A row is therefore one 64-bit element (the widest type XLA has): two float32 bit
    patterns side by side, or one float64. The chunks run in a `while_loop` whose body writes each
    chunk to memory: a chunk's fused loop is vectorised and stays in cache.
    """
    scale = 0.5 * stddev

    def body(j, out):
        counters = tf.cast(j, tf.int64) * chunk_blocks + tf.range(chunk_blocks, dtype=tf.int64)
        words = _block_words(key, nonce, counters)
        if per_block == 1:
            row = tf.bitcast(_gaussians(words[0:4], scale), tf.uint64)
        else:
            low, high = (
                tf.cast(tf.bitcast(tf.cast(_gaussians(words[i : i + 4], scale), tf.float32), tf.uint32), tf.uint64)
                for i in (0, 4)
            )
            row = tf.bitwise.bitwise_or(low, tf.bitwise.left_shift(high, tf.constant(32, tf.uint64)))
        return j + 1, out.write(j, row)

    _, out = tf.while_loop(
        lambda j, _: j < chunks,
        body,
        (tf.constant(0), tf.TensorArray(tf.uint64, size=chunks, element_shape=[chunk_blocks])),
        maximum_iterations=chunks,
    )
    rows = out.concat()
    if per_block == 1:
        return tf.bitcast(rows, tf.float64)
    return tf.bitcast(rows, tf.float32)  # [blocks, 2]: (low, high) on a little-endian machine


def normal_list(key, shapes, step, stream, stddev=1.0, dtypes=tf.float32, generator="chacha20"):
    """One tensor of N(0, stddev²) samples per shape, all from one stream (one generator call,
    so the step's graph grows by one generator whatever the number of variables)."""
    shapes = [[int(d) for d in shape] for shape in shapes]
    dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes] * len(shapes)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    wide = tf.float64 if any(tf.as_dtype(d) == tf.float64 for d in dtypes) else tf.float32
    flat = normal(key, [sum(sizes)], step, stream, stddev, wide, generator)
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
