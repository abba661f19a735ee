import math

import dp_accounting
import pytest
from dp_accounting import rdp

import dp_bitfit_keras as dpk
from dp_bitfit_keras.privacy import accounting


def test_epsilon_matches_dp_accounting_directly():
    # The classic MNIST DP-SGD setting: σ=1.1, q=256/60000, 15 epochs, δ=1e-5 → ε ≈ 1.281 (RDP).
    q, steps = 256 / 60000, int(15 * 60000 / 256)
    eps = dpk.compute_epsilon(1.1, q, steps, 1e-5)
    acc = rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps
        )
    )
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert eps == pytest.approx(1.281, abs=1e-3)


def test_pld_is_tighter_than_rdp():
    q, steps = 256 / 60000, 3515
    rdp_eps = dpk.compute_epsilon(1.1, q, steps, 1e-5, "rdp")
    pld_eps = dpk.compute_epsilon(1.1, q, steps, 1e-5, "pld")
    assert 0.8 * rdp_eps < pld_eps < rdp_eps


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_noise_calibration_round_trips(target, accountant):
    q, steps = 0.01, 500
    sigma = dpk.noise_multiplier_for_epsilon(target, q, steps, 1e-5, accountant)
    assert dpk.compute_epsilon(sigma, q, steps, 1e-5, accountant) <= target
    # Smallest: 1% less noise overshoots.
    assert dpk.compute_epsilon(sigma * 0.99, q, steps, 1e-5, accountant) > target


def test_edge_values():
    assert dpk.compute_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert math.isinf(dpk.compute_epsilon(0.0, 0.1, 10, 1e-5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_multiplier=-1.0), "noise_multiplier must be >= 0"),
        (dict(sampling_rate=0.0), r"sampling_rate must be in \(0, 1\]"),
        (dict(sampling_rate=1.5), r"sampling_rate must be in \(0, 1\]"),
        (dict(steps=-3), "steps must be a non-negative integer"),
        (dict(delta=1.0), r"delta must be in \(0, 1\)"),
        (dict(accountant="moments"), "accountant must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dpk.compute_epsilon(**args)


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(ValueError, match="unreachable"):
        dpk.noise_multiplier_for_epsilon(1e-6, 1.0, 10**6, 1e-10)
    with pytest.raises(ValueError, match="target_epsilon must be > 0"):
        dpk.noise_multiplier_for_epsilon(0.0, 0.1, 10, 1e-5)


def test_event_is_the_composed_poisson_gaussian():
    event = accounting.dp_sgd_event(1.3, 0.02, 7)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.3)), 7
    )
