"""Private fine-tuning of a small generative language model, then export for scoring and generation.

    uv run python examples/train_causal_lm.py                        # offline default (pretrains once)
    uv run python examples/train_causal_lm.py --method=full          # the non-private comparison
    uv run python examples/train_causal_lm.py --max_examples=1000 --epochs=1   # a quick run

Offline default: a GPT-2-style keras-hub model over UTF-8 bytes (4 layers, hidden 128, 0.84M
parameters) is first pretrained **non-privately on public text**, the Python standard library's
own documentation (`pydoc`, generated from the running Python: public, offline, English prose
and code), and cached; it is then fine-tuned **privately on the offline tweets** (each tweet one
example, the privacy unit; per-byte weights exclude padding). The run reports validation and test
perplexity (per byte) of the pretrained model and of the fine-tuned one, ε, a few sampled
continuations, and exports a SavedModel with `score` (log-likelihood of each string) and
`generate` signatures over raw strings.
"""

import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import dp_bitfit_keras as dpk  # noqa: E402
from dpk_examples import datasets, lm  # noqa: E402

# method: (variables, private)
METHODS = {
    "dp_bitfit": ("bias", True),
    "dp_norm": ("norm", True),
    "dp_bitfit_norm": ("bias+norm", True),
    "dp_lora": ("lora", True),
    "dp_full": ("all", True),
    "dpzero": ("bias+norm", True),
    "bitfit": ("bias", False),
    "bitfit_norm": ("bias+norm", False),
    "lora": ("lora", False),
    "full": ("all", False),
}
# Adam rates per variable group, private and not (DPZero: SGD, its own scale). The private ones
# are the best of the runs in research/results/causal_lm (validation perplexity, ε = 8, 10 epochs);
# the non-private ones were not tuned.
LEARNING_RATES = {
    (True, "bias"): 3e-2,
    (True, "norm"): 3e-2,
    (True, "bias+norm"): 3e-2,
    (True, "lora"): 1e-2,
    (True, "all"): 2e-3,
    (False, "bias"): 1e-2,
    (False, "norm"): 1e-2,
    (False, "bias+norm"): 1e-2,
    (False, "lora"): 3e-3,
    (False, "all"): 5e-4,
}
# Epochs: private runs take more, smaller steps (10: 380 steps at the defaults); the non-private
# comparison is measured at 3.
EPOCHS = {True: 10, False: 3}
DPZERO_LEARNING_RATE, DPZERO_CLIP = 1e-3, 1.0
LORA_RANK = 8
PROMPTS = ("I love", "today is", "my phone")

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "dp_bitfit_norm", sorted(METHODS), "What to fine-tune, privately or not.")
flags.DEFINE_float("epsilon", 8.0, "Target ε of the private run.")
flags.DEFINE_float("delta", None, "δ; default 1/(2n).")
flags.DEFINE_integer("epochs", None, "Epochs over the training tweets; default 10 private, 3 non-private.")
flags.DEFINE_integer("batch_size", 128, "Expected (Poisson) batch size of the private run; fixed otherwise.")
flags.DEFINE_integer("max_examples", 6000, "Tweets used (80/10/10 split); 0: the whole corpus.")
flags.DEFINE_integer("sequence_length", 128, "Bytes per tweet (longer ones are cut).")
flags.DEFINE_float("learning_rate", None, "Adam's rate; default per method (LEARNING_RATES).")
flags.DEFINE_float("l2_norm_clip", 1.0, "Per-example clip C (one tweet is one example).")
flags.DEFINE_integer("pretrain_steps", 2400, "Steps of the public pretraining (batch 32), done once and cached.")
flags.DEFINE_string("export_dir", None, "SavedModel path; default savedmodels/tweets_lm_<method>_eps<ε>/1.")
flags.DEFINE_string("summary_json", None, "Also write the summary here (and a one-row table .md beside it).")
flags.DEFINE_string(
    "preset",
    None,
    "A keras-hub CausalLM preset (name or local directory) instead of the "
    "offline byte model; its own preprocessor tokenizes (needs the network for hub names).",
)
flags.DEFINE_integer("seed", 0, "Initialisation and splits (not the private noise: that key is secret).")


def _tweets():
    splits = datasets.tweet_sentiment(binary=False, max_examples=FLAGS.max_examples or None)
    return [np.asarray(part[0]) for part in (splits.train, splits.validation, splits.test)]


def _arrays(texts, preprocessor=None):
    if preprocessor is None:
        return lm.lm_arrays(texts, FLAGS.sequence_length)
    x, y, w = preprocessor(list(texts))  # keras-hub's CausalLMPreprocessor: (x, y, sample_weight)
    return ({k: np.asarray(v) for k, v in x.items()}, np.asarray(y), np.asarray(w, np.float32))


def _load_model():
    if FLAGS.preset is None:
        model, info = lm.pretrained(FLAGS.sequence_length, steps=FLAGS.pretrain_steps)
        return model, None, info
    import keras_hub

    model = keras_hub.models.CausalLM.from_preset(FLAGS.preset, preprocessor=None)
    preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(
        FLAGS.preset, sequence_length=FLAGS.sequence_length
    )
    return model, preprocessor, {"preset": FLAGS.preset}


def _perplexities(model, validation, test):
    return lm.perplexity(model, *validation), lm.perplexity(model, *test)


class _Timer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times = getattr(self, "times", []) + [time.perf_counter() - self._start]


def run():
    start = time.time()
    variables, private = METHODS[FLAGS.method]
    model, preprocessor, info = _load_model()
    train_texts, val_texts, test_texts = _tweets()
    train, validation, test = (_arrays(t, preprocessor) for t in (train_texts, val_texts, test_texts))
    n = len(train[1])
    delta = FLAGS.delta or 1.0 / (2 * n)
    pretrained_ppl = _perplexities(model, validation, test)
    print(f"pretrained model: validation perplexity {pretrained_ppl[0]:.3f}, test {pretrained_ppl[1]:.3f} (per token)")
    if "lora" in variables:
        model.backbone.enable_lora(LORA_RANK)
    if "bias" in variables and not dpk.selection.bias_variables(model):
        dpk.add_biases(model)  # bias-free presets (Gemma, Llama): zero biases, the same function
    rate = FLAGS.learning_rate or (
        DPZERO_LEARNING_RATE if FLAGS.method == "dpzero" else LEARNING_RATES[(private, variables)]
    )
    epochs = FLAGS.epochs or EPOCHS[private]
    timer = _Timer()
    callbacks = [timer]
    x, y, w = train
    if private:
        trainer = (
            dpk.methods.dpzero(model, trainable=variables)
            if FLAGS.method == "dpzero"
            else dpk.DPModel(model, trainable=variables)
        )
        inner = keras.optimizers.SGD(rate) if FLAGS.method == "dpzero" else keras.optimizers.Adam(rate)
        clip = DPZERO_CLIP if FLAGS.method == "dpzero" else FLAGS.l2_norm_clip
        trainer.compile(
            optimizer=dpk.DPOptimizer(inner, clip, target_epsilon=FLAGS.epsilon, target_delta=delta), loss=lm.TOKEN_LOSS
        )
        callbacks.insert(0, dpk.PrivacyCallback(delta))
        trainer.fit(x, y, sample_weight=w, batch_size=FLAGS.batch_size, epochs=epochs, callbacks=callbacks, verbose=2)
        epsilon = trainer.privacy_spent(delta)[0]
        steps = trainer.optimizer.dp_steps
        trainable = trainer.selection.num_trainable
    else:
        selection = dpk.select_variables(model, variables)
        dpk.selection.apply_selection(model, selection)
        model.compile(optimizer=keras.optimizers.Adam(rate), loss=lm.TOKEN_LOSS, jit_compile=True)
        # keras-hub's fit turns arrays into a dataset and then ignores `shuffle`: shuffle here.
        data = tf.data.Dataset.from_tensor_slices((x, y, w)).shuffle(n, seed=FLAGS.seed, reshuffle_each_iteration=True)
        model.fit(data.batch(FLAGS.batch_size), epochs=epochs, callbacks=callbacks, shuffle=False, verbose=2)
        epsilon, steps, trainable = math.inf, len(timer.times), selection.num_trainable
    tuned_ppl = _perplexities(model, validation, test)
    export_dir = FLAGS.export_dir or os.path.join(
        "savedmodels", f"tweets_lm_{FLAGS.method}" + ("" if not private else f"_eps{FLAGS.epsilon:g}"), "1"
    )
    samples = []
    if preprocessor is None:
        lm.export(model, export_dir, FLAGS.sequence_length)
        served = tf.saved_model.load(export_dir)
        out = served.generate(tf.constant(PROMPTS), tf.constant(40), tf.constant(0.8), tf.constant(FLAGS.seed))
        samples = [t.decode("utf-8", errors="replace") for t in out["text"].numpy()]
    else:
        model.export(export_dir, format="tf_saved_model", verbose=False)
    wall = time.time() - start
    summary = dict(
        method=FLAGS.method,
        variables=variables,
        epsilon=epsilon,
        delta=delta,
        steps=steps,
        trainable_params=int(trainable),
        learning_rate=rate,
        epochs=epochs,
        batch_size=FLAGS.batch_size,
        train_examples=n,
        pretrained_validation_perplexity=pretrained_ppl[0],
        pretrained_test_perplexity=pretrained_ppl[1],
        validation_perplexity=tuned_ppl[0],
        test_perplexity=tuned_ppl[1],
        ms_per_step=1000 * float(np.median(timer.times[1:] or timer.times)) if getattr(timer, "times", None) else 0.0,
        wall_s=wall,
        export_dir=export_dir,
        samples=samples,
        pretraining=info,
    )
    eps_text = "∞ (not private)" if epsilon == math.inf else f"{epsilon:.3f} (δ = {delta:.3g})"
    print(f"\n{FLAGS.method}: {trainable:,} parameters trained, {steps} steps, ε = {eps_text}")
    print(
        f"perplexity per token: validation {pretrained_ppl[0]:.3f} -> {tuned_ppl[0]:.3f}, "
        f"test {pretrained_ppl[1]:.3f} -> {tuned_ppl[1]:.3f}"
    )
    for prompt, sample in zip(PROMPTS, samples):
        print(f"  {prompt!r} -> {sample!r}")
    print(f"SavedModel: {export_dir} (signatures: score, generate); {wall / 60:.1f} min")
    if FLAGS.summary_json:
        with open(FLAGS.summary_json, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        with open(os.path.splitext(FLAGS.summary_json)[0] + ".md", "w") as f:
            f.write(lm.summary_table([summary]))
    return summary, model


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # not a page of INFO lines from the SavedModel export
    run()


if __name__ == "__main__":
    app.run(main)
