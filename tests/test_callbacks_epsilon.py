"""ε as training goes: per batch in the progress bar's logs, per epoch in History and TensorBoard."""

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import ledger


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epsilons = []

    def on_train_batch_end(self, batch, logs=None):
        self.epsilons.append(logs.get("epsilon"))


def _model(accumulation=1):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = dpk.DPModel(base, trainable="all")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.1, gradient_accumulation_steps=accumulation),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data(n=100):
    rng = np.random.RandomState(0)
    return rng.randn(n, 4).astype("float32"), rng.randint(0, 3, n).astype("int32")


def test_epsilon_per_batch_is_the_ledgers_and_reaches_the_epoch_figure():
    model = _model()
    x, y = _data()
    seen = _BatchLogs()
    history = model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=[dpk.PrivacyCallback(delta=1e-5), seen])
    expected = [dpk.compute_epsilon(1.1, 0.1, s, 1e-5) for s in range(1, 21)]
    assert seen.epsilons == pytest.approx(expected, rel=1e-6)  # (the ledger keeps q as it ran: ~1e-8 off 0.1)
    # The per-batch figure after each epoch's last batch is the ledger's exact epoch figure.
    assert history.history["epsilon"] == pytest.approx([seen.epsilons[9], seen.epsilons[19]], rel=1e-12)
    assert model.optimizer.dp_steps == 20


def test_epsilon_curve_matches_composed_events():
    curve = ledger.EpsilonCurve([], ledger.Segment(0.8, 0.01, 0), 1e-6)
    for steps in (1, 7, 500):
        assert curve(steps) == pytest.approx(dpk.compute_epsilon(0.8, 0.01, steps, 1e-6), rel=1e-12)
    assert curve(0) == 0.0


def test_tensorboard_logs_epsilon(tmp_path):
    model = _model()
    x, y = _data()
    model.fit(
        x,
        y,
        batch_size=10,
        epochs=1,
        verbose=0,
        callbacks=[dpk.PrivacyCallback(delta=1e-5), keras.callbacks.TensorBoard(str(tmp_path))],
    )
    tags = set()
    for path in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert "epoch_epsilon" in tags
