"""PyTorch + Opacus on the same shapes as `benchmarks/train_step.py` (BERT and the decoders), same JSON format.

    cd benchmarks/peers && uv run python opacus_bench.py --shape=small --out=../results/cpu_small_opacus.json

Modes: `torch_full` (non-private full fine-tuning), `torch_bitfit` (non-private, biases only),
`opacus_dp_bitfit` (Opacus DP-SGD on the biases), `opacus_dp_full` (Opacus DP-SGD on all
weights, per-sample gradients by hooks), `opacus_dp_full_ghost` (all weights, Opacus' fast
gradient clipping with ghost norms: `GradSampleModuleFastGradientClipping`, no per-sample
gradients stored, a second backward pass), `opacus_dp_full_ghost_secure` (the same with
`secure_mode=True` noise: each value the sum of 4 `torch.normal` draws, Opacus' floating-point
defence; its generator is PyTorch's, not a cryptographic one). Model: Hugging Face `BertForSequenceClassification`, random init, the shape's layers,
hidden size, heads = hidden/64, intermediate 4x hidden, vocabulary 30,522, 2 classes — the
keras-hub model of the main harness; decoder shapes: `GPT2LMHeadModel` / `LlamaForCausalLM` of the
main harness' sizes (Llama's bitfit modes with zero-initialised biases, `attention_bias` and
`mlp_bias`), next-token loss averaged over each sequence's non-padding tokens. Adam, one fixed batch, modes interleaved over the timed
repetitions, warm-up excluded, all CPU threads.

Memory: each mode runs once more in a fresh child process: one warm-up step on a 1-example
batch, then RSS sampled every millisecond through two real steps; the figure is that peak minus
the RSS before them. PyTorch has no CPU allocator statistics; this is coarser than the main
harness's XLA figure (allocator caching can hide reuse), so compare memory *ratios within* each
framework, not MB across them.
"""

import json
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rows  # noqa: E402  (benchmarks/rows.py: imports no TensorFlow at module level)

SHAPES = {
    "small": dict(model="bert", batch=16, seq=128, layers=2, hidden=256),
    "big": dict(model="bert", batch=32, seq=256, layers=4, hidden=512),
    "tiny": dict(model="bert", batch=4, seq=16, layers=1, hidden=32),
    # The main harness' decoder shapes (benchmarks/harness.py: SHAPES["gpt2"], ["llama"]).
    "gpt2": dict(model="gpt2", batch=4, seq=512, layers=2, hidden=256, vocab=8192),
    "llama": dict(model="llama", batch=4, seq=512, layers=2, hidden=256, vocab=8192),
    "tiny_gpt2": dict(model="gpt2", batch=2, seq=16, layers=1, hidden=32, vocab=128),
    "tiny_llama": dict(model="llama", batch=2, seq=16, layers=1, hidden=32, vocab=128),
}
DECODERS = ("gpt2", "llama")
MODES = ("torch_full", "torch_bitfit", "opacus_dp_bitfit", "opacus_dp_full", "opacus_dp_full_ghost",
         "opacus_dp_full_ghost_secure")

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "small", list(SHAPES), "Model/batch shape (same names as the main harness).")
flags.DEFINE_list("modes", list(MODES), "Modes to run.")
flags.DEFINE_integer("repeats", 5, "Timed steps per mode (interleaved).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per mode first.")
flags.DEFINE_string("shape_json", None, "A shape as a JSON dict (overrides --shape).")
flags.DEFINE_integer("epoch_examples", 0, "Time epochs over this many synthetic examples instead of steps: "
                     "torch_* shuffled batches, opacus_* Poisson-sampled (Opacus' DPDataLoader).")
flags.DEFINE_bool("memory", True, "Measure each mode's peak RSS in a child process.")
flags.DEFINE_string("out", None, "Write the JSON results here (and Markdown beside it).")
flags.DEFINE_string("render", None, "Only rewrite the Markdown of this JSON result file.")


def hf_model(shape, bitfit):
    """The Hugging Face model of the shape, random init (seeded)."""
    import transformers as hf

    torch.manual_seed(0)
    heads = max(shape["hidden"] // 64, 1)
    if shape["model"] == "gpt2":  # biases, LayerNorm, tied embedding, like keras-hub's GPT2CausalLM
        config = hf.GPT2Config(
            vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["hidden"], n_layer=shape["layers"],
            n_head=heads, n_inner=4 * shape["hidden"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            attn_implementation="eager",
        )
        return hf.GPT2LMHeadModel(config)
    if shape["model"] == "llama":  # the bitfit modes get zero-initialised biases, as dpk.add_biases does
        config = hf.LlamaConfig(
            vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
            num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
            intermediate_size=64 * round(8 * shape["hidden"] / 3 / 64), max_position_embeddings=shape["seq"],
            attention_bias=bitfit, mlp_bias=bitfit, attn_implementation="eager",
        )
        model = hf.LlamaForCausalLM(config)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                torch.nn.init.zeros_(p)
        return model
    config = hf.BertConfig(
        vocab_size=30522, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=heads, intermediate_size=4 * shape["hidden"],
        max_position_embeddings=shape["seq"], num_labels=2, attn_implementation="eager",
    )
    return hf.BertForSequenceClassification(config)


def build(shape, mode):
    model = hf_model(shape, mode.endswith("bitfit"))
    model.train()
    if mode.endswith("bitfit"):
        for name, p in model.named_parameters():
            p.requires_grad = name.endswith(".bias")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    if "ghost" in mode:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        model = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=shape["batch"],
            secure_mode=mode.endswith("secure"),
        )
        # Decoders: the loss of a sequence is the mean over its non-padding tokens (ignore_index).
        optimizer.dp_loss = DPLossFastGradientClipping(model, optimizer, torch.nn.CrossEntropyLoss(ignore_index=-100))
    elif mode.startswith("opacus"):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        model = GradSampleModule(model)
        optimizer = DPOptimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=shape["batch"])
    return model, optimizer, sum(p.numel() for p in params)


def make_batch(shape):
    g = torch.Generator().manual_seed(1)
    b, t = shape["batch"], shape["seq"]
    if shape["model"] in DECODERS:  # the last quarter of each sequence is padding, as in the main harness
        ids = torch.randint(1, shape["vocab"], (b, t + 1), generator=g)
        mask = (torch.arange(t) < t - t // 4).long().expand(b, t).contiguous()
        labels = torch.where(mask.bool(), ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        x = dict(input_ids=ids[:, :-1].contiguous(), attention_mask=mask,
                 position_ids=torch.arange(t).expand(b, t).contiguous())
        return x, labels
    ids = torch.randint(1, 30522, (b, t), generator=g)
    # position_ids with the batch dimension: Opacus needs every per-sample gradient batched.
    positions = torch.arange(t).expand(b, t).contiguous()
    x = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids), position_ids=positions)
    return x, torch.randint(0, 2, (b,), generator=g)


def step(model, optimizer, x, y):
    optimizer.zero_grad(set_to_none=True)
    logits = model(**x).logits
    if logits.dim() == 3:  # a decoder: per-token losses, each sequence's mean over its real tokens
        shape = logits.shape
        if hasattr(optimizer, "dp_loss"):
            optimizer.dp_loss(logits.reshape(-1, shape[-1]), y.reshape(-1), shape=shape).backward()
        else:
            token = torch.nn.functional.cross_entropy(logits.reshape(-1, shape[-1]), y.reshape(-1), reduction="none")
            weights = (y != -100).float()
            per_sequence = (token.view(shape[0], shape[1]) * weights).sum(1) / weights.sum(1).clamp(min=1)
            per_sequence.mean().backward()
    elif hasattr(optimizer, "dp_loss"):  # fast gradient clipping: its loss runs both backward passes
        optimizer.dp_loss(logits, y).backward()
    else:
        torch.nn.functional.cross_entropy(logits, y).backward()
    optimizer.step()


def run_epochs(shape, modes, n, epochs):
    """Seconds of `epochs` epochs per mode after one untimed epoch, modes interleaved
    (`rows.time_epochs`, as for our modes)."""
    from opacus.data_loader import DPDataLoader

    # The main harness's data (rows.epoch_data: NumPy only, no TensorFlow), the same draws.
    x, y = rows.epoch_data(shape, n)
    ids, mask, labels = (torch.from_numpy(a).long() for a in (x["token_ids"], x["padding_mask"], y))
    dataset = torch.utils.data.TensorDataset(ids, mask, labels)
    runners = {}
    for mode in modes:
        model, optimizer, _ = build(shape, mode)
        loader = torch.utils.data.DataLoader(dataset, batch_size=shape["batch"], shuffle=True)
        if mode.startswith("opacus"):
            loader = DPDataLoader.from_data_loader(loader)  # Poisson sampling, expected batch shape["batch"]

        def run(model=model, optimizer=optimizer, loader=loader):
            for batch_ids, batch_mask, y in loader:
                if len(y) == 0:  # an empty Poisson sample: Opacus' optimizer still adds noise
                    continue
                b, t = batch_ids.shape
                x = dict(input_ids=batch_ids, token_type_ids=torch.zeros_like(batch_ids), attention_mask=batch_mask,
                         position_ids=torch.arange(t).expand(b, t).contiguous())
                step(model, optimizer, x, y)

        runners[mode] = run
    times = rows.time_epochs(runners, epochs, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return [{"mode": mode, "epoch_times_s": t} for mode, t in times.items()]


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(shape, mode, warmup, queue):
    import threading

    torch.set_num_threads(os.cpu_count())
    model, optimizer, _ = build(shape, mode)
    x, y = make_batch(shape)
    # Warm up on a 1-example batch (loads kernels and libraries, allocates little), then
    # sample RSS every millisecond through two real steps: peak minus the RSS before them.
    step(model, optimizer, {k: v[:1] for k, v in x.items()}, y[:1])
    before = _rss_mb()
    peak, done = [before], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=poll)
    thread.start()
    for _ in range(2):
        step(model, optimizer, x, y)
    done.set()
    thread.join()
    queue.put(peak[0] - before)


def peak_rss_delta_mb(shape, mode, warmup):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(shape, mode, warmup, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main(_):
    if FLAGS.render:
        with open(FLAGS.render) as f:
            report = json.load(f)
        with open(os.path.splitext(FLAGS.render)[0] + ".md", "w") as f:
            f.write(markdown(report) + "\n")
        return
    torch.set_num_threads(os.cpu_count())
    shape = json.loads(FLAGS.shape_json) if FLAGS.shape_json else dict(SHAPES[FLAGS.shape], name=FLAGS.shape)
    if FLAGS.epoch_examples:
        report = {"shape": shape, "device": f"CPU ({os.cpu_count()} cores), PyTorch {torch.__version__}",
                  "results": run_epochs(shape, FLAGS.modes, FLAGS.epoch_examples, FLAGS.repeats)}
        print(json.dumps(report["results"]))
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    x, y = make_batch(shape)
    runners, info = {}, {}
    for mode in FLAGS.modes:
        print(f"[{mode}] build + warm-up", file=sys.stderr, flush=True)
        model, optimizer, n = build(shape, mode)
        for _ in range(FLAGS.warmup):
            step(model, optimizer, x, y)
        runners[mode] = (model, optimizer)
        info[mode] = dict(trainable_params=int(n), times=[])
    for i in range(FLAGS.repeats):
        print(f"timing round {i + 1}/{FLAGS.repeats}", file=sys.stderr, flush=True)
        for mode, (model, optimizer) in runners.items():
            start = time.perf_counter()
            step(model, optimizer, x, y)
            info[mode]["times"].append(time.perf_counter() - start)
    del runners
    results = []
    for mode in FLAGS.modes:
        ms = 1e3 * float(np.median(info[mode]["times"]))
        mem = peak_rss_delta_mb(shape, mode, FLAGS.warmup) if FLAGS.memory else None
        results.append({
            "mode": mode,
            "ms_per_step": round(ms, 2),
            "examples_per_s": round(shape["batch"] / ms * 1e3, 1),
            "peak_mem_mb": None if mem is None else round(mem, 1),
            "trainable_params": info[mode]["trainable_params"],
            "pfor_fallback": False,
        })
    report = {
        "shape": shape,
        "device": f"CPU ({os.cpu_count()} cores), PyTorch {torch.__version__}",
        "results": results,
        "ratios": ratios_of(results),
    }
    print(markdown(report))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
            f.write(markdown(report) + "\n")


RATIOS = [("opacus_dp_bitfit", "torch_bitfit"), ("opacus_dp_bitfit", "torch_full"),
          ("opacus_dp_full", "opacus_dp_bitfit"), ("opacus_dp_full", "torch_full"),
          ("opacus_dp_full_ghost", "torch_full"), ("opacus_dp_full_ghost_secure", "torch_full"),
          ("opacus_dp_full_ghost_secure", "opacus_dp_full_ghost")]


def ratios_of(results):
    by = {r["mode"]: r["ms_per_step"] for r in results}
    return {f"{a}/{b}": round(by[a] / by[b], 3) for a, b in RATIOS if a in by and b in by}


def markdown(report):
    """The report as Markdown (also written beside --out; `python opacus_bench.py --render=F.json` redoes it)."""
    lines = [f"Shape: {json.dumps(report['shape'])}; device: {report['device']}", "",
             "| mode | ms/step | examples/s | peak RSS delta MB | trainable params |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['ms_per_step']:.1f} | {r['examples_per_s']:.1f} | {r['peak_mem_mb']} "
                     f"| {r['trainable_params']:,} |")
    lines += ["", "Ratios (step time): " + ", ".join(f"{k} = {v}" for k, v in ratios_of(report["results"]).items())]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
