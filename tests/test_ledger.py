"""The ledger of segments: ε composes over runs at different σ and q, exactly as dp_accounting does."""

import dp_accounting
import keras
import numpy as np
import pytest

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import ledger

DELTA = 1e-5


def _dp_accounting_epsilon(runs, accountant="rdp"):
    """The reference: dp_accounting's own composition of the same Poisson-subsampled Gaussians."""
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in runs:
        if steps:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_of_segments_is_dp_accountings_composition(accountant):
    runs = [(1.1, 0.01, 300), (0.9, 0.05, 40), (2.0, 0.002, 1000)]
    segments = [ledger.Segment(s, q, n) for s, q, n in runs]
    assert ledger.epsilon(segments, DELTA, accountant) == pytest.approx(
        _dp_accounting_epsilon(runs, accountant), rel=1e-9
    )


def test_epsilon_curve_after_closed_segments():
    closed = [ledger.Segment(1.1, 0.01, 300), ledger.Segment(0.9, 0.05, 40)]
    curve = ledger.EpsilonCurve(closed, ledger.Segment(1.5, 0.02, 0), DELTA, first_step=340)
    for extra in (0, 1, 17, 250):
        expected = _dp_accounting_epsilon([(1.1, 0.01, 300), (0.9, 0.05, 40), (1.5, 0.02, extra)])
        assert curve(340 + extra) == pytest.approx(expected, rel=1e-9)
    budget = curve(340 + 100)
    assert curve.max_steps_within(budget) == 440
    assert curve.max_steps_within(curve(340) * 0.999) == 340  # the closed segments alone are over it


def test_table_round_trip_and_capacity():
    segments = [ledger.Segment(1.0 + i / 10, 0.01 * (i + 1), 10 * i, 0.5 * (i % 2)) for i in range(5)]
    assert ledger.from_table(ledger.to_table(segments), len(segments)) == segments
    with pytest.raises(ValueError, match="at most"):
        ledger.to_table([ledger.Segment(1.0, 0.1, 1)] * (ledger.MAX_SEGMENTS + 1))
    with pytest.raises(ValueError, match="sampling_rate"):
        ledger.Segment(1.0, 1.5, 3)


def _model(sigma=1.1):
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = dpk.DPModel(base, trainable="all")
    model.compile(
        optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.1), 1.0, sigma),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _data(n=100):
    rng = np.random.RandomState(0)
    return rng.randn(n, 4).astype("float32"), rng.randint(0, 3, n).astype("int32")


def test_second_fit_at_another_batch_size_composes(tmp_path):
    model = _model()
    x, y = _data()
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    seen = []

    class Logs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs["epsilon"])

    model.fit(x, y, batch_size=25, epochs=1, verbose=0, callbacks=[dpk.PrivacyCallback(DELTA), Logs()])
    opt = model.optimizer
    assert [(s.noise_multiplier, s.steps) for s in opt.segments] == [(1.1, 10), (1.1, 4)]
    assert [s.sampling_rate for s in opt.segments] == pytest.approx([0.1, 0.25])
    expected = _dp_accounting_epsilon(
        [(1.1, opt.segments[0].sampling_rate, 10), (1.1, opt.segments[1].sampling_rate, 4)]
    )
    assert model.privacy_spent(DELTA)[0] == pytest.approx(expected, rel=1e-9)
    # The progress bar's cheap per-batch figure follows the composed ledger.
    firsts = [
        _dp_accounting_epsilon([(1.1, opt.segments[0].sampling_rate, 10), (1.1, opt.segments[1].sampling_rate, k)])
        for k in range(1, 5)
    ]
    assert seen == pytest.approx(firsts, rel=1e-9)
    # A third fit at the first rate opens a third segment (not merged into the first).
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    assert [s.steps for s in opt.segments] == [10, 4, 10]

    # Saved and restored with the model (the segments are optimizer variables).
    path = str(tmp_path / "m.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.optimizer.segments == opt.segments
    assert restored.privacy_spent(DELTA)[0] == pytest.approx(model.privacy_spent(DELTA)[0], rel=1e-12)


def test_same_rate_keeps_one_segment():
    model = _model()
    x, y = _data()
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    assert [s.steps for s in model.optimizer.segments] == [20]
    assert model.privacy_spent(DELTA)[0] == pytest.approx(dpk.compute_epsilon(1.1, 0.1, 20, DELTA), rel=1e-6)


def test_continued_ledger_at_another_sigma_composes():
    x, y = _data()
    first = _model(sigma=1.1)
    first.fit(x, y, batch_size=10, epochs=1, verbose=0)
    second = _model(sigma=2.0)
    second.optimizer.build(list(second.selection.variables))
    second.optimizer.continue_ledger(first.optimizer)
    second.fit(x, y, batch_size=20, epochs=1, verbose=0)
    segments = second.optimizer.segments
    assert [(s.noise_multiplier, s.steps) for s in segments] == [(1.1, 10), (2.0, 5)]
    expected = _dp_accounting_epsilon([(1.1, segments[0].sampling_rate, 10), (2.0, segments[1].sampling_rate, 5)])
    assert second.privacy_spent(DELTA)[0] == pytest.approx(expected, rel=1e-9)


def test_budget_counts_closed_segments():
    model = _model()
    x, y = _data()
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    spent = model.privacy_spent(DELTA)[0]
    budget = _dp_accounting_epsilon([(1.1, model.optimizer.segments[0].sampling_rate, 10), (1.1, 0.25, 2)]) * 1.0001
    model.fit(x, y, batch_size=25, epochs=2, verbose=0, callbacks=[dpk.PrivacyCallback(DELTA, max_epsilon=budget)])
    assert [s.steps for s in model.optimizer.segments] == [10, 2]
    assert spent < model.privacy_spent(DELTA)[0] <= budget
