"""What the harness and the tf_keras peer process share: the synthetic BERT batch, the epoch
data, the result row of the benchmark JSON and the interleaved timers. Imports no Keras (the
peer's process must load tf_keras, ours Keras 3)."""

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


def epoch_data(shape: dict, n: int):
    """`n` synthetic training examples for epoch timing (NumPy; the same in every process).

    BERT: random tokens with lengths uniform in [8, seq] (the rest padding), alternating labels;
    decoders (shapes with a `vocab`): the same lengths, `(x, next tokens, per-token weights)`;
    ViT: uniform images, labels 0..9 in turn.
    """
    import numpy as np

    rng = np.random.RandomState(0)
    if "seq" in shape:
        seq = shape["seq"]
        mask = np.arange(seq)[None] < rng.randint(8, seq + 1, n)[:, None]
    if "vocab" in shape:  # a decoder: (x, next tokens, per-token weights = the padding mask)
        ids = rng.randint(1, shape["vocab"], (n, seq + 1)).astype("int32")
        x = {"token_ids": ids[:, :-1] * mask, "padding_mask": mask}
        return x, ids[:, 1:] * mask, mask.astype("float32")
    if shape["model"] == "bert":
        ids = (rng.randint(1, VOCAB, (n, seq)) * mask).astype("int32")
        return {"token_ids": ids, "segment_ids": np.zeros_like(ids), "padding_mask": mask}, (np.arange(n) % 2).astype(
            "int32"
        )
    s = shape["image"]
    return rng.uniform(size=(n, s, s, 3)).astype("float32"), (np.arange(n) % 10).astype("int32")


def time_epochs(runners: dict, epochs: int, log=print) -> dict:
    """Seconds of `epochs` epochs per runner (a callable running one epoch), after one untimed
    (compiling) epoch each; runners interleaved per round, as `time_interleaved`."""
    import time

    times = {mode: [] for mode in runners}
    for mode, run in runners.items():
        start = time.perf_counter()
        run()
        log(f"[{mode}] compile epoch {time.perf_counter() - start:.1f} s")
    for i in range(epochs):
        for mode, run in runners.items():
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
        log(f"epoch round {i + 1}/{epochs}")
    return times


def result_row(
    mode: str, times: list[float], batch_size: int, peak_mem_mb, trainable_params: int, pfor_fallback
) -> dict:
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


def time_interleaved(runners: dict, data: tuple, repeats: int, log=print) -> dict:
    """Seconds of `repeats` `train_on_batch(*data)` steps per model (`data`: `(x, y)` or
    `(x, y, sample_weight)`), the models interleaved per round (so drift in the machine's speed
    hits every mode alike)."""
    import time

    times = {mode: [] for mode in runners}
    for i in range(repeats):
        log(f"timing round {i + 1}/{repeats}")
        for mode, model in runners.items():
            start = time.perf_counter()
            model.train_on_batch(*data)
            times[mode].append(time.perf_counter() - start)
    return times
