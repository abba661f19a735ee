"""MultiWorkerMirroredStrategy with real worker processes on the loopback address.

Each test starts its workers as subprocesses (tests/scripts/multiworker.py) on free 127.0.0.1
ports, with a hard time limit; they never use any other address.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "multiworker.py")
LIMIT_S = 240


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(index, ports, out, *args):
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(index), ports, str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _cluster(tmp_path, name, *args, workers=2):
    """Runs `workers` worker processes to the end; returns [(returncode, result or None, seconds)]."""
    ports = ",".join(map(str, _free_ports(workers)))
    start = time.monotonic()
    procs = [_start(i, ports, tmp_path / f"{name}_{i}.json", *args) for i in range(workers)]
    results = []
    for i, proc in enumerate(procs):
        try:
            log, _ = proc.communicate(timeout=max(1.0, LIMIT_S - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{name}: worker {i} did not finish within {LIMIT_S} s")
        path = tmp_path / f"{name}_{i}.json"
        result = json.loads(path.read_text()) if path.exists() else None
        results.append((proc.returncode, result, time.monotonic() - start, log[-3000:]))
    return results


def _max_error(a, b):
    return max(float(np.abs(np.array(u) - np.array(v)).max()) for u, v in zip(a, b))


@pytest.mark.slow
def test_two_workers_train_as_one_process_and_resume_after_a_killed_worker(tmp_path):
    # σ > 0 with an explicit seed (so runs can be compared), accumulation 2, every weight
    # trained (book-keeping): 4 epochs of 6 Poisson batches.
    common = [
        "--sigma",
        "1.0",
        "--seed",
        "5",
        "--accumulation",
        "2",
        "--trainable",
        "all",
        "--epochs",
        "4",
        "--heartbeat_timeout",
        "10",
    ]
    single = subprocess.Popen(
        [sys.executable, SCRIPT, "0", "-", str(tmp_path / "single.json"), *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    straight = _cluster(
        tmp_path, "straight", *common, "--backup", str(tmp_path / "backup_straight"), "--mismatched_seeds_first"
    )
    log, _ = single.communicate(timeout=LIMIT_S)
    assert single.returncode == 0, log[-3000:]
    reference = json.loads((tmp_path / "single.json").read_text())
    for rc, result, _, log in straight:
        assert rc == 0, log
        # First a fit with seeds 1 and 2 on the two workers: refused before any step, naming it.
        assert "disagree" in result["mismatched_seeds"] and "noise_seed: [1.0, 2.0]" in result["mismatched_seeds"]
        assert result["replicas"] == 2
        assert result["dp_steps"] == reference["dp_steps"] == 24
        assert result["epsilon"] == pytest.approx(reference["epsilon"], rel=1e-12)
        # The same noise (same key, added once per global step) and the same batches.
        assert _max_error(result["weights"], reference["weights"]) < 1e-5
    assert _max_error(straight[0][1]["weights"], straight[1][1]["weights"]) == 0.0

    # Worker 1 is killed after 9 steps; worker 0 must fail too, in bounded time (heartbeat).
    backup = str(tmp_path / "backup")
    killed = _cluster(tmp_path, "killed", *common, "--backup", backup, "--kill_after_steps", "9", "--kill_worker", "1")
    assert killed[1][0] == -signal.SIGKILL, killed[1][3]
    assert killed[0][0] not in (0, None) and killed[0][1] is None, killed[0][3]
    # Whichever notices first: the coordination service's heartbeat ("unhealthy" task) or the
    # step's collective, whose connection to the dead peer closes (gRPC UNAVAILABLE).
    survivor = killed[0][3].lower()
    assert any(sign in survivor for sign in ("unhealthy", "heartbeat", "socket closed", "unavailable")), killed[0][3]
    # Restarted (same command, same backup directories): the uninterrupted run's steps, ε, weights.
    resumed = _cluster(tmp_path, "resumed", *common, "--backup", backup)
    for (rc, result, _, log), (_, full, _, _) in zip(resumed, straight):
        assert rc == 0, log
        assert result["dp_steps"] == 24
        assert result["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
        assert _max_error(result["weights"], full["weights"]) < 1e-6


def test_a_worker_whose_peer_never_comes_fails_fast(tmp_path):
    (port, other) = _free_ports(2)
    start = time.monotonic()
    proc = _start(0, f"{port},{other}", tmp_path / "alone.json", "--connect_timeout", "3")
    log, _ = proc.communicate(timeout=LIMIT_S)
    assert proc.returncode == 3, log[-3000:]
    result = json.loads((tmp_path / "alone.json").read_text())
    assert result["error"] == "WorkerUnreachableError"
    assert f"worker 1 at 127.0.0.1:{other}" in result["message"] and "within 3 s" in result["message"]
    assert time.monotonic() - start < 120  # import + 3 s, never the strategy's unbounded wait


@pytest.mark.slow
def test_launcher_example_two_local_workers_agree_on_secret_keys(tmp_path):
    example = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "multi_worker.py")
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            example,
            "--local_workers=2",
            "--epochs=2",
            "--batch_size=128",
            "--method=dp_full",
            "--pretrain_epochs=2",
            f"--summary_json={summary}",
            f"--export_dir={tmp_path / 'export'}",
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"summary.json.{i}").read_text()) for i in range(2))
    assert a["workers"] == b["workers"] == 2 and a["worker"] == 0 and b["worker"] == 1
    assert a["dp_steps"] == b["dp_steps"] > 0 and a["epsilon"] == b["epsilon"] <= 8.0 + 1e-6
    # Secret keys from the OS (no seed), agreed over the cluster: the same noise and batches on
    # both workers, so the same trained weights.
    assert a["weights_fingerprint"] == b["weights_fingerprint"]
    assert (tmp_path / "export" / "saved_model.pb").exists()  # worker 0 exports
