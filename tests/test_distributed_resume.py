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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_dp_lora_restored_by_backup_and_restore_keeps_learning(tmp_path):
    import keras

    import dp_bitfit_keras as dpk

    rng = np.random.RandomState(0)
    x, y = rng.randn(64, 6).astype("float32"), rng.randint(0, 3, 64).astype("int32")

    def model():
        keras.utils.set_random_seed(0)
        base = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(3, name="head")]
        )
        dpk.enable_lora(base, 2)
        m = dpk.DPModel(base, trainable="lora+head")
        m.compile(
            optimizer=dpk.DPOptimizer(keras.optimizers.SGD(0.5), 1.0, 0.5, seed=1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return m

    backup = keras.callbacks.BackupAndRestore(str(tmp_path), save_freq="epoch", delete_checkpoint=False)

    class Interrupt(keras.callbacks.Callback):  # as if killed after the first epoch's backup
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    first = model()
    first.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[backup, Interrupt()])
    assert first.optimizer.dp_steps == 4
    resumed = model()
    layer = resumed.model.get_layer("hidden")
    with pytest.warns(UserWarning, match="re-initialised A"):
        resumed.fit(
            x,
            y,
            batch_size=16,
            epochs=2,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path), save_freq="epoch", delete_checkpoint=False)],
        )
    # Keras restored the merged kernel and zeroed both factors; revived, B has learned again.
    assert np.any(layer.lora_kernel_b.numpy() != 0)
    assert resumed.optimizer.dp_steps == 8


def test_dp_lora_model_saves_and_loads_with_its_lora_layers(tmp_path):
    import keras
    import keras_hub

    import dp_bitfit_keras as dpk
    from dpk_examples import text

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=8
    )
    base = text.bert_classifier(backbone, 2)
    dpk.enable_lora(base, 2)  # keras-hub: not part of the backbone's config
    model = dpk.DPModel(base, trainable="lora+head")
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    names = lambda m: sorted(v.path for v in m.selection.variables)  # noqa: E731
    assert names(loaded) == names(model) and any("lora_kernel_a" in n for n in names(model))
