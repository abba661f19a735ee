"""MirroredStrategy on 2 logical CPU devices, and resume after a killed run (subprocesses)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_mirrored_strategy_all_reduces_clipped_sums_and_noises_once():
    proc = _run(os.path.join(SCRIPTS, "mirrored.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    # σ = 0: the two-replica step equals the single-device step.
    assert out["sigma0_update_norm"] > 0.1
    assert out["sigma0_max_error"] < 1e-6
    # Noise: σC/B = 2 · 1 / 16 on both (noise per replica would give 1/√2 of it).
    for name in ("single", "mirrored"):
        assert out[f"{name}_noise_std"] == pytest.approx(0.125, rel=0.05)
        assert out[f"{name}_dp_steps"] == 1
    assert "fit()" in out["train_on_batch"]
    assert out["fit_dp_steps"] == 10
    for trainable in ("bias", "all"):
        assert out[f"accumulate_{trainable}_dp_steps_single"] == out[f"accumulate_{trainable}_dp_steps_mirrored"] == 10
        assert out[f"accumulate_{trainable}_max_error"] < 1e-6


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path):
    script = os.path.join(SCRIPTS, "resume.py")
    killed = _run(script, str(tmp_path / "backup"), str(tmp_path / "killed.json"), "17")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed.json").exists()
    resumed = _run(script, str(tmp_path / "backup"), str(tmp_path / "resumed.json"), "-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = _run(script, str(tmp_path / "backup2"), str(tmp_path / "straight.json"), "-1")
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = json.loads((tmp_path / "resumed.json").read_text())
    b = json.loads((tmp_path / "straight.json").read_text())
    # Same steps (BackupAndRestore restarts the interrupted epoch; the ledger's plan stops it
    # at the same total), same ε, and — since the Poisson stream and the noise stream resume
    # where the checkpoint left them — the same weights.
    assert a["dp_steps"] == b["dp_steps"] == 40
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-12)
    assert a["epsilon"] <= 3.0
    error = max(float(np.abs(np.array(u) - np.array(v)).max()) for u, v in zip(a["weights"], b["weights"]))
    assert error < 1e-6, error
