"""Smoke test of the benchmark harness: tiny shape, one timed step per mode, in a subprocess
(the harness sets XLA's dump flags before TensorFlow starts)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "benchmarks", "train_step.py")
RESULT_KEYS = {"mode", "ms_per_step", "examples_per_s", "peak_mem_mb", "trainable_params", "pfor_fallback"}


def _run(*flags):
    proc = subprocess.run([sys.executable, BINARY, *flags], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_train_step_benchmark_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "tiny.json"
    _run("--shape=tiny", "--repeats=1", "--warmup=1", f"--out={out}")
    report = json.loads(out.read_text())
    assert set(report) == {"shape", "device", "results", "ratios"}
    assert [r["mode"] for r in report["results"]] == ["full", "bitfit", "dp_bitfit", "dp_bitfit_head", "dp_full"]
    by = {}
    for r in report["results"]:
        assert set(r) == RESULT_KEYS
        assert r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        by[r["mode"]] = r
    assert set(report["ratios"]) >= {"dp_bitfit/bitfit", "dp_bitfit/full", "dp_full/dp_bitfit"}
    # Trainable counts and XLA memory are exact, not timings: check what they must be.
    assert by["dp_bitfit"]["trainable_params"] == by["bitfit"]["trainable_params"] < by["dp_bitfit_head"]["trainable_params"]
    assert by["dp_full"]["trainable_params"] == by["full"]["trainable_params"]
    assert by["dp_full"]["peak_mem_mb"] > by["full"]["peak_mem_mb"] > by["bitfit"]["peak_mem_mb"]
    assert (tmp_path / "tiny.md").read_text().count("| dp_") == 3
    assert (tmp_path / "tiny.png").stat().st_size > 10_000


def test_batch_sweep_finds_a_batch_under_the_cap(tmp_path):
    out = tmp_path / "batch.json"
    _run("--shape=tiny", "--sweep=batch", "--modes=bitfit,dp_full", "--memory_cap_mb=64", f"--out={out}")
    sweep = json.loads(out.read_text())
    by = {r["mode"]: r for r in sweep["results"]}
    for r in by.values():
        assert r["mem_at_largest_mb"] <= 64
        # One more example per step would pass the cap (affine model, within one example).
        assert r["mem_at_largest_mb"] + 2 * r["mb_per_example"] > 64
    assert by["bitfit"]["largest_batch"] > by["dp_full"]["largest_batch"]
