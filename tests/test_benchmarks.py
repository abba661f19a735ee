"""Smoke test of the benchmark harness: tiny shape, one timed step per mode, in a subprocess
(the harness sets XLA's dump flags before TensorFlow starts)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "benchmarks", "train_step.py")
RESULT_KEYS = {"mode", "ms_per_step", "examples_per_s", "peak_mem_mb", "trainable_params", "pfor_fallback"}


def _run(*flags):
    proc = subprocess.run([sys.executable, BINARY, *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_step_benchmark_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "tiny.json"
    _run("--shape=tiny", "--repeats=1", "--warmup=1", f"--out={out}")
    report = json.loads(out.read_text())
    assert set(report) == {"shape", "device", "results", "ratios"}
    assert [r["mode"] for r in report["results"]] == [
        "full",
        "bitfit",
        "dp_bitfit",
        "dp_bitfit_head",
        "dp_full",
        "lora",
        "dp_lora",
    ]
    by = {}
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        assert r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        by[r["mode"]] = r
    assert set(report["ratios"]) >= {"dp_bitfit/bitfit", "dp_bitfit/full", "dp_full/dp_bitfit"}
    # Trainable counts and XLA memory are exact, not timings: check what they must be.
    assert (
        by["dp_bitfit"]["trainable_params"]
        == by["bitfit"]["trainable_params"]
        < by["dp_bitfit_head"]["trainable_params"]
    )
    assert by["dp_full"]["trainable_params"] == by["full"]["trainable_params"]
    assert (
        by["dp_lora"]["trainable_params"]
        == by["lora"]["trainable_params"]
        < by["dp_bitfit_head"]["trainable_params"] + 2_000
    )
    assert by["dp_full"]["peak_mem_mb"] > by["full"]["peak_mem_mb"] > by["bitfit"]["peak_mem_mb"]
    assert (tmp_path / "tiny.md").read_text().count("| dp_") == 4
    assert (tmp_path / "tiny.png").stat().st_size > 10_000


@pytest.mark.slow
def test_batch_sweep_finds_a_batch_under_the_cap(tmp_path):
    out = tmp_path / "batch.json"
    _run(
        "--shape=tiny",
        "--sweep=batch",
        "--modes=bitfit,dp_full,dp_full_vectorized",
        "--memory_cap_mb=96",
        f"--out={out}",
    )
    sweep = json.loads(out.read_text())
    by = {r["mode"]: r for r in sweep["results"]}
    for r in by.values():
        assert r["mem_at_largest_mb"] <= 96
    for mode in ("bitfit", "dp_full_vectorized"):
        # One more example per step would pass the cap (affine model, within one example).
        assert by[mode]["mem_at_largest_mb"] + 2 * by[mode]["mb_per_example"] > 96
    assert by["bitfit"]["largest_batch"] > by["dp_full"]["largest_batch"]
    # Book-keeping forms no per-example weight gradient: its memory per example is a fraction of
    # vectorized_map's (which holds [batch, 30522, 32] for the token embedding alone).
    assert by["dp_full"]["mb_per_example"] < 0.25 * by["dp_full_vectorized"]["mb_per_example"]
    assert by["dp_full"]["largest_batch"] > 4 * by["dp_full_vectorized"]["largest_batch"]


@pytest.mark.slow
def test_decoder_seq_sweep_adds_biases_to_llama_and_weights_tokens(tmp_path):
    out = tmp_path / "llama.json"
    _run(
        "--shape=tiny_llama",
        "--sweep=seq",
        "--seqs=8,16",
        "--repeats=1",
        "--warmup=1",
        "--modes=full,bitfit,dp_bitfit,dp_full",
        f"--out={out}",
    )
    sweep = json.loads(out.read_text())
    assert [r["shape"]["seq"] for r in sweep["reports"]] == [8, 16]
    for report in sweep["reports"]:
        by = {r["mode"]: r for r in report["results"]}
        # Llama has no biases: the bias modes train the added ones (a few hundred), full trains
        # the model as it is (its parameter count does not include them).
        assert 0 < by["bitfit"]["trainable_params"] == by["dp_bitfit"]["trainable_params"] < 1000
        assert by["dp_full"]["trainable_params"] == by["full"]["trainable_params"] > 10_000
        assert by["dp_full"]["peak_mem_mb"] > by["dp_bitfit"]["peak_mem_mb"] > 0


LEGACY = ["tf_keras_full", "tf_keras_bitfit", "tfp_legacy_full", "tfp_legacy_bitfit"]


def test_peer_modes_without_tf_keras_stop_before_any_step():
    # The default environment has no tf_keras (CI): asking for the peer must say how to get it.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import harness; harness.legacy_available = lambda: False;"
        "import train_step; from absl import app; sys.argv = ['train_step', '--shape=tiny', '--modes=dp_bitfit,tfp_legacy_full'];"
        "app.run(train_step.main)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(BINARY)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "uv run --extra legacy" in proc.stderr and "build + compile" not in proc.stderr


def _legacy_installed():
    import importlib.util

    return importlib.util.find_spec("tf_keras") is not None


needs_tf_keras = pytest.mark.skipif(
    not _legacy_installed(), reason="the TF Privacy peer needs the `legacy` extra (tf_keras)"
)


@needs_tf_keras
def test_tf_privacy_peer_runs_in_the_same_report(tmp_path):
    out = tmp_path / "peer.json"
    _run(
        "--shape=tiny", "--repeats=1", "--warmup=2", f"--modes=full,bitfit,dp_bitfit,{','.join(LEGACY)}", f"--out={out}"
    )
    report = json.loads(out.read_text())
    by = {r["mode"]: r for r in report["results"]}
    assert list(by) == ["full", "bitfit", "dp_bitfit", *LEGACY]
    for r in by.values():
        assert set(r) == RESULT_KEYS and r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
    # The same model in both Keras versions: same full and bias-only parameter counts.
    assert (
        by["tf_keras_full"]["trainable_params"]
        == by["tfp_legacy_full"]["trainable_params"]
        == by["full"]["trainable_params"]
    )
    assert (
        by["tf_keras_bitfit"]["trainable_params"]
        == by["tfp_legacy_bitfit"]["trainable_params"]
        == by["bitfit"]["trainable_params"]
    )
    assert by["tfp_legacy_full"]["peak_mem_mb"] > by["tf_keras_full"]["peak_mem_mb"]
    assert {"dp_bitfit/tfp_legacy_full", "dp_bitfit/tfp_legacy_bitfit", "mem dp_bitfit/tfp_legacy_full"} <= set(
        report["ratios"]
    )
    assert report["peer"]["tf_keras"].startswith("2.")
    assert "Peer modes: tf_keras" in (tmp_path / "peer.md").read_text()


@needs_tf_keras
def test_tf_privacy_peer_bitfit_moves_only_biases():
    shape = {"model": "bert", "batch": 4, "seq": 16, "layers": 1, "hidden": 32}
    script = os.path.join(ROOT, "tests", "scripts", "legacy_bitfit_check.py")
    proc = subprocess.run([sys.executable, script, json.dumps(shape)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["moved"] == result["trainable"]  # every bias moved, no kernel did
    assert len(result["trainable"]) == 11 and all(n.split("/")[-1] in ("bias:0", "beta:0") for n in result["trainable"])
    assert result["total_params"] == 991_170  # the harness's tiny BERT


@pytest.mark.slow
def test_epoch_benchmark_writes_json_table_and_plot_and_re_renders(tmp_path):
    out = tmp_path / "epoch.json"
    binary = os.path.join(ROOT, "benchmarks", "epoch.py")
    modes = ["bitfit", "dp_bitfit_pad", "dp_bitfit_c4", "dp_bitfit_auto"]
    proc = subprocess.run(
        [
            sys.executable,
            binary,
            "--shape=tiny",
            "--examples=32",
            "--epochs=1",
            f"--modes={','.join(modes)}",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    assert list(rows) == modes and report["examples"] == 32
    assert [rows[m]["chunk"] for m in modes] == [None, None, 4, 1]  # auto: a power of two near 4 / 8
    assert rows["bitfit"]["vs_non_private"] is None and rows["dp_bitfit_pad"]["vs_non_private"] > 0
    assert rows["dp_bitfit_auto"]["vs_ours"] == 1.0
    for r in rows.values():
        assert r["epoch_s_min"] == min(r["epoch_times_s"]) > 0
    table = (tmp_path / "epoch.md").read_text()
    assert table.count("| dp_bitfit_") == 3 and (tmp_path / "epoch.png").stat().st_size > 10_000
    # --render recomputes the same statistics from the saved epoch times.
    (tmp_path / "epoch.md").unlink()
    proc = subprocess.run([sys.executable, binary, f"--render={out}"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "epoch.md").read_text() == table
