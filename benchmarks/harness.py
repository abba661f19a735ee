"""Benchmark harness: every training mode on one model, in one process, as ratios.

Import this module before TensorFlow (the binaries in this folder do): through `xla_memory` it
points XLA's dump of buffer assignments at a temporary folder, restricted to the memory probe's
modules, so the peak memory of a compiled step can be read on CPU, where TF has no allocator
statistics. The TF Privacy-on-Keras-2 peer modes (`LEGACY_MODES`) run in a child process
(`tfp_legacy.py`) and are measured the same way.

Memory on CPU is XLA's own figure for the compiled train step ("Total bytes used" of its
buffer assignment: arguments incl. weights and optimizer slots, temporaries at their peak
liveness, outputs). It is exact for the step and needs only a compile, which is how the batch
sweep can probe batches that would take minutes to run. On GPU it is the allocator's peak
(`tf.config.experimental.get_memory_info`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import xla_memory  # noqa: I001  (sets XLA's dump flags: before TensorFlow)
from rows import VOCAB, bert_batch, result_row, time_interleaved

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The examples' support code (dpk_examples) lives beside the binaries, outside the library.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dpk_examples import recipes  # noqa: E402

tf.get_logger().setLevel("ERROR")  # per-mode retracing notices: each mode is its own function

SHAPES = {
    "small": dict(model="bert", batch=16, seq=128, layers=2, hidden=256),
    "big": dict(model="bert", batch=32, seq=256, layers=4, hidden=512),
    # ViT-Small-like width on 96x96 images (36 patches of 16x16 + class token), 4 layers.
    "vit": dict(model="vit", batch=16, image=96, patch=16, layers=4, hidden=384),
    "tiny": dict(model="bert", batch=4, seq=16, layers=1, hidden=32),
    # The epoch benchmark's default (issue 16's measurement) and the offline text task's shape
    # (MiniLM-L6-H384 at T = 64, expected batch 128; heads = hidden/64 as everywhere here).
    "epoch_small": dict(model="bert", batch=128, seq=64, layers=2, hidden=128),
    "text": dict(model="bert", batch=128, seq=64, layers=6, hidden=384),
    "tiny_vit": dict(model="vit", batch=4, image=16, patch=8, layers=1, hidden=32),
    # Decoder LMs (keras-hub causal LMs, random init, next-token loss weighted by the padding
    # mask): GPT-2 (biases, LayerNorm, tied embedding) and Llama (no biases: the bias modes add
    # them with `dpk.add_biases`; RMSNorm, grouped-query attention, untied head). A reduced width
    # and vocabulary so that T = 2,048 runs on 2 CPU cores; `--sweep=seq --seqs=128,...,2048`.
    "gpt2": dict(model="gpt2", batch=4, seq=512, layers=2, hidden=256, vocab=8192),
    "llama": dict(model="llama", batch=4, seq=512, layers=2, hidden=256, vocab=8192),
    # Per-epoch decoder shapes (benchmarks/epoch.py): expected batch 16 at T = 256.
    "gpt2_epoch": dict(model="gpt2", batch=16, seq=256, layers=2, hidden=256, vocab=8192),
    "llama_epoch": dict(model="llama", batch=16, seq=256, layers=2, hidden=256, vocab=8192),
    "tiny_gpt2": dict(model="gpt2", batch=2, seq=16, layers=1, hidden=32, vocab=128),
    "tiny_llama": dict(model="llama", batch=2, seq=16, layers=1, hidden=32, vocab=128),
}
DECODERS = ("gpt2", "llama")

# mode: (variables, private), as in the example recipes. More families: MODE_BUILDERS.
MODES = {m: recipes.METHODS[m] for m in ("full", "bitfit", "dp_bitfit", "dp_bitfit_head", "dp_full", "lora", "dp_lora")}
# The TF Privacy-on-Keras-2 peer (benchmarks/tfp_legacy.py): run in its own process, since
# TF_USE_LEGACY_KERAS must be set before TensorFlow loads; needs the `legacy` extra (tf_keras).
LEGACY_MODES = ("tf_keras_full", "tf_keras_bitfit", "tfp_legacy_full", "tfp_legacy_bitfit")
LEGACY_BINARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tfp_legacy.py")
RATIOS = [
    ("dp_bitfit", "bitfit"),
    ("dp_bitfit", "full"),
    ("dp_full", "dp_bitfit"),
    ("dp_full", "full"),
    ("dp_full_vectorized", "full"),  # DP full by per-example gradients (vectorized_map), before book-keeping
    ("dp_full", "dp_full_vectorized"),
    ("dp_full_nonoise", "full"),  # clipping alone (no noise drawn; not private)
    ("dp_full", "dp_full_nonoise"),  # what drawing the noise adds
    ("dp_lora", "lora"),
    ("dp_lora", "dp_bitfit"),
    ("dp_bitfit_head", "dp_bitfit"),
    ("dpzero", "dp_bitfit"),
    ("sparta", "dp_bitfit"),
    ("dp_full", "sparta"),
    ("dp_bitfit", "tfp_legacy_full"),
    ("dp_bitfit", "tfp_legacy_bitfit"),
    ("dp_full", "tfp_legacy_full"),
    ("tfp_legacy_full", "tf_keras_full"),
    ("tfp_legacy_bitfit", "tf_keras_bitfit"),
    ("full", "tf_keras_full"),
    ("dp_bitfit", "dp_bitfit_philox"),  # the cost of the secure noise generator
    ("dp_bitfit_vectorized", "bitfit"),  # bias gradients by vectorized_map (auto: book-keeping where it covers all)
    ("dp_bitfit", "dp_bitfit_vectorized"),
    ("dp_bitfit_bookkeeping", "bitfit"),
    ("dp_bitfit_bookkeeping", "dp_bitfit"),
    ("dp_full", "dp_full_philox"),
]
MEMORY_RATIOS = [
    ("dp_bitfit", "bitfit"),
    ("dp_bitfit_vectorized", "bitfit"),
    ("dp_full", "full"),
    ("dp_full_vectorized", "full"),
    ("dp_lora", "lora"),
    ("dp_full", "tfp_legacy_full"),
    ("dp_full", "dp_full_philox"),
    ("dp_bitfit", "tfp_legacy_full"),
    ("dp_bitfit", "tfp_legacy_bitfit"),
]


def gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def device_name() -> str:
    if gpu():
        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return details.get("device_name", "GPU")
    return f"CPU ({os.cpu_count()} cores)"


def build_base(shape: dict, trainable: str = "all") -> keras.Model:
    """A random-init keras-hub task model of the shape (same seed: same weights every call).
    Llama has no biases: for a `trainable` selection of biases it gets zero-initialised ones
    (`dpk.add_biases`; the model's outputs are unchanged)."""
    keras.utils.set_random_seed(0)
    if shape["model"] == "bert":
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=VOCAB,
            num_layers=shape["layers"],
            num_heads=max(shape["hidden"] // 64, 1),
            hidden_dim=shape["hidden"],
            intermediate_dim=4 * shape["hidden"],
            max_sequence_length=shape["seq"],
        )
        return keras_hub.models.BertTextClassifier(backbone, num_classes=2, preprocessor=None)
    if shape["model"] == "vit":
        backbone = keras_hub.models.ViTBackbone(
            image_shape=(shape["image"], shape["image"], 3),
            patch_size=shape["patch"],
            num_layers=shape["layers"],
            num_heads=max(shape["hidden"] // 64, 1),
            hidden_dim=shape["hidden"],
            mlp_dim=4 * shape["hidden"],
        )
        model = keras_hub.models.ViTImageClassifier(backbone, num_classes=10, preprocessor=None)
        model(tf.zeros((1, shape["image"], shape["image"], 3)))
        return model
    if shape["model"] in DECODERS:
        heads = max(shape["hidden"] // 64, 1)
        if shape["model"] == "gpt2":
            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=shape["vocab"],
                num_layers=shape["layers"],
                num_heads=heads,
                hidden_dim=shape["hidden"],
                intermediate_dim=4 * shape["hidden"],
                dropout=0.0,
                max_sequence_length=shape["seq"],
            )
            model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
        else:
            backbone = keras_hub.models.LlamaBackbone(
                vocabulary_size=shape["vocab"],
                num_layers=shape["layers"],
                num_query_heads=heads,
                num_key_value_heads=max(heads // 2, 1),
                hidden_dim=shape["hidden"],
                intermediate_dim=64 * round(8 * shape["hidden"] / 3 / 64),  # Llama's SwiGLU width
            )
            model = keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)
        x, _, _ = batch(shape, 1)
        model(x)
        if shape["model"] == "llama" and "bias" in trainable:
            dpk.add_biases(model)
        return model
    raise ValueError(f"unknown model kind {shape['model']!r}")


def batch(shape: dict, batch_size: int | None = None):
    """A fixed synthetic batch (timing and memory do not depend on the values): `(x, y)`, or for
    decoders `(x, y, w)` with per-token weights `w` (the padding mask; the last quarter of every
    sequence is padding)."""
    b = batch_size or shape["batch"]
    if shape["model"] == "bert":
        return bert_batch(b, shape["seq"])
    if shape["model"] in DECODERS:
        t = shape["seq"]
        ids = tf.random.stateless_uniform((b, t + 1), (1, 2), 1, shape["vocab"], tf.int32)
        mask = tf.tile(tf.range(t)[None] < t - t // 4, [b, 1])
        x = {"token_ids": ids[:, :-1], "padding_mask": mask}
        return x, ids[:, 1:], tf.cast(mask, tf.float32)
    s = shape["image"]
    x = tf.random.stateless_uniform((b, s, s, 3), (1, 2))
    return x, tf.random.stateless_uniform((b,), (3, 4), 0, 10, tf.int32)


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _private(
    model,
    inner,
    l2_norm_clip,
    shape,
    noise_generator="chacha20",
    gradient_method="auto",
    optimizer_class=dpk.DPOptimizer,
):
    """Compiles a DPModel for one step of the benchmark: σ = 1, q = batch / 10,000, secret keys."""
    model.compile(
        optimizer=optimizer_class(
            inner, l2_norm_clip=l2_norm_clip, noise_multiplier=1.0, noise_generator=noise_generator
        ),
        loss=_loss(),
        gradient_method=gradient_method,
    )
    model.optimizer.build(model.trainable_variables)
    model.optimizer.begin_run(
        sampling_rate=shape["batch"] / 10000, expected_batch_size=shape["batch"], planned_steps=100
    )
    return model


def _build_standard(shape, mode):
    # `<mode>_philox`: the same step with TF's Philox noise instead of the secure ChaCha20 sum of
    # 4 Gaussians (not private against a strong adversary): what the secure generator costs.
    # `<mode>_vectorized`: per-example gradients of every variable by vectorized_map (the path
    # before book-keeping), for comparison.
    base_mode, generator = (mode[: -len("_philox")], "philox") if mode.endswith("_philox") else (mode, "chacha20")
    # `<mode>_bookkeeping`: every covered variable (biases included) by book-keeping.
    base_mode, method = next(
        ((base_mode[: -len(f"_{m}")], m) for m in ("vectorized", "bookkeeping") if base_mode.endswith(f"_{m}")),
        (base_mode, "auto"),
    )
    trainable, private = MODES[base_mode]
    base = build_base(shape, trainable)
    if trainable.startswith("lora"):
        dpk.enable_lora(base, recipes.LORA_RANK)
    if private:
        return _private(
            dpk.DPModel(base, trainable=trainable), keras.optimizers.Adam(1e-3), 1.0, shape, generator, method
        )
    dpk.selection.apply_selection(base, dpk.select_variables(base, trainable))
    base.compile(optimizer=keras.optimizers.Adam(1e-3), loss=_loss(), jit_compile=True)
    return base


def _build_dpzero(shape, mode):
    model = dpk.methods.dpzero(build_base(shape), trainable="all")
    return _private(model, keras.optimizers.SGD(1e-6), recipes.DPZERO_CLIP, shape)


def _build_sparta(shape, mode, density=0.2):
    """SPARTA's phase-2 step: DP-SGD on 20% of the rows of the non-embedding kernels (a fixed
    random choice here; the selection phase costs what dp_full without embeddings costs)."""
    base = build_base(shape)
    candidates = [v for v in base.weights if dpk.methods.sparta_module.default_candidates(v)]
    rng = np.random.RandomState(0)
    masks = dpk.methods.sparta_module.select_rows([rng.rand(*v.shape).astype("float32") for v in candidates], density)
    keep = {id(v): m for v, m in zip(candidates, masks) if m.any()}
    model = _private(
        dpk.DPModel(base, trainable=lambda v: id(v) in keep),
        keras.optimizers.Adam(1e-3),
        1.0,
        shape,
        optimizer_class=dpk.methods.sparta_module.SparseDPOptimizer,
    )
    model.optimizer.gradient_masks = [tf.constant(keep[id(v)]) for v in model.selection.variables]
    return model


class _NoNoiseQuery(dpk.privacy.queries.SeededGaussianSumQuery):
    """Benchmark only, NOT private: releases the clipped sum without drawing noise, to separate
    what clipping costs from what drawing one Gaussian per trained parameter costs."""

    def get_noised_result(self, sample_state, global_state):
        import dp_accounting

        return sample_state, global_state, dp_accounting.GaussianDpEvent(0.0)


def _build_no_noise(shape, mode):
    model = _build_standard(shape, mode[: -len("_nonoise")])
    model.optimizer._query = _NoNoiseQuery(1.0, 0.0)
    return model


# mode -> builder(shape, mode) returning a compiled model whose train_on_batch / train_step is
# one step of that mode. Other method families add theirs here.
MODE_BUILDERS = {mode: _build_standard for mode in MODES}
MODE_BUILDERS.update({f"{mode}_philox": _build_standard for mode in ("dp_bitfit", "dp_full")})
MODE_BUILDERS.update(
    {f"{mode}_vectorized": _build_standard for mode in ("dp_full", "dp_lora", "dp_bitfit", "dp_bitfit_head")}
)
MODE_BUILDERS.update({f"{mode}_bookkeeping": _build_standard for mode in ("dp_bitfit", "dp_bitfit_head")})
MODE_BUILDERS.update({f"{mode}_nonoise": _build_no_noise for mode in ("dp_full", "dp_lora")})
MODE_BUILDERS["dpzero"] = _build_dpzero
MODE_BUILDERS["sparta"] = _build_sparta


def legacy_available() -> bool:
    return importlib.util.find_spec("tf_keras") is not None


def check_modes(shape: dict, modes, sweep: str = "none") -> None:
    """Raises before anything is built: unknown modes, or peer modes that cannot run here."""
    unknown = [m for m in modes if m not in MODE_BUILDERS and m not in LEGACY_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; known: {sorted(MODE_BUILDERS) + list(LEGACY_MODES)}")
    legacy = [m for m in modes if m in LEGACY_MODES]
    if not legacy:
        return
    if not legacy_available():
        raise ValueError(
            f"{legacy} need tf_keras, which the default environment does not install: run with the "
            "optional extra, `uv run --extra legacy python benchmarks/train_step.py ...`."
        )
    if shape["model"] != "bert":
        raise ValueError(f"{legacy}: the tf_keras peer builds BERT shapes only; got {shape['model']!r}.")
    if sweep == "batch":
        raise ValueError(f"{legacy}: the batch sweep runs in-process modes only.")


def run_legacy(shape: dict, modes, repeats: int, warmup: int, log=print, epoch_examples: int = 0) -> dict:
    """Runs peer modes in a child process (TF_USE_LEGACY_KERAS=1); returns its report.
    `epoch_examples` > 0: times `repeats` fit epochs over that many examples instead of steps."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "legacy.json")
        cmd = [
            sys.executable,
            LEGACY_BINARY,
            f"--shape_json={json.dumps(shape)}",
            f"--modes={','.join(modes)}",
            f"--repeats={repeats}",
            f"--warmup={warmup}",
            f"--epoch_examples={epoch_examples}",
            f"--timed_epochs={repeats}",
            f"--out={out}",
        ]
        log(f"[{', '.join(modes)}] in a tf_keras process ...")
        proc = subprocess.run(
            cmd,
            env=dict(os.environ, TF_USE_LEGACY_KERAS="1"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if proc.returncode:
            raise RuntimeError(f"the tf_keras peer failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def build(shape: dict, mode: str) -> keras.Model:
    if mode not in MODE_BUILDERS:
        raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODE_BUILDERS)}")
    return MODE_BUILDERS[mode](shape, mode)


def trainable_params(model) -> int:
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def xla_step_memory_mb(model, *data) -> float | None:
    """Peak memory of `model.train_step(data)` compiled by XLA (compile only, nothing runs)."""
    return xla_memory.step_memory_mb(model.train_step, *data)


def run_modes(shape: dict, modes, repeats: int = 5, warmup: int = 2, log=print) -> dict:
    """Times the modes interleaved on one batch; returns the report (JSON shape of the issue).

    Peer modes (`LEGACY_MODES`) run after ours in a tf_keras child process, same shape, batch,
    repeats and machine; their results join the same list and ratios.
    """
    check_modes(shape, modes)
    legacy = [m for m in modes if m in LEGACY_MODES]
    ours = [m for m in modes if m not in LEGACY_MODES]
    data = batch(shape)
    runners, info = {}, {}
    for mode in ours:
        log(f"[{mode}] build + compile ...")
        if gpu():
            tf.config.experimental.reset_memory_stats("GPU:0")
        model = build(shape, mode)
        for _ in range(warmup):
            model.train_on_batch(*data)
        per_example = isinstance(model, dpk.DPModel) and not isinstance(model, dpk.methods.DPZeroModel)
        fallback = bool(dpk.last_pfor_fallbacks()) if per_example else False
        if gpu():
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        else:
            peak = xla_step_memory_mb(model, *data)
        runners[mode] = model
        info[mode] = dict(trainable_params=trainable_params(model), pfor_fallback=fallback, peak_mem_mb=peak, times=[])
    for mode, times in time_interleaved(runners, data, repeats, log).items():
        info[mode]["times"] = times
    by_mode = {
        mode: result_row(mode, r["times"], shape["batch"], r["peak_mem_mb"], r["trainable_params"], r["pfor_fallback"])
        for mode, r in info.items()
    }
    peer = None
    if legacy:
        peer = run_legacy(shape, legacy, repeats, warmup, log)
        by_mode.update({r["mode"]: r for r in peer.pop("results")})
    results = [by_mode[m] for m in modes]
    report = {"shape": dict(shape), "device": device_name(), "results": results, "ratios": ratios(results)}
    if peer:
        report["peer"] = dict(peer, process="separate, TF_USE_LEGACY_KERAS=1, after ours")
    return report


def ratios(results) -> dict:
    by = {r["mode"]: r["ms_per_step"] for r in results}
    mem = {r["mode"]: r["peak_mem_mb"] for r in results}
    out = {}
    for a, b in RATIOS:
        if a in by and b in by:
            out[f"{a}/{b}"] = round(by[a] / by[b], 3)
    for a, b in MEMORY_RATIOS:
        if mem.get(a) and mem.get(b):
            out[f"mem {a}/{b}"] = round(mem[a] / mem[b], 3)
    return out


def markdown(report: dict) -> str:
    lines = [
        f"Shape: {json.dumps(report['shape'])}; device: {report['device']}",
        "",
        "| mode | ms/step | examples/s | peak MB | trainable params | pfor fallback |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        mem = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.1f} | {mem} | "
            f"{r['trainable_params']:,} | {r['pfor_fallback']} |"
        )
    lines += ["", "Ratios (step time): " + ", ".join(f"{k} = {v}" for k, v in report["ratios"].items())]
    if "peer" in report:
        peer = report["peer"]
        lines += ["", f"Peer modes: tf_keras {peer['tf_keras']}, TensorFlow {peer['tensorflow']}, {peer['process']}."]
    return "\n".join(lines) + "\n"


# --- Sweeps ---------------------------------------------------------------------------------


def seq_sweep(shape: dict, modes, seqs, repeats=3, warmup=1, log=print) -> dict:
    """`run_modes` at each sequence length (BERT and decoder shapes)."""
    reports = []
    for t in seqs:
        log(f"== seq {t}")
        reports.append(run_modes(dict(shape, seq=int(t)), modes, repeats=repeats, warmup=warmup, log=log))
    return {"sweep": "seq", "reports": reports}


MAX_PROBE_BATCH = 1 << 16


def largest_batch(shape: dict, mode: str, cap_mb: float, probes=(8, 16), log=print) -> dict:
    """Largest batch whose compiled step fits in `cap_mb` (XLA's buffer assignment; compile only).

    Memory is affine in the batch size: fit it on two probe batches, jump to the predicted
    largest batch, and correct downwards until the compiled step fits.
    """
    model = build(shape, mode)
    model.train_on_batch(*batch(shape, 2))  # builds the optimizer's slots
    for _ in range(3):
        mem = {b: xla_step_memory_mb(model, *batch(shape, b)) for b in probes}
        if any(v is None for v in mem.values()):
            raise RuntimeError("XLA memory dump not available: import harness before TensorFlow.")
        b0, b1 = probes
        per_example = (mem[b1] - mem[b0]) / (b1 - b0)
        if per_example * b1 >= 0.05 * mem[b1]:
            break
        # Fixed buffers (weights, optimizer slots, noise) hide the per-example growth at small
        # probes (book-keeping's per-example memory is small): probe further apart.
        probes = (b1, 8 * b1)
    fixed = mem[b0] - b0 * per_example
    guess = max(1, min(MAX_PROBE_BATCH, int((cap_mb - fixed) / max(per_example, 1e-9))))
    for _ in range(6):
        used = xla_step_memory_mb(model, *batch(shape, guess))
        log(f"[{mode}] batch {guess}: {used:.0f} MB (cap {cap_mb:.0f})")
        if used <= cap_mb:
            break
        guess = max(1, int(guess * min(0.99, (cap_mb - fixed) / (used - fixed))))
    else:
        raise RuntimeError(f"could not fit {mode} under {cap_mb} MB")
    return {
        "mode": mode,
        "largest_batch": guess,
        "mem_at_largest_mb": round(used, 1),
        "mb_per_example": round(per_example, 3),
        "fixed_mb": round(fixed, 1),
    }


def batch_sweep(shape: dict, modes, cap_mb: float, log=print) -> dict:
    results = [largest_batch(shape, m, cap_mb, log=log) for m in modes]
    by = {r["mode"]: r["largest_batch"] for r in results}
    ratios = {}
    for a, b in [("dp_bitfit", "dp_full"), ("dp_bitfit", "bitfit"), ("dp_full", "full")]:
        if a in by and b in by:
            ratios[f"largest_batch {a}/{b}"] = round(by[a] / by[b], 2)
    return {
        "sweep": "batch",
        "shape": dict(shape),
        "device": device_name(),
        "memory_cap_mb": cap_mb,
        "results": results,
        "ratios": ratios,
    }


def seq_markdown(sweep: dict) -> str:
    modes = [r["mode"] for r in sweep["reports"][0]["results"]]
    lines = ["| seq | " + " | ".join(f"{m} ms / MB" for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for rep in sweep["reports"]:
        cells = [f"{r['ms_per_step']:.0f} / {r['peak_mem_mb'] or float('nan'):.0f}" for r in rep["results"]]
        lines.append(f"| {rep['shape']['seq']} | " + " | ".join(cells) + " |")
    keys = [k for k in SEQ_RATIOS if all(k in rep["ratios"] for rep in sweep["reports"])]
    if keys:  # the ratios per length: step time, then memory
        lines += ["", "| seq | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for rep in sweep["reports"]:
            lines.append(f"| {rep['shape']['seq']} | " + " | ".join(f"{rep['ratios'][k]:.2f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


SEQ_RATIOS = (
    "dp_bitfit/bitfit",
    "dp_bitfit_vectorized/bitfit",
    "dp_lora/lora",
    "dp_full/full",
    "dp_bitfit/full",
    "mem dp_bitfit/bitfit",
    "mem dp_bitfit_vectorized/bitfit",
    "mem dp_lora/lora",
    "mem dp_full/full",
)


def batch_markdown(sweep: dict) -> str:
    lines = [
        f"Largest batch under {sweep['memory_cap_mb']:.0f} MB ({sweep['device']}, shape {json.dumps(sweep['shape'])})",
        "",
        "| mode | largest batch | MB at that batch | MB per example | fixed MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in sweep["results"]:
        lines.append(
            f"| {r['mode']} | {r['largest_batch']} | {r['mem_at_largest_mb']:.0f} | {r['mb_per_example']:.2f} | {r['fixed_mb']:.0f} |"
        )
    lines += ["", ", ".join(f"{k} = {v}" for k, v in sweep["ratios"].items())]
    return "\n".join(lines) + "\n"


# --- Plots --------------------------------------------------------------------------------


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(mode: str) -> str:
    """Ours private: blue; TF Privacy peer (private): orange; non-private (ours, tf_keras): greys."""
    if mode.startswith("tfp_legacy"):
        return "#ff7f0e"
    if mode.startswith("tf_keras"):
        return "#bbb"
    return "#888" if mode in ("full", "bitfit", "bitfit_head") else "#1f77b4"


def plot_report(report: dict, path: str):
    plt = _pyplot()
    modes = [r["mode"] for r in report["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "ms_per_step", "ms / step"), (axes[1], "peak_mem_mb", "peak memory (MB)")]:
        values = [r[key] or 0 for r in report["results"]]
        bars = ax.bar(modes, values, color=[_colour(m) for m in modes])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=40)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
    s = report["shape"]
    fig.suptitle(
        f"{s.get('model')} {json.dumps({k: v for k, v in s.items() if k != 'model'})} — {report['device']}", fontsize=9
    )
    _save(plt, fig, path)


def plot_seq(sweep: dict, path: str):
    plt = _pyplot()
    seqs = [rep["shape"]["seq"] for rep in sweep["reports"]]
    modes = [r["mode"] for r in sweep["reports"][0]["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        rows = [next(r for r in rep["results"] if r["mode"] == mode) for rep in sweep["reports"]]
        axes[0].plot(seqs, [r["ms_per_step"] for r in rows], marker="o", label=mode)
        axes[1].plot(seqs, [r["peak_mem_mb"] for r in rows], marker="o", label=mode)
    for ax, label in [(axes[0], "ms / step"), (axes[1], "peak memory (MB)")]:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"time and memory vs sequence length — {sweep['reports'][0]['device']}", fontsize=9)
    _save(plt, fig, path)


def plot_batch(sweep: dict, path: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    modes = [r["mode"] for r in sweep["results"]]
    bars = ax.bar(modes, [r["largest_batch"] for r in sweep["results"]])
    ax.bar_label(bars, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"largest batch under {sweep['memory_cap_mb']:.0f} MB")
    ax.tick_params(axis="x", rotation=30)
    _save(plt, fig, path)
