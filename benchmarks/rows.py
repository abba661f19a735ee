"""What the harness and the tf_keras peer process share: the synthetic BERT batch, the result
row of the benchmark JSON and the interleaved timer. Imports no Keras (the peer's process must
load tf_keras, ours Keras 3)."""

from __future__ import annotations

import statistics

VOCAB = 30522  # BERT's WordPiece vocabulary


def bert_batch(batch_size: int, seq: int):
    """A fixed synthetic BERT batch, the same tokens and labels in both processes."""
    import tensorflow as tf

    x = {
        "token_ids": tf.random.stateless_uniform((batch_size, seq), (1, 2), 1, VOCAB, tf.int32),
        "segment_ids": tf.zeros((batch_size, seq), tf.int32),
        "padding_mask": tf.ones((batch_size, seq), tf.bool),
    }
    return x, tf.random.stateless_uniform((batch_size,), (3, 4), 0, 2, tf.int32)


def result_row(mode: str, times: list[float], batch_size: int, peak_mem_mb, trainable_params: int, pfor_fallback) -> dict:
    """`times`: seconds of the timed steps; the row reports their median."""
    ms = 1e3 * statistics.median(times)
    return {
        "mode": mode,
        "ms_per_step": round(ms, 2),
        "examples_per_s": round(batch_size / ms * 1e3, 1),
        "peak_mem_mb": None if peak_mem_mb is None else round(peak_mem_mb, 1),
        "trainable_params": int(trainable_params),
        "pfor_fallback": pfor_fallback,
    }


def time_interleaved(runners: dict, x, y, repeats: int, log=print) -> dict:
    """Seconds of `repeats` `train_on_batch` steps per model, the models interleaved per round
    (so drift in the machine's speed hits every mode alike)."""
    import time

    times = {mode: [] for mode in runners}
    for i in range(repeats):
        log(f"timing round {i + 1}/{repeats}")
        for mode, model in runners.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[mode].append(time.perf_counter() - start)
    return times
