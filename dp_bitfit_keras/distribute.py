"""Several workers: `tf.distribute.MultiWorkerMirroredStrategy` for DP training.

What `DPModel.fit` does under a multi-worker strategy (and why it is the single-process
mechanism):

- **One global Poisson batch per step, split once.** Every worker runs the same sampler (same
  key, same step counter) and so draws the same padded global batch; the dataset is sharded by
  *data* (`AutoShardPolicy.DATA`): `experimental_distribute_dataset` cuts each global batch into
  one slice per replica and each worker keeps its own replicas' slices. File sharding or whole
  batches per worker would sample each worker's data separately, another mechanism: refused.
- **Keys agreed without being written anywhere**: the noise key and the sampling key of worker
  0's first replica are sent to every replica by one all-reduce over the cluster's collective
  channel (the others contribute zeros), the channel that already carries the unnoised clipped
  sums, so it adds nothing to what an observer of that channel could learn. Every replica then
  draws the *same* noise of σC once per global step; per-replica shares that sum to σC would
  work too, but one shared draw keeps the released value bit-identical on every worker and the
  noise stream the single-process one.
- **One ledger**: clipped sums are all-reduced before the noise; every replica's optimizer counts
  the same global steps, so every worker reports the same ε. Facts that must agree (dataset size,
  sampling rate, batch, steps, seed, accumulation, σ or target ε, clip, steps already taken, a
  fingerprint of the starting weights) are gathered from every worker before any step, and again
  after any `BackupAndRestore` restore; a mismatch is a `ValueError` naming it.

`multi_worker_strategy()` builds the strategy with bounded waits: peers that cannot be reached
raise `WorkerUnreachableError` after `connect_timeout` seconds instead of blocking; a peer that
dies mid-run is reported by the coordination service after `heartbeat_timeout` seconds (every
other worker's step fails with "tasks are unhealthy"), and a collective that is never answered
fails after `collective_timeout` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import numpy as np
import tensorflow as tf


class WorkerUnreachableError(RuntimeError):
    """A worker of the `TF_CONFIG` cluster did not answer within the timeout."""


def num_workers(strategy) -> int:
    """Workers of a multi-worker strategy (1 for any other strategy)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in spec.jobs if job in ("chief", "worker")) or 1


def is_multi_worker(strategy) -> bool:
    return num_workers(strategy) > 1


def worker_index(strategy) -> int:
    """This worker's index in the cluster (0 on a single worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy):
        return 0
    return int(resolver.task_id or 0) + (
        1 if resolver.task_type == "worker" and "chief" in resolver.cluster_spec().jobs else 0
    )


def _replica_run(strategy, fn, *args):
    """`strategy.run(fn)` in a tf.function; the first local replica's results as NumPy."""

    @tf.function(autograph=False)
    def run():
        return strategy.run(fn, args=args)

    result = run()
    return tf.nest.map_structure(lambda t: strategy.experimental_local_results(t)[0].numpy(), result)


def broadcast_from_first_replica(strategy, values: list[np.ndarray]) -> list[np.ndarray]:
    """Every replica gets the first replica's `values` (int64 arrays), by one all-reduce."""
    tensors = [tf.constant(np.asarray(v, np.int64)) for v in values]

    def share():
        context = tf.distribute.get_replica_context()
        first = tf.cast(tf.equal(context.replica_id_in_sync_group, 0), tf.int64)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, [t * first for t in tensors])

    return list(_replica_run(strategy, share))


def gather_facts(strategy, facts: dict) -> np.ndarray:
    """`[replicas, len(facts)]`: every replica's values of `facts` (float64), in order."""
    vector = tf.constant([float(v) for v in facts.values()], tf.float64)

    def gather():
        return tf.distribute.get_replica_context().all_gather(vector[None], axis=0)

    return _replica_run(strategy, gather)


def check_workers_agree(strategy, facts: dict) -> None:
    """Raises `ValueError` naming the facts on which the workers' replicas disagree."""
    table = gather_facts(strategy, facts)
    names = list(facts)
    differ = [names[j] for j in range(len(names)) if not np.all(table[:, j] == table[0, j])]
    if differ:
        rows = "; ".join(f"{name}: {table[:, names.index(name)].tolist()}" for name in differ)
        raise ValueError(
            "The workers disagree on what this run is (one value per replica, in replica order): "
            f"{rows}. Start every worker with the same data, flags and seed (or none), and restore "
            "every worker from the same backup."
        )


def fingerprint(variables) -> float:
    """A float64 summary of the variables' values: equal on workers holding equal weights."""
    return float(sum((k + 1) * np.asarray(v.numpy(), np.float64).sum() for k, v in enumerate(variables)))


def _tf_config() -> dict:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError("multi_worker_strategy needs TF_CONFIG (the cluster and this worker's task).")
    return json.loads(raw)


def wait_for_workers(connect_timeout: float = 60.0, poll: float = 0.2) -> None:
    """Rendezvous: returns once every other worker of `TF_CONFIG`'s cluster is up.

    While waiting, this worker listens on its own address, so workers started in any order see
    each other; a peer counts as up once its address accepts a TCP connection (its rendezvous
    listener, or TF's server once it has moved on). Raises `WorkerUnreachableError` naming the
    workers still unreachable after `connect_timeout` seconds: TF's own start-up would wait for
    them without a bound.
    """
    config = _tf_config()
    task = config.get("task", {})
    me = (task.get("type"), int(task.get("index", 0)))
    cluster = config.get("cluster", {})
    peers = [
        (job, i, address)
        for job in ("chief", "worker")
        for i, address in enumerate(cluster.get(job, []))
        if (job, i) != me
    ]
    host, _, port = cluster[me[0]][me[1]].rpartition(":")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, int(port)))
    except OSError as e:
        listener.close()
        raise WorkerUnreachableError(f"This worker's address {host}:{port} is not free: {e}.") from e
    listener.listen(len(peers) + 1)
    deadline = time.monotonic() + connect_timeout
    waiting = list(peers)
    try:
        while waiting:
            still = []
            for job, i, address in waiting:
                peer_host, _, peer_port = address.rpartition(":")
                try:
                    with socket.create_connection((peer_host, int(peer_port)), timeout=1.0):
                        pass
                except OSError:
                    still.append((job, i, address))
            waiting = still
            if waiting and time.monotonic() > deadline:
                names = ", ".join(f"{job} {i} at {address}" for job, i, address in waiting)
                raise WorkerUnreachableError(
                    f"Could not reach {names} within {connect_timeout:g} s. Check that every worker was "
                    "started with the same TF_CONFIG cluster and that the addresses are reachable."
                )
            if waiting:
                time.sleep(poll)
        # Peers still in their own rendezvous need to reach this worker too: stay up briefly.
        time.sleep(min(2.0, 10 * poll))
    finally:
        listener.close()


def multi_worker_strategy(
    connect_timeout: float = 60.0, collective_timeout: float | None = 300.0, heartbeat_timeout: float = 30.0
):
    """`MultiWorkerMirroredStrategy` from `TF_CONFIG`, with bounded waits.

    Every worker calls this with the same cluster. If the cluster has not formed after
    `connect_timeout` seconds (a worker missing, or at the wrong address) this raises
    `WorkerUnreachableError` instead of waiting forever; a peer that stops answering during
    training is detected by the coordination service's heartbeat after `heartbeat_timeout`
    seconds, and a collective (the per-step all-reduce) fails after `collective_timeout`.
    """
    import faulthandler

    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    wait_for_workers(connect_timeout)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec()
    # The strategy would configure TF's coordination service with no registration deadline
    # (start-up waits for missing workers without bound); configure it first, with ours.
    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
        for job in ("chief", "worker")
        if job in spec.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(spec),
        coordinated_jobs=jobs,
        cluster_register_timeout_in_ms=int(1000 * connect_timeout),
        heartbeat_timeout_in_ms=int(1000 * heartbeat_timeout),
    )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    # Every peer answered the rendezvous; should one vanish before the cluster forms, TF's
    # start-up (which holds the interpreter) would wait without bound: a C-level watchdog
    # ends the process after `connect_timeout` more seconds, printing where it was.
    print(
        f"dp_bitfit_keras: all workers reachable; forming the cluster (at most {connect_timeout:g} s).",
        file=sys.stderr,
        flush=True,
    )
    faulthandler.dump_traceback_later(connect_timeout, exit=True)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)
    finally:
        faulthandler.cancel_dump_traceback_later()


__all__ = [
    "WorkerUnreachableError",
    "broadcast_from_first_replica",
    "check_workers_agree",
    "fingerprint",
    "is_multi_worker",
    "multi_worker_strategy",
    "num_workers",
    "wait_for_workers",
    "worker_index",
]
