"""The example binaries on tiny settings: a local preset directory and TFDS mock data."""

import contextlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app, flags

import dp_bitfit_keras as dpk
from dpk_examples import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "research"))


@pytest.fixture
def tiny_preset(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocab, lowercase=True)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocab),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    path = str(tmp_path / "preset")
    backbone.save_to_preset(path)
    tokenizer.save_to_preset(path)
    return path


@contextlib.contextmanager
def _example(name):
    """Imports examples/<name>.py; afterwards drops it and its absl flags, since the binaries
    define flags of the same names (each is its own program)."""
    module = importlib.import_module(name)
    try:
        yield module
    finally:
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            delattr(flags.FLAGS, flag.name)
        sys.modules.pop(name, None)


def _run_example(name, argv, entry="run"):
    with _example(name) as module:
        flags.FLAGS.unparse_flags()
        flags.FLAGS([module.__file__, *argv])
        try:
            return getattr(module, entry)()
        finally:
            flags.FLAGS.unparse_flags()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp_bitfit_head", "bitfit"])
def test_text_example_trains_exports_and_serves(tiny_preset, tmp_path, method):
    export_dir = str(tmp_path / "savedmodel" / "1")
    with tfds.testing.mock_data(num_examples=40):
        summary, model, preprocessor = _run_example(
            "train_text_classifier",
            [
                f"--preset={tiny_preset}",
                "--dataset=glue/sst2",
                f"--method={method}",
                "--batch_size=16",
                "--sequence_length=16",
                "--max_examples=100",
                f"--export_dir={export_dir}",
                "--epsilon=5",
                f"--summary_json={tmp_path / 'run.json'}",
            ],
        )
    assert summary["export_dir"] == export_dir and summary["steps"] > 0
    # The text study's choice for the private default: a linearly decaying rate; Adam throughout.
    assert (summary["lr_schedule"], summary["optimizer"]) == (
        "linear" if method == "dp_bitfit_head" else "constant",
        "adam",
    )
    assert json.load(open(tmp_path / "run.json"))["wall_s"] > 0
    row = open(tmp_path / "run.md").read().splitlines()[-1]
    assert row.startswith(f"| {method} | 80/10/10 |") and f"{100 * summary['test_accuracy']:.1f}" in row
    if method.startswith("dp_"):
        assert 0 < summary["epsilon"] <= 5.0 + 1e-6
    texts = ["a good movie", "bad and boring", "zzz"]
    expected = keras.ops.softmax(model.predict(text.tokenize(preprocessor, texts), verbose=0)).numpy()
    # A fresh process, as a server would load it: raw strings in, probabilities out.
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "predict.py"), f"--model_dir={export_dir}", "--json", *texts],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    served = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [s["text"] for s in served] == texts
    np.testing.assert_allclose([s["probabilities"] for s in served], expected, rtol=1e-4, atol=1e-6)
    cli = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", export_dir, "--all"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "signature_def['serving_default']" in cli.stdout and "DT_STRING" in cli.stdout
    # The tokens-only model beside it: a fresh process that never imports tensorflow_text.
    tokens_dir = summary["tokens_export_dir"]
    assert tokens_dir == str(tmp_path / "savedmodel_tokens" / "1")
    features = text.tokenize(preprocessor, texts)
    np.savez(str(tmp_path / "tokens.npz"), **features)
    code = (
        "import sys, json, numpy as np, tensorflow as tf;"
        "m = tf.saved_model.load(sys.argv[1]); x = np.load(sys.argv[2]);"
        "out = m.signatures['serving_default'](**{k: tf.constant(x[k]) for k in x.files});"
        "assert 'tensorflow_text' not in sys.modules and 'keras_hub' not in sys.modules, sorted(sys.modules);"
        "print(json.dumps(out['logits'].numpy().tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, tokens_dir, str(tmp_path / "tokens.npz")],
        capture_output=True,
        text=True,
        check=True,
    )
    logits = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(logits, model.predict(features, verbose=0), rtol=1e-5, atol=1e-6)
    vocab = open(os.path.join(tokens_dir, "assets", "vocab.txt")).read().split("\n")
    assert vocab[:3] == ["[PAD]", "[UNK]", "[CLS]"]
    assert json.load(open(os.path.join(tokens_dir, "assets", "tokenizer.json")))["sequence_length"] == 16
    # saved_model_cli, as the README shows it.
    length = int(features["padding_mask"][0].sum())  # unpadded: any length up to the model's maximum
    exprs = ";".join(f"{k}={features[k][:1, :length].tolist()}" for k in features)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "run",
            "--dir",
            tokens_dir,
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--input_exprs",
            exprs,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "class_id" in cli.stdout and "probabilities" in cli.stdout
    printed = cli.stdout.split("Result for output key logits:")[1].split("Result")[0]
    served = [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]?\d+)?", printed)]
    np.testing.assert_allclose(served, logits[0], rtol=1e-4, atol=1e-5)


def _serve_images(export_dir, images):
    code = (
        "import sys, json, numpy as np, tensorflow as tf;"
        "m = tf.saved_model.load(sys.argv[1]);"
        "x = np.load(sys.argv[2]);"
        "out = m.signatures['serving_default'](tf.constant(x));"
        "print(json.dumps(list(out.values())[0].numpy().tolist()))"
    )
    path = os.path.join(export_dir, "..", "images.npy")
    np.save(path, images)
    out = subprocess.run([sys.executable, "-c", code, export_dir, path], capture_output=True, text=True, check=True)
    return np.array(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_image_example_offline_digits_transfer(tmp_path):
    export_dir = str(tmp_path / "digits" / "1")
    summary, model = _run_example(
        "train_image_classifier",
        [
            "--pretrain_epochs=2",
            "--epochs=1",
            f"--export_dir={export_dir}",
            "--epsilon=3",
        ],
    )
    assert summary["method"] == "dp_full" and 0 < summary["epsilon"] <= 3.0 + 1e-6  # the digits default (study)
    assert (summary["optimizer"], summary["learning_rate"]) == ("sgd", 0.05)  # and its optimizer and rate at ε <= 3
    # Another optimizer with the default rate (meant for SGD) is refused before any work.
    with pytest.raises(app.UsageError, match="give its learning rate too"):
        _run_example("train_image_classifier", ["--optimizer=adam"])
    from dpk_examples import datasets

    images = datasets.digits()[0][:5]
    np.testing.assert_allclose(
        _serve_images(export_dir, images), model.predict(images, verbose=0), rtol=1e-4, atol=1e-5
    )


def test_image_example_hub_path_with_local_vit_preset(tmp_path):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    preset = str(tmp_path / "vit")
    keras_hub.models.ViTImageClassifier(backbone, num_classes=3, preprocessor=None).save_to_preset(preset)
    export_dir = str(tmp_path / "cifar" / "1")
    with tfds.testing.mock_data(num_examples=20):
        summary, model = _run_example(
            "train_image_classifier",
            [
                f"--preset={preset}",
                "--dataset=cifar10",
                "--image_size=32",
                "--epochs=1",
                "--batch_size=8",
                f"--export_dir={export_dir}",
                "--method=dp_bitfit",
            ],
        )
    assert summary["steps"] > 0 and summary["trainable_fraction"] < 0.2
    assert model.output_shape[-1] == 10


@pytest.mark.slow
def test_utility_sweep_writes_table_json_and_plot_and_resumes(tmp_path, monkeypatch):
    from dpk_examples import tasks

    task = tasks.digits_transfer_task(pretrain_epochs=2, verbose=False)  # prepared once for the three calls
    monkeypatch.setattr(tasks, "digits_transfer_task", lambda **kwargs: task)
    out = str(tmp_path / "utility")
    argv = ["--tasks=image", "--epsilons=8,inf", "--image_epochs=1", f"--out={out}"]
    methods = "--methods=bitfit_head,dp_bitfit_head"
    _run_example("utility_sweep", [*argv, methods, "--repeats=1"], entry="run")
    first = json.load(open(out + ".json"))["results"]
    # Resumed with one more repeat: the finished runs are kept, only the missing one runs.
    _run_example("utility_sweep", [*argv, methods, "--repeats=2", "--resume"], entry="run")
    results = json.load(open(out + ".json"))["results"]
    # Resumed for fewer cells (nothing to run): the file keeps the others' runs.
    _run_example("utility_sweep", [*argv, "--methods=bitfit_head", "--resume"], entry="run")
    assert json.load(open(out + ".json"))["results"] == results
    # Repeats: private runs only (a non-private run has no noise to vary).
    assert [(r["method"], r["target_epsilon"]) for r in results] == [
        ("bitfit_head", float("inf")),
        ("dp_bitfit_head", 8.0),
        ("dp_bitfit_head", 8.0),
    ]
    assert results[:2] == first and results[2]["repeat"] == 1
    assert all(r["epsilon"] <= 8.0 + 1e-6 for r in results[1:])
    table = open(out + ".md").read()
    assert "| ε=8 | ε=inf |" in table and "dp_bitfit_head" in table and " (2) |" in table
    assert os.path.getsize(out + ".png") > 10_000
    # Resumed for the private cells only (nothing to run): its rows come first in the file, yet
    # the table keeps recipes.METHODS order.
    _run_example("utility_sweep", [*argv, "--methods=dp_bitfit_head", "--resume"], entry="run")
    assert json.load(open(out + ".json"))["results"][0]["method"] == "dp_bitfit_head"
    rows = open(out + ".md").read().splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["bitfit_head", "dp_bitfit_head"]
    # Runs made with other settings are not mixed into one table.
    with pytest.raises(app.UsageError, match="other run settings .*image_epochs"):
        _run_example("utility_sweep", [*argv, methods, "--image_epochs=2", "--resume"], entry="run")


def test_recipes_reject_bad_runs():
    from dpk_examples import recipes

    data = (np.zeros((8, 2), "float32"), np.zeros(8, "int32"))
    build = lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])  # noqa: E731
    with pytest.raises(ValueError, match="method must be one of"):
        recipes.train("dpsgd", build, data, data, data)
    with pytest.raises(ValueError, match="finite target epsilon"):
        recipes.train("dp_bitfit", build, data, data, data, epsilon=float("inf"))
    with pytest.raises(ValueError, match="gradient-based private methods"):
        recipes.train("bitfit", build, data, data, data, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient-based private methods"):
        recipes.train("dpzero", build, data, data, data, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="int >= 1"):
        recipes.train("dp_full", build, data, data, data, gradient_accumulation_steps=0)


@pytest.mark.parametrize("method", ["dp_full", "sparta"])
def test_recipes_accumulate_micro_batches_into_logical_steps(method):
    from dpk_examples import recipes

    rng = np.random.RandomState(0)
    x = rng.randn(160, 4).astype("float32")
    data = (x, (x[:, 0] > 0).astype("int32"))
    build = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])  # noqa: E731
    result = recipes.train(
        method, build, data, data, data, epsilon=4.0, batch_size=16, gradient_accumulation_steps=2, verbose=0
    )
    phases = 2 if method == "sparta" else 1  # SPARTA: a selection epoch, then a training epoch
    assert result.steps == 10 * phases and result.epsilon <= 4.0 + 1e-6
    assert result.ms_per_step > 0
    if method == "sparta":  # 20% of the hidden kernel (4 x 8, whole rows of 4) and the head whole
        assert result.trainable_params == 2 * 4 + (8 * 2 + 2)


def test_step_timer_sums_the_micro_batches_of_a_step():
    from dpk_examples import recipes

    timer = recipes.StepTimer(group=3)
    for _ in range(9):
        timer.on_train_batch_begin(0)
        timer.on_train_batch_end(0)
    assert len(timer.times) == 3 and timer._pending == []


@pytest.mark.skipif(
    importlib.util.find_spec("tf_keras") is None, reason="the TF Privacy peer needs the `legacy` extra (tf_keras)"
)
@pytest.mark.parametrize("method", ["tfp_legacy_bitfit", "tfp_legacy_full"])
def test_utility_sweep_peer_starts_from_our_model_and_is_accounted(tiny_preset, tmp_path, method):
    from dpk_examples import tasks

    with tfds.testing.mock_data(num_examples=40):
        task = tasks.text_task(tiny_preset, "glue/sst2", max_examples=100, sequence_length=16, pooling="mean")
    with _example("utility_sweep") as module:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["utility_sweep"])
        try:
            path = str(tmp_path / "task.npz")
            module.write_peer_task(task, path, seed=0)
            row = module.peer_run(task, path, method, 4.0, epochs=1, batch_size=16)
        finally:
            flags.FLAGS.unparse_flags()
    # The tf_keras rebuild reproduced our Keras 3 model's logits from the same weights.
    assert row["reference_logit_gap"] < 1e-4
    assert row["epsilon"] == pytest.approx(4.0, rel=0.02)
    assert row["steps"] == -(-len(task.splits.train[1]) // 16)
    ours = dpk.DPModel(task.build_model(), trainable="bias" if method.endswith("bitfit") else "all")
    # Same variables, less the backbone's [CLS] pooler, which mean pooling leaves unused (the
    # peer does not build it; ours keeps it, with zero gradient).
    unused = sum(int(np.prod(v.shape)) for v in ours.selection.variables if v.path.startswith("pooled_dense/"))
    assert unused > 0 and row["trainable_params"] == ours.selection.num_trainable - unused
    assert 0.0 <= row["test_accuracy"] <= 1.0


@pytest.mark.parametrize("method, optimizer", [("dp_bitfit_head", "sgd"), ("bitfit_head", "adam")])
def test_recipes_linear_schedule_decays_to_zero_over_the_run(method, optimizer):
    from dpk_examples import recipes

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 3)).astype("float32"), rng.integers(0, 2, 64).astype("int32"))
    build = lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, name="logits")])  # noqa: E731
    result = recipes.train(
        method,
        build,
        data,
        data,
        data,
        epochs=3,
        batch_size=16,
        learning_rate=0.1,
        lr_schedule="linear",
        optimizer=optimizer,
        verbose=0,
    )
    trained = result.model.optimizer
    inner = trained.inner_optimizer if method.startswith("dp_") else trained
    assert isinstance(inner, keras.optimizers.SGD if optimizer == "sgd" else keras.optimizers.Adam)
    if optimizer == "sgd":
        assert inner.momentum == 0.9
    steps = int(trained.iterations.numpy())
    assert steps == 3 * 4  # Poisson batches of expected size 16 (or fixed ones) over 64 examples, 3 epochs
    assert float(trained.learning_rate.numpy()) == pytest.approx(0.0, abs=1e-9)  # the end of the decay
    schedule = inner._learning_rate
    assert float(schedule(0)) == pytest.approx(0.1) and float(schedule(6)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="lr_schedule"):
        recipes.train("sparta", build, data, data, data, lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        recipes.train(method, build, data, data, data, lr_schedule="cosine")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        recipes.train(method, build, data, data, data, optimizer="rmsprop")
    with pytest.raises(ValueError, match="its own"):
        recipes.train("dpzero", build, data, data, data, optimizer="sgd")


@pytest.mark.parametrize("method, optimizer", [("dp_full", "sgd"), ("full", "adam")])
def test_recipes_ema_ends_with_the_moving_average_of_the_iterates(method, optimizer):
    from dpk_examples import recipes

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 3)).astype("float32"), rng.integers(0, 2, 64).astype("int32"))
    build = lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, name="logits")])  # noqa: E731
    iterates = []

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            model = self.model.model if isinstance(self.model, dpk.DPModel) else self.model
            iterates.append([w.copy() for w in model.get_weights()])

    m = 0.8
    result = recipes.train(
        method,
        build,
        data,
        data,
        data,
        epochs=2,
        batch_size=16,
        learning_rate=0.1,
        optimizer=optimizer,
        ema_momentum=m,
        noise_seed=0 if method.startswith("dp_") else None,
        callbacks=[Snapshot()],
        verbose=0,
    )
    assert len(iterates) == 8
    average = iterates[0]  # Keras' EMA starts at the first step's weights
    for weights in iterates[1:]:
        average = [m * a + (1 - m) * w for a, w in zip(average, weights)]
    final = result.base_model.get_weights()
    for got, want in zip(final, average):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(g, w) for g, w in zip(final, iterates[-1]))  # not the last iterate
    with pytest.raises(ValueError, match="ema_momentum must be in"):
        recipes.train(method, build, data, data, data, ema_momentum=1.0)
    with pytest.raises(ValueError, match="ema_momentum is not supported"):
        recipes.train("two_phase", build, data, data, data, ema_momentum=0.9)


def test_recipes_noise_multiplier_replaces_the_epsilon_target():
    from dpk_examples import recipes

    rng = np.random.default_rng(0)
    data = (rng.normal(size=(64, 3)).astype("float32"), rng.integers(0, 2, 64).astype("int32"))
    build = lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, name="logits")])  # noqa: E731
    result = recipes.train("dp_full", build, data, data, data, epochs=2, batch_size=16, noise_multiplier=1.5, verbose=0)
    assert result.noise_multiplier == 1.5 and result.steps == 8
    assert result.epsilon == pytest.approx(result.model.optimizer.privacy_spent(result.delta)[0]) and result.epsilon > 0
    floor = recipes.train("dp_full", build, data, data, data, epochs=2, batch_size=16, noise_multiplier=0.0, verbose=0)
    assert floor.noise_multiplier == 0.0 and floor.epsilon == float("inf")  # trains, but is not private
    with pytest.raises(ValueError, match="one-phase private methods"):
        recipes.train("full", build, data, data, data, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="one-phase private methods"):
        recipes.train("two_phase", build, data, data, data, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        recipes.train("dp_full", build, data, data, data, noise_multiplier=-1.0)


def test_binaries_own_the_shared_flags():
    shared = {
        "epsilon",
        "delta",
        "l2_norm_clip",
        "clipping",
        "head_init",
        "lr_schedule",
        "optimizer",
        "export_dir",
        "seed",
        "noise_seed",
    }
    for name in ("train_text_classifier", "train_image_classifier", "train_text_classifier"):  # again: redefinable
        with _example(name) as module:
            own = {f.name for f in flags.FLAGS.get_key_flags_for_module(module)}
            assert shared <= own and "learning_rate" in own  # the shared ones, and the binary's own
        assert not shared & set(flags.FLAGS)  # dropped with the binary


def test_recipes_zero_head_starts_the_head_at_zero():
    from dpk_examples import recipes

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2, name="logits")])
    recipes.zero_head(model)
    assert not np.any(model.get_layer("logits").kernel.numpy()) and np.any(model.layers[0].kernel.numpy())
    data = (np.zeros((8, 3), "float32"), np.zeros(8, "int32"))
    with pytest.raises(ValueError, match="head_init"):
        recipes.train("dp_full", lambda: model, data, data, data, head_init="xavier")


@pytest.mark.slow
def test_accuracy_study_searches_resumes_and_reports(tmp_path, monkeypatch):
    from dpk_examples import tasks

    task = tasks.digits_transfer_task(pretrain_epochs=2, verbose=False)
    monkeypatch.setattr(tasks, "digits_transfer_task", lambda **kwargs: task)
    out = str(tmp_path / "study")
    with _example("accuracy_study") as study:
        # A two-stage plan of one-epoch digits runs: the search, the non-private search on the
        # private winner's data, the ε runs, the report.
        monkeypatch.setitem(study.BASE, "image", dict(study.BASE["image"], epochs=1))
        monkeypatch.setitem(
            study.PRIVATE_PLAN,
            "image",
            [("learning rate", [{}, {"lr_scale": 2.0}]), ("head init", [{}, {"head_init": "zeros"}])],
        )
        monkeypatch.setitem(
            study.NONPRIVATE_PLAN, "image", [("method", [{"method": "bitfit_head", "learning_rate": 2e-2}])]
        )
        monkeypatch.setitem(study.LOW_EPSILON_PLAN, "image", [("learning rate at ε=3", [{}, {"lr_scale": 0.5}])])
        monkeypatch.setitem(study.NOISE_FLOOR_PLAN, "image", [{}])
        argv = [
            study.__file__,
            "--tasks=image",
            f"--out={out}",
            "--image_repeats=1",
            "--epsilons=3,8",
            "--phases=private,nonprivate,epsilons,low_epsilon,noise_floor",
        ]
        flags.FLAGS.unparse_flags()
        flags.FLAGS(argv)
        try:
            study.main([])
            runs = [json.loads(line) for line in open(out + "_image.jsonl")]
            # 3 private configurations (base, lr x2, then zeros on the winner), 1 non-private
            # run, ε = 3 (ε = 8 is the winner's own run), and the ε = 3 re-tuning's one new
            # option (its first option is that ε = 3 run), then the winner without noise.
            assert len(runs) == 3 + 1 + 1 + 1 + 1
            assert runs[-2]["stage"] == "private ε=3: learning rate at ε=3" and runs[-2]["config"]["epsilon"] == 3.0
            floor = runs[-1]
            assert floor["stage"] == study.NOISE_FLOOR_STAGE and floor["config"]["noise_multiplier"] == 0.0
            assert floor["noise_multiplier"] == 0.0 and floor["epsilon"] == float("inf")
            flags.FLAGS(argv)
            study.main([])  # resumed: nothing is run twice
            assert sum(1 for _ in open(out + "_image.jsonl")) == len(runs)
            runs = runs[:-1]
            assert {r["config"]["head_init"] for r in runs} == {"random", "zeros"}
            assert all(r["epsilon"] <= r["config"].get("epsilon", float("inf")) + 1e-6 for r in runs)
        finally:
            flags.FLAGS.unparse_flags()
    report = open(out + ".md").read()
    assert "✓" in report and "Chosen private configuration" in report and "non-private bitfit_head" in report
    assert "| private ε=3 | learning rate at ε=3 |" in report
    assert "Noise floor" in report and "| as chosen |" in report
    low = json.load(open(out + ".json"))["image"]["low_epsilon_best"]
    assert low["epsilon"] == 3.0 and (
        low == dict(json.load(open(out + ".json"))["image"]["private_best"], epsilon=3.0) or "re-tuned at ε=3" in report
    )
    summary = json.load(open(out + ".json"))["image"]
    chosen = summary["private_best"]
    scores = {}
    for r in runs:
        if r["stage"].startswith("private") and r["config"]["epsilon"] == 8.0:
            scores.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r["validation_accuracy"])
    # The winner of the last stage has the best mean validation accuracy among its stage's options.
    last_stage = [json.dumps(dict(chosen, head_init=h), sort_keys=True) for h in ("random", "zeros")]
    best = max(last_stage, key=lambda k: np.mean(scores[k]))
    assert json.dumps(chosen, sort_keys=True) == best
    assert os.path.getsize(out + ".png") > 10_000


def test_run_result_as_dict_does_not_copy_the_model():
    from dpk_examples import recipes

    class Uncopyable:
        def __deepcopy__(self, memo):
            raise AssertionError("the trained model was deep-copied")

    result = recipes.RunResult("dp_lora", 8.0, 1e-5, 1.0, 0.8, 0.8, 1.0, 10, 0.1, 3, model=Uncopyable())
    assert result.as_dict()["method"] == "dp_lora" and "model" not in result.as_dict()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp_bitfit_norm", "full", "dpzero"])
def test_causal_lm_example_pretrains_fine_tunes_exports_scores_and_generates(tmp_path, monkeypatch, method):
    monkeypatch.setenv("DP_BITFIT_KERAS_CACHE", str(tmp_path / "cache"))
    export_dir = str(tmp_path / "lm" / "1")
    argv = [
        f"--method={method}",
        "--pretrain_steps=3",
        "--max_examples=80",
        "--sequence_length=32",
        "--epochs=1",
        "--batch_size=16",
        f"--export_dir={export_dir}",
        f"--summary_json={tmp_path / 'summary.json'}",
    ]
    summary, _ = _run_example("train_causal_lm", argv)
    assert summary["pretraining"]["trained_now"] and os.path.exists(summary["pretraining"]["weights"])
    private = method != "full"
    assert (0 < summary["epsilon"] <= 8.0 + 1e-6) if private else summary["epsilon"] == float("inf")
    for key in ("pretrained_validation_perplexity", "validation_perplexity", "test_perplexity"):
        assert 1.0 < summary[key] < 300.0, (key, summary[key])
    assert len(summary["samples"]) == 3 and all(isinstance(s, str) for s in summary["samples"])
    assert os.path.exists(str(tmp_path / "summary.md"))
    # A second run reuses the cached pretrained weights.
    again, _ = _run_example("train_causal_lm", argv)
    assert not again["pretraining"]["trained_now"]
    assert again["pretrained_test_perplexity"] == pytest.approx(summary["pretrained_test_perplexity"], rel=1e-5)
    # A fresh process (no dp_bitfit_keras, no keras-hub) scores and continues raw strings.
    code = (
        "import json, sys, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "s = m.score(tf.constant(['hello there', 'hi']))\n"
        "g = m.generate(tf.constant(['I love']), tf.constant(5), tf.constant(0.0), tf.constant(0))\n"
        "print(json.dumps({'ll': s['log_likelihood'].numpy().tolist(), 'bytes': s['bytes'].numpy().tolist(),\n"
        "                  'text': g['text'].numpy()[0].decode('utf-8', 'replace')}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, export_dir], capture_output=True, text=True, check=True)
    served = json.loads(out.stdout.strip().splitlines()[-1])
    assert served["bytes"] == [10.0, 1.0] and all(v < 0 for v in served["ll"])
    assert served["text"].startswith("I love") and len(served["text"].encode()) > len("I love")


@pytest.fixture
def tiny_gpt2_preset(tmp_path):
    """A local keras-hub GPT-2 preset (tiny BPE vocabulary): the --preset path without the network."""
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}, "Ġa": 28}
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocab, merges=["Ġ a"])
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(vocab),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=16)
    path = str(tmp_path / "gpt2_preset")
    keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor).save_to_preset(path)
    return path


@pytest.mark.slow
def test_causal_lm_example_with_a_keras_hub_preset(tiny_gpt2_preset, tmp_path):
    export_dir = str(tmp_path / "lm" / "1")
    summary, _ = _run_example(
        "train_causal_lm",
        [
            f"--preset={tiny_gpt2_preset}",
            "--method=dp_bitfit",
            "--max_examples=80",
            "--sequence_length=16",
            "--epochs=1",
            "--batch_size=16",
            f"--export_dir={export_dir}",
        ],
    )
    assert 0 < summary["epsilon"] <= 8.0 + 1e-6 and summary["steps"] > 0
    assert summary["test_perplexity"] > 1.0 and os.path.exists(os.path.join(export_dir, "saved_model.pb"))
