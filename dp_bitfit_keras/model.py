"""`DPModel`: a Keras model whose `fit` is DP-SGD on the selected variables."""

from __future__ import annotations

import math
import warnings

import keras
import tensorflow as tf

from dp_bitfit_keras import biases, bookkeeping, distribute, gradients, selection, users
from dp_bitfit_keras.optimizer import DPOptimizer
from dp_bitfit_keras.privacy import checks, prng, sampling

_DEFAULT_BATCH_SIZE = 32
# Fixed per-example loss scale under mixed_float16 (2^12: float16 keeps gradients down to
# ~6e-8/4096 from flushing to zero, and a loss of up to ~16 with gradients ~1e3 from overflowing).
MIXED_FLOAT16_LOSS_SCALE = 4096.0


def per_example_loss(loss):
    """The per-example form of a compiled Keras loss (`reduction=None`).

    Raises:
        ValueError: for losses that cannot give per-example values (dicts/lists of losses).
    """
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        config["reduction"] = None
        return type(loss).from_config(config)
    if callable(loss):
        return loss  # Keras' functional losses and user callables: checked at the first trace.
    raise ValueError(
        "DPModel needs one loss that returns one value per example, e.g. "
        "keras.losses.SparseCategoricalCrossentropy(from_logits=True); got "
        f"{type(loss).__name__}: {loss!r}. Multi-output losses (dicts/lists) are not supported yet."
    )


GRADIENT_METHODS = ("auto", "vectorized", "bookkeeping")
# Per-example-gradient memory that the automatic chunk size keeps one chunk under (float32).
CHUNK_MEMORY_BUDGET = 2**30


def chunk_size_for(expected_rows: float, trainable_params: int, memory_budget: int = CHUNK_MEMORY_BUDGET) -> int:
    """The automatic physical batch: a power of two near 1/8 of the expected rows per step (a
    step then computes on average about half a chunk, 1/16 of a batch, of padding), at most
    what keeps one chunk's per-example gradients under `memory_budget` bytes."""
    target = 2 ** max(0, round(math.log2(max(expected_rows / 8.0, 1.0))))
    cap = max(1, memory_budget // (4 * max(int(trainable_params), 1)))
    return int(min(target, 2 ** int(math.floor(math.log2(cap)))))


def example_mask(sample_weight):
    """1.0 for the examples of a batch, 0.0 for rows with weight 0 (padding; per-token weights:
    rows without a weighted token); None if unweighted."""
    if sample_weight is None:
        return None
    weights = tf.convert_to_tensor(sample_weight)
    return tf.cast(tf.reduce_any(tf.reshape(weights, [tf.shape(weights)[0], -1]) > 0, axis=1), tf.float32)


@keras.saving.register_keras_serializable(package="dp_bitfit_keras")
class DPModel(keras.Model):
    """Differentially private fine-tuning of a Keras model (DP-BiTFiT by default).

    Marks only the selected variables trainable, and trains them with DP-SGD: per-example
    norms and clipped sums by book-keeping from layer inputs and output gradients (the variables
    of the layers it covers), or per-example gradients by `tf.vectorized_map` (any other: see
    `compile(gradient_method=...)`), clipped, summed and noised by the `DPOptimizer` it is
    compiled with, in one XLA-compiled step (`jit_compile=True`, also on CPU). Evaluation,
    prediction, `summary()` and `export()` are those of the wrapped model.

    `sample_weight` multiplies each example's loss before clipping, so the DP guarantee holds for
    any weights; weight 0 removes an example (the padding rows of `poisson_batches`).

    Args:
        model: a built Keras model (keras-hub task models included).
        trainable: `"bias"` (DP-BiTFiT), `"bias+head"`, `"all"` (DP full fine-tuning),
            `"lora"` / `"lora+head"` (Keras LoRA factors: `dpk.enable_lora(model, rank)`
            first), or a callable `variable -> bool`.

    Example:
        >>> base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
        >>> model = DPModel(base, trainable="bias")
        >>> model.compile(optimizer=DPOptimizer(keras.optimizers.SGD(0.1), 1.0, 1.0),
        ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(64, 4).astype("float32"), np.arange(64) % 2
        >>> history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        >>> model.optimizer.dp_steps, 0 < model.privacy_spent(delta=1e-3)[0] < 100
        (4, True)
    """

    def __init__(self, model, trainable="bias", **kwargs):
        if isinstance(model, dict):
            model = keras.saving.deserialize_keras_object(model)
        kwargs.setdefault("name", f"dp_{model.name}")
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(f"DPModel wraps a keras.Model; got {type(model).__name__}.")
        self.model = model
        if isinstance(trainable, dict):
            # from_config of a callable selection: positions in model.weights (variable paths
            # are not stable across save/load, the architecture's weight order is).
            chosen = {id(model.weights[i]) for i in trainable["weight_indices"]}
            trainable = lambda v: id(v) in chosen  # noqa: E731
        self.trainable_spec = trainable
        if not model.built:
            raise ValueError(
                f"Model '{model.name}' is not built: call it on a batch (or give it an Input) "
                "before wrapping it, so its variables can be selected."
            )
        selection.check_per_example_separable(model)
        self.selection = selection.select_variables(model, trainable)
        selection.apply_selection(model, self.selection)
        self.built = True

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def summary(self, *args, **kwargs):
        self.model.summary(*args, **kwargs)
        print_fn = kwargs.get("print_fn") or print
        print_fn(
            f"DP fine-tuning ({self.trainable_spec if isinstance(self.trainable_spec, str) else 'custom'}): {self.selection}"
        )

    def export(self, filepath, format="tf_saved_model", **kwargs):
        """Exports the wrapped model (plain Keras `export`, serving-ready)."""
        return self.model.export(filepath, format=format, **kwargs)

    def get_config(self):
        spec = self.trainable_spec
        if not isinstance(spec, str):
            chosen = {id(v) for v in self.selection.variables}
            spec = {"weight_indices": [i for i, v in enumerate(self.model.weights) if id(v) in chosen]}
        config = {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "trainable": spec,
        }
        # Layers whose LoRA was enabled after construction (keras-hub's backbone.enable_lora,
        # dpk.enable_lora) are not in the model's own config: record them to enable again.
        lora = {
            _kernel_prefix(layer): int(layer.lora_rank)
            for layer in selection.layers_of(self.model)
            if getattr(layer, "lora_enabled", False) and _kernel_prefix(layer)
        }
        if lora:
            config["lora_layers"] = lora
        # Biases from add_biases on layers a keras-hub backbone builds itself (its config does
        # not know of them): added again, before the weights load.
        biased = [_kernel_prefix(layer) for layer in selection.layers_of(self.model) if biases.was_added(layer)]
        if biased:
            config["added_biases"] = biased
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"), custom_objects=custom_objects)
        biased = set(config.pop("added_biases", None) or ())
        missing = [layer for layer in selection.layers_of(model) if _kernel_prefix(layer) in biased]
        if any(biases.lacks_bias(layer) for layer in missing):  # (a plain Keras config already has them)
            biases.add_biases(model, layers=missing)
        lora = config.pop("lora_layers", None) or {}
        for layer in selection.layers_of(model):
            rank = lora.get(_kernel_prefix(layer))
            if rank and not getattr(layer, "lora_enabled", False):
                layer.enable_lora(rank)
        return cls(model, **config)

    # --- Compile / fit -----------------------------------------------------------------------

    def compile(
        self, optimizer=None, loss=None, jit_compile=True, physical_batch_size="auto", gradient_method="auto", **kwargs
    ):
        """As `keras.Model.compile`, with a `DPOptimizer` and XLA on by default (also on CPU).

        `physical_batch_size`: rows whose per-example gradients are computed at once. A padded
        Poisson batch is processed chunk by chunk, and only the chunks that hold sampled rows
        are computed (an XLA while loop with a data-dependent trip count), so a step costs in
        proportion to the examples actually sampled, not to the padded size, and the
        per-example-gradient memory is bounded by one chunk. The clipped sums of the chunks
        add up to the batch's, and the noise is added once: the mechanism and ε are those of
        the whole batch. `"auto"` (default): chosen at `fit` (`chunk_size_for`); an int: that
        size; None: the whole batch at once.

        `gradient_method`: how the clipped sum of per-example gradients is computed.
        `"vectorized"`: per-example gradients of every trained variable by `vectorized_map`
        (`[batch, *shape]` each: cheap for biases, costly for kernels). `"bookkeeping"`: from
        each layer's input and output gradient in one batched forward/backward pass, without
        per-example weight gradients (`dp_bitfit_keras.bookkeeping`; variables it does not
        cover fall back to vectorized_map, with a warning). `"auto"` (default): book-keeping
        when the selection trains more than biases, or biases that book-keeping covers all of
        (Dense, EinsumDense, LayerNormalization, keras-hub's RMS norms, ...); vectorized for
        other bias selections. Both give the same update (to float round-off); SPARTA's masked
        and absolute gradients always use the vectorized path.
        """
        if gradient_method not in GRADIENT_METHODS:
            raise ValueError(f"gradient_method must be one of {GRADIENT_METHODS}; got {gradient_method!r}.")
        if gradient_method == "bookkeeping" and isinstance(self.model, users.PerUserModel):
            raise ValueError(
                "A PerUserModel's per-user gradients need gradient_method='vectorized' (or 'auto'): "
                "book-keeping attributes gradients to rows, not to the users they are packed into."
            )
        self.gradient_method = gradient_method
        if physical_batch_size not in ("auto", None) and not (
            isinstance(physical_batch_size, int) and physical_batch_size >= 1
        ):
            raise ValueError(f"physical_batch_size must be 'auto', None or an int >= 1; got {physical_batch_size!r}.")
        self.physical_batch_size = physical_batch_size
        self._chunk = physical_batch_size if isinstance(physical_batch_size, int) else None
        if not isinstance(optimizer, DPOptimizer):
            raise ValueError(
                "DPModel trains with a dp_bitfit_keras.DPOptimizer, e.g. "
                "DPOptimizer(keras.optimizers.Adam(1e-3), l2_norm_clip=1.0, noise_multiplier=1.0); "
                f"got {optimizer!r}."
            )
        if loss is None:
            raise ValueError("DPModel.compile needs a loss (one value per example).")
        self._per_example_loss = per_example_loss(loss)
        if jit_compile == "auto":
            jit_compile = True  # "auto" turns XLA off on CPU; the per-example step needs it.
        # One XLA program cannot hold the variables of several replicas' devices: under a
        # multi-replica strategy the step runs as a graph and each replica's per-example
        # gradients are XLA-compiled on their own.
        # (Also under a one-replica strategy, e.g. a one-worker cluster: its optimizer step is a
        # cross-replica merge_call, which XLA cannot hold either.)
        self._nested_xla = bool(jit_compile) and (
            self.distribute_strategy.num_replicas_in_sync > 1 or getattr(self, "_distribute_strategy", None) is not None
        )
        if self._nested_xla:
            jit_compile = False
        super().compile(optimizer=optimizer, loss=loss, jit_compile=jit_compile, **kwargs)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Keras wraps the optimizer under mixed_float16. Its dynamic loss scale skips a step
            # when any gradient overflows, a data-dependent decision that DP cannot allow: scale
            # each example's loss by a fixed factor instead, unscale in float32; the examples
            # whose gradient still overflows get weight 0 (as any non-finite gradient does, see
            # clipping.clipped_sum). Norms and clipping are float32.
            self.optimizer = self.optimizer.inner_optimizer
            self._loss_scale = MIXED_FLOAT16_LOSS_SCALE
        else:
            self._loss_scale = None

    def compile_from_config(self, config):
        # Keras skips this for models that override compile(); ours is compile() plus checks.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        self.optimizer.build(self.trainable_variables)

    @property
    def per_example_loss(self):
        """The compiled loss as a per-example function `(y_true, y_pred) -> [batch]`."""
        return self._per_example_loss

    def uses_bookkeeping(self) -> bool:
        """Whether the step computes clipped sums by book-keeping (see `compile`)."""
        method = getattr(self, "gradient_method", "auto")
        optimizer = getattr(self, "optimizer", None)
        if method == "vectorized" or (isinstance(optimizer, DPOptimizer) and optimizer.needs_per_example_gradients):
            return False
        if isinstance(self.model, users.PerUserModel):  # book-keeping would attribute rows, not users
            return False
        if method == "bookkeeping":
            return True
        # auto: book-keeping beyond biases, and for biases too when it covers every one of them
        # (measured: on decoders vectorized_map's per-example bias gradients cost up to 1.6x the
        # time and 1.25x the memory of the non-private step, book-keeping's about 1x both).
        variables = list(self.selection.variables)
        biases = {id(v) for v in selection.bias_variables(self.model)}
        if any(id(v) not in biases for v in variables):
            return True
        return not bookkeeping.covered_variables(self.model, variables)[1]

    def _per_example_params(self) -> int:
        """Scalars whose per-example gradients the step materializes (for the chunk size)."""
        variables = list(self.selection.variables)
        if self.uses_bookkeeping():
            variables = bookkeeping.covered_variables(self.model, variables)[1]
        return sum(selection.size_of(v) for v in variables)

    def _clip_sum_function(self, variables):
        """`(x, y, sample_weight) -> (summed, below, losses, y_pred)`: a batch's clipped sum."""
        loss_scale = getattr(self, "_loss_scale", None)
        if self.uses_bookkeeping():

            def clip_sum(x, y, sample_weight):
                return bookkeeping.clipped_sums(
                    self.model,
                    self._per_example_loss,
                    x,
                    y,
                    variables,
                    sample_weight,
                    self.optimizer,
                    mask=example_mask(sample_weight),
                    training=True,
                    loss_scale=loss_scale,
                )
        else:

            def clip_sum(x, y, sample_weight):
                grads, losses, y_pred = gradients.per_example_outputs(
                    self.model,
                    self._per_example_loss,
                    x,
                    y,
                    variables,
                    sample_weight,
                    training=True,
                    loss_scale=loss_scale,
                )
                summed, below, _ = self.optimizer.clipped_sum(grads, variables, example_mask(sample_weight))
                return summed, below, losses, y_pred

        if getattr(self, "_nested_xla", False):
            clip_sum = tf.function(clip_sum, jit_compile=True, autograph=False)
        return clip_sum

    def train_step(self, data):
        return self._reducible_logs(self._train_step(data))

    def test_step(self, data):
        return self._reducible_logs(super().test_step(data))

    def _reducible_logs(self, logs):
        if distribute.is_multi_worker(self.distribute_strategy):
            # Keras reduces each replica's logs by a mean over axis 0 under a multi-worker
            # strategy, which fails for scalars: hand it one-element vectors (monitoring only).
            logs = {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs

    def _train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = list(self.selection.variables)
        clip_sum = self._clip_sum_function(variables)
        chunk = getattr(self, "_chunk", None)
        rows = tf.nest.flatten(x)[0].shape[0]
        if sample_weight is not None and chunk is not None and rows is not None and chunk < rows:
            return self._chunked_step(clip_sum, x, y, sample_weight, variables, chunk, rows)
        summed, below, losses, y_pred = clip_sum(x, y, sample_weight)
        self.optimizer.apply_clipped_sum(summed, below, variables)
        self._track_loss(losses, example_mask(sample_weight))
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def _chunked_step(self, clip_sum, x, y, sample_weight, variables, chunk, rows):
        """One step over the chunks of `chunk` rows that hold examples (weight > 0).

        Privacy: the chunks' clipped sums add up to exactly the clipped sum of the batch (each
        example is clipped on its own, rows of weight 0 contribute nothing), and the noise is
        added once, by `apply_clipped_sum`: the released update is that of the whole batch.
        What depends on the sample is how many chunks run, i.e. the step's duration (as in
        Opacus' variable-size batches), never the weights.
        """
        padded = -(-rows // chunk) * chunk
        pad = padded - rows

        def to_padded(t):
            # Static shapes for XLA: pad the batch to whole chunks with rows of weight 0.
            t = tf.convert_to_tensor(t)
            return tf.pad(t, [[0, pad]] + [[0, 0]] * (len(t.shape) - 1)) if pad else t

        x, y, sample_weight = (tf.nest.map_structure(to_padded, t) for t in (x, y, sample_weight))
        mask = example_mask(sample_weight)
        # Chunks up to the last sampled row (a Poisson batch holds its sampled rows first).
        last = tf.reduce_max(tf.where(mask > 0, tf.range(padded), -1)) + 1
        num_chunks = (last + chunk - 1) // chunk

        def rows_of(t, i):
            return tf.nest.map_structure(
                lambda a: tf.slice(a, [i * chunk] + [0] * (len(a.shape) - 1), [chunk] + a.shape[1:]), t
            )

        def body(i, sums, below):
            xs, ys, ws = rows_of(x, i), rows_of(y, i), rows_of(sample_weight, i)
            part, part_below, losses, y_pred = clip_sum(xs, ys, ws)
            self._track_loss(losses, example_mask(ws))
            self._update_metrics(ys, y_pred, ws)
            sums = [a + tf.cast(p, tf.float32) for a, p in zip(sums, part)]
            return i + 1, sums, below + part_below

        zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
        _, sums, below = tf.while_loop(
            lambda i, *_: i < num_chunks,
            body,
            (tf.constant(0), zeros, tf.constant(0.0)),
            maximum_iterations=padded // chunk,
        )
        sums = [tf.cast(s, v.dtype) for s, v in zip(sums, variables)]
        self.optimizer.apply_clipped_sum(sums, below, variables)
        return self.get_metrics_result()

    def _track_loss(self, losses, mask):
        # Metrics describe the private batch; they are for monitoring, not released with DP.
        # An example whose loss is not finite is dropped from the step (clipping.clipped_sum):
        # leave it out of the mean too, so the progress bar does not turn NaN.
        weights = tf.ones_like(losses) if mask is None else mask
        finite = tf.math.is_finite(losses)
        weights = tf.where(finite, weights, 0.0)
        losses = tf.where(finite, losses, 0.0)
        self._loss_tracker.update_state(
            tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0),
            sample_weight=tf.reduce_sum(weights),
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Keras' unweighted `metrics` ignore sample_weight, so they would count the zero-weight
        # padding rows of a Poisson batch as examples: give them the 0/1 example mask instead.
        metrics = self._compile_metrics
        if metrics is None or sample_weight is None:
            return super().compute_metrics(x, y, y_pred, sample_weight)
        self._update_metrics(y, y_pred, sample_weight)
        return self.get_metrics_result()

    def _update_metrics(self, y, y_pred, sample_weight):
        metrics = self._compile_metrics
        if metrics is None:
            return
        if not metrics.built:
            metrics.build(y, y_pred)
        mask = example_mask(sample_weight)
        for unweighted, weighted, y_t, y_p in zip(
            metrics._flat_metrics, metrics._flat_weighted_metrics, metrics._flatten_y(y), metrics._flatten_y(y_pred)
        ):
            if unweighted:
                unweighted.update_state(y_t, y_p, sample_weight=mask)
            if weighted:
                weighted.update_state(y_t, y_p, sample_weight=sample_weight)

    def fit(self, x=None, y=None, batch_size=None, epochs=1, *, sampling_rate=None, **kwargs):
        """`keras.Model.fit` with Poisson sampling and the privacy ledger set up.

        Data forms:
          - arrays / tensors / dicts of them: Poisson-sampled with q = `batch_size`/n by
            `poisson_batches` (batch_size default 32).
          - a dataset from `poisson_batches`: used as is, q from it.
          - any other batched `tf.data.Dataset`: give `sampling_rate`; accounting then assumes
            Poisson sampling at that rate, which shuffled fixed-size batches only approximate.

        Keras' `sample_weight` (arrays: `[n]`, or per token `[n, T]`: one example's loss is then
        Σ_t w_t·ℓ_t / Σ_t w_t), `class_weight` (arrays with integer class labels),
        `validation_split` (arrays: the last fraction is held out, as Keras does, and never
        enters the private sampling), `validation_data` and `initial_epoch` work as in Keras.

        User-level privacy (arrays): `user_ids=` (one id per row) and `max_examples_per_user=k`
        sample users instead of rows (q = `batch_size` / number of users: `batch_size` is the
        expected number of users per step), clip each row at C/k, and account ε per user
        (`optimizer.privacy_unit`); a `poisson_batches(..., user_ids=...)` dataset does the same.
        A `DPModel` around a `dp_bitfit_keras.users.PerUserModel`, fit on `pack_users` arrays,
        clips each user's whole gradient at C instead (and accounts per user).

        Data held in memory (arrays, `poisson_batches`) is checked before any step: a NaN/inf
        value, an integer label outside the model's classes or one-hot labels of the wrong
        width raise a `ValueError` naming the first offending row. Inside the step, an example
        whose gradient is still not finite gets weight 0 (it is neither trained on nor able to
        turn the weights into NaN).
        """
        if not isinstance(self.optimizer, DPOptimizer):
            raise ValueError("Compile the DPModel with a DPOptimizer before fit.")
        strategy = self.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        k = self.optimizer.accumulation_steps
        if (replicas > 1 or getattr(self, "_distribute_strategy", None) is not None) and self.steps_per_execution != 1:
            raise ValueError(
                "Under a multi-replica strategy DPModel needs steps_per_execution=1 (the step budget is checked between steps)."
            )
        if kwargs.get("user_ids") is not None and kwargs.get("validation_split"):
            raise ValueError("validation_split cannot split users: hold out users yourself and pass validation_data.")
        x, y, kwargs = self._hold_out_validation(x, y, kwargs)
        dataset, q, expected, n = self._private_data(x, y, batch_size, sampling_rate, kwargs)
        sampler = getattr(dataset, "dp_sampler", None)
        unit, per_unit = (sampler.unit, sampler.examples_per_unit) if sampler is not None else ("example", 1)
        if unit != "example" and (replicas > 1 or getattr(self, "_distribute_strategy", None) is not None):
            raise ValueError(
                "Row-level user sampling (user_ids=) under a tf.distribute strategy is not supported: pack "
                "the users as examples instead (dp_bitfit_keras.users.pack_users and PerUserModel)."
            )
        if isinstance(self.model, users.PerUserModel):
            if unit != "example":
                raise ValueError("A PerUserModel's examples are users already (pack_users): do not pass user_ids.")
            unit = "user"  # one example = one user's packed rows, clipped as a whole at C
        if replicas > 1 and sampler is None and (k > 1 or distribute.is_multi_worker(strategy)):
            raise ValueError(
                "Under a multi-worker strategy, or with gradient accumulation under any multi-replica "
                "strategy, DPModel.fit needs arrays or a dp_bitfit_keras.poisson_batches dataset: it must "
                "split each global Poisson batch over the replicas itself (a dataset Keras shards per "
                "worker, or one it cannot re-batch, would be another mechanism than the one accounted)."
            )
        if sampler is not None and sampler.micro_batches != k:
            raise ValueError(
                f"The dataset splits each Poisson batch into {sampler.micro_batches} micro-batches but "
                f"the optimizer accumulates {k}: build it with poisson_batches(..., micro_batches={k})."
            )
        with strategy.scope():  # optimizer slots (e.g. Adam's) are per-replica variables
            self.optimizer.build(list(self.selection.variables))
        # Under several replicas the k micro-batches of a step arrive as one batch, processed in
        # chunks inside the step (same clipped sum, one noise; the memory is bounded by the chunk).
        fold = replicas > 1 and k > 1
        self.optimizer.fold_accumulation = fold
        if replicas > 1 and sampler is not None:
            dataset = self._replicated_batches(dataset, sampler, fold, epochs, kwargs)
            sampler = dataset.dp_sampler
        micro = 1 if fold else k
        steps_per_epoch = kwargs.pop("steps_per_epoch", None) or int(dataset.cardinality())
        if steps_per_epoch < 0:
            raise ValueError("Pass steps_per_epoch for a dataset of unknown length.")
        if steps_per_epoch % micro:
            raise ValueError(
                f"steps_per_epoch ({steps_per_epoch}) must be a multiple of gradient_accumulation_steps ({k})."
            )
        self.optimizer.set_privacy_unit(unit, per_unit)
        self.optimizer.begin_run(q, expected, steps_per_epoch // micro * (epochs - kwargs.get("initial_epoch", 0)), n)
        chunk = self._chunk
        if getattr(self, "physical_batch_size", None) == "auto":
            chunk = chunk_size_for(expected * per_unit / (k * replicas), self._per_example_params())
        if fold:  # at most a k-th of the replica's batch at once, as accumulation would
            per_replica = sampler.max_batch_size // replicas
            chunk = min(chunk or per_replica, -(-per_replica // k))
        if chunk != self._chunk:
            self._chunk = chunk
            self.train_function = None  # retrace with the new chunk size
        # Keras' fit reduces a distributed batch to learn the input shapes, which fails under a
        # multi-worker strategy (keras-team/keras#20585) and would draw a Poisson batch that no
        # step uses: DPModel builds from the dataset's element spec instead.
        self._fit_element_spec = dataset.element_spec
        kwargs.setdefault("shuffle", False)  # Sampling is the dataset's job (Poisson).
        callbacks = list(kwargs.pop("callbacks", None) or []) + [_LedgerSync(sampler)]
        return super().fit(dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, **kwargs)

    def _replicated_batches(self, dataset, sampler, fold, epochs, kwargs):
        """The Poisson stream to split over the replicas: every worker draws the same global batches.

        Rebuilt from the sampler's examples with micro_batches=1 when accumulation is folded into
        the step, and, on several workers, after checking that the workers agree on the run and
        agreeing on secret keys (`dp_bitfit_keras.distribute`). Sharded by data: each global
        batch is cut into one slice per replica, whichever worker holds it.
        """
        strategy = self.distribute_strategy
        optimizer = self.optimizer
        key = None
        if distribute.is_multi_worker(strategy):
            seed = optimizer.seed
            facts = dict(
                num_examples=sampler.num_examples,
                sampling_rate=sampler.sampling_rate,
                max_batch_size=sampler.max_batch_size,
                steps_per_epoch=sampler.steps_per_epoch,
                epochs=epochs,
                initial_epoch=kwargs.get("initial_epoch", 0),
                accumulation=optimizer.accumulation_steps,
                noise_seed=-1 if seed is None else seed,
                sampling_seed=-1 if sampler.seed is None else sampler.seed,
                noise_multiplier=-1
                if optimizer.initial_noise_multiplier is None
                else optimizer.initial_noise_multiplier,
                target_epsilon=-1 if optimizer.target_epsilon is None else optimizer.target_epsilon,
                l2_norm_clip=optimizer.l2_norm_clip,
                dp_steps=optimizer.dp_steps,
                batches_seen=optimizer.batches_seen,
                weights=distribute.fingerprint(self.model.weights),
            )
            distribute.check_workers_agree(strategy, facts)
            if sampler.seed is None:
                key = prng.new_key()
            if seed is None:
                # The first replica's keys for everyone (see dp_bitfit_keras.distribute).
                noise_key, *rest = distribute.broadcast_from_first_replica(
                    strategy, [optimizer.noise_key()] + ([key] if key is not None else [])
                )
                optimizer.set_noise_key(noise_key)
                key = rest[0] if rest else None
            elif key is not None:
                (key,) = distribute.broadcast_from_first_replica(strategy, [key])
        # Whole slices for every replica (and whole chunks of a k-th within each): pad the batch.
        multiple = strategy.num_replicas_in_sync * optimizer.accumulation_steps
        padded = -(-sampler.max_batch_size // multiple) * multiple
        rebuilt = sampling.poisson_batches_from_tensors(
            sampler.examples,
            sampler.sampling_rate,
            padded,
            steps_per_epoch=sampler.steps_per_epoch,
            seed=sampler.seed,
            micro_batches=1 if fold else sampler.micro_batches,
            key=key,
        )
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        out = rebuilt.with_options(options)
        out.dp_sampler = rebuilt.dp_sampler
        return out

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        spec = getattr(self, "_fit_element_spec", None)
        if iterator is not None and data_batch is None and self._distribute_strategy is not None:
            # See fit: shapes from the element spec; nothing is drawn from the dataset.
            try:
                spec = iterator.data_adapter.get_tf_dataset().element_spec
            except Exception:  # noqa: BLE001 - fall back to fit's spec
                pass
            if spec is not None:
                return super()._maybe_symbolic_build(data_batch=spec)
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def train_on_batch(self, *args, **kwargs):
        if self.distribute_strategy.num_replicas_in_sync > 1:
            # Keras hands every replica the whole batch here: each example would be counted
            # once per replica, multiplying its sensitivity.
            raise ValueError(
                "Under a multi-replica strategy, train a DPModel with fit() on a dataset (Keras splits its batches over the replicas)."
            )
        return super().train_on_batch(*args, **kwargs)

    @staticmethod
    def _hold_out_validation(x, y, kwargs):
        """Keras' `validation_split` on arrays: the last fraction, before any sampling."""
        split = kwargs.pop("validation_split", None) or 0.0
        if not split:
            return x, y, kwargs
        if isinstance(x, tf.data.Dataset):
            raise ValueError("validation_split needs arrays; with a dataset, pass validation_data.")
        if kwargs.get("validation_data") is not None:
            raise ValueError("Give validation_split or validation_data, not both.")
        if not 0 < split < 1:
            raise ValueError(f"validation_split must be in (0, 1); got {split}.")
        n = int(tf.nest.flatten(x)[0].shape[0])
        held = int(n * split)
        if not 0 < held < n:
            raise ValueError(f"validation_split={split} of {n} examples leaves no training or no validation example.")
        weights = kwargs.get("sample_weight")
        first, last = (lambda t: t[: n - held]), (lambda t: t[n - held :])
        validation = (tf.nest.map_structure(last, x), None if y is None else tf.nest.map_structure(last, y))
        if weights is not None:
            validation += (last(weights),)
            kwargs["sample_weight"] = first(weights)
        kwargs["validation_data"] = validation
        return tf.nest.map_structure(first, x), None if y is None else tf.nest.map_structure(first, y), kwargs

    def _private_data(self, x, y, batch_size, sampling_rate, kwargs):
        weights = kwargs.pop("sample_weight", None)
        class_weight = kwargs.pop("class_weight", None)
        user_ids = kwargs.pop("user_ids", None)
        per_user = kwargs.pop("max_examples_per_user", None)
        if isinstance(x, tf.data.Dataset) and (user_ids is not None or per_user is not None):
            raise ValueError(
                "With a dataset, users come from the dataset: build it as poisson_batches(..., user_ids=..., "
                "max_examples_per_user=...); user_ids= is for arrays."
            )
        if isinstance(x, tf.data.Dataset):
            if weights is not None or class_weight is not None:
                raise ValueError(
                    "With a dataset, sample weights come from the dataset: build it as "
                    "poisson_batches((x, y, sample_weight), ...) (class weights folded into them); "
                    "sample_weight= and class_weight= are for arrays."
                )
            if y is not None:
                raise ValueError("With a tf.data.Dataset, y comes from the dataset; got y too.")
            sampler = getattr(x, "dp_sampler", None)
            if sampler is not None:
                examples = sampler.examples
                if isinstance(examples, tuple) and len(examples) in (2, 3):  # (x, y[, sample_weight])
                    self._check_labels(examples[0], examples[1])
                return x, sampler.sampling_rate, sampler.expected_batch_size, sampler.num_examples
            if sampling_rate is None:
                raise ValueError(
                    "DPModel.fit cannot tell the sampling rate of this dataset. Build it with "
                    "dp_bitfit_keras.poisson_batches (honest Poisson sampling, recommended), or pass "
                    "sampling_rate=batch_size/num_examples to account its batches as Poisson samples."
                )
            spec = tf.nest.flatten(x.element_spec)[0]
            static_batch = spec.shape[0]
            if static_batch is None:
                raise ValueError(
                    "Batches of varying size would retrace the compiled step: use poisson_batches, "
                    "or batch with drop_remainder=True."
                )
            warnings.warn(
                "Accounting these batches as Poisson samples at the given sampling_rate; shuffled "
                "fixed-size batches are a different mechanism. poisson_batches matches the analysis.",
                stacklevel=3,
            )
            return x, float(sampling_rate), float(static_batch), None
        checks.check_finite(x, "x")
        checks.check_finite(y, "y")
        self._check_labels(x, y)
        n = int(tf.nest.flatten(x)[0].shape[0])
        weights = checks.sample_weights(weights, class_weight, y, n)
        units, rows_per_unit = n, 1
        if user_ids is not None:
            if len(user_ids) != n:
                raise ValueError(f"user_ids has {len(user_ids)} entries for {n} examples.")
            units, rows_per_unit = sampling.user_index(user_ids, per_user)[2], per_user
        elif per_user is not None:
            raise ValueError("max_examples_per_user is for user-level privacy: give user_ids too.")
        batch_size = batch_size or _DEFAULT_BATCH_SIZE
        if not 0 < batch_size <= units:
            what = "users" if user_ids is not None else "the dataset size"
            raise ValueError(f"batch_size must be in [1, {units}] ({what}); got {batch_size}.")
        q = sampling_rate or batch_size / units
        k = self.optimizer.accumulation_steps
        multiple = k * self.distribute_strategy.num_replicas_in_sync
        padded = sampling.max_batch_size_for(units, q) * rows_per_unit
        padded = -(-padded // multiple) * multiple
        # The optimizer's explicit seed (if any) makes the sample reproducible too; by default
        # both are keyed by secret keys from the operating system.
        # (The arrays were checked above: no second pass over them.)
        examples = tf.nest.map_structure(tf.convert_to_tensor, (x, y) if weights is None else (x, y, weights))
        dataset = sampling.poisson_batches_from_tensors(
            examples,
            q,
            padded,
            micro_batches=k,
            seed=self.optimizer.seed,
            user_ids=user_ids,
            max_examples_per_user=per_user,
        )
        return dataset, q, q * units, units

    def _check_labels(self, x, y):
        checks.check_labels(y, checks.output_width(self.model, x), self._per_example_loss)

    # --- Privacy --------------------------------------------------------------------------------

    def privacy_spent(self, delta: float) -> tuple[float, float]:
        """(ε, δ) spent by the DP steps this model's optimizer has taken."""
        if not isinstance(self.optimizer, DPOptimizer):
            raise ValueError("Compile the DPModel with a DPOptimizer first.")
        return self.optimizer.privacy_spent(delta)


class _LedgerSync(keras.callbacks.Callback):
    """Keeps a run on its plan, and a resumed run on the original's track.

    Runs after the user's callbacks, so after `keras.callbacks.BackupAndRestore` has restored
    the weights and the optimizer's ledger: it then moves the Poisson sampler to the first
    micro-batch the restored ledger has not consumed (a resumed run draws exactly the batches
    the uninterrupted run would have; none is replayed or skipped), and stops training when the
    ledger reaches the run's planned number of steps (BackupAndRestore resumes at the start of
    the interrupted epoch, which would otherwise add steps).
    """

    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        strategy = self.model.distribute_strategy
        if distribute.is_multi_worker(strategy):
            # After any BackupAndRestore: every worker must continue from the same state.
            distribute.check_workers_agree(
                strategy,
                dict(
                    dp_steps=optimizer.dp_steps,
                    batches_seen=optimizer.batches_seen,
                    noise_multiplier=optimizer.noise_multiplier,
                    weights=distribute.fingerprint(self.model.weights),
                ),
            )
        seen = optimizer.batches_seen
        if seen > 0:
            _revive_merged_lora(self.model.model, seen)
        # A run from an empty ledger ends exactly at its plan: only a restored (or continued)
        # ledger needs the per-step check, which reads the device each step.
        self._check_plan = seen > 0
        self._planned = optimizer.planned_dp_steps
        if self.sampler is not None and seen > 0:
            self.sampler.step.assign(seen)

    def on_train_batch_end(self, batch, logs=None):
        if self._check_plan and self.model.optimizer.dp_steps >= self._planned:
            self.model.stop_training = True


def _kernel_prefix(layer):
    """A layer's variable path prefix (`.../query` of `.../query/kernel`), or None."""
    # `_kernel` first: with LoRA enabled, `layer.kernel` is the merged tensor, not the variable.
    for name in ("_kernel", "kernel", "_embeddings", "embeddings"):
        path = getattr(getattr(layer, name, None), "path", None)
        if path:
            return path.rsplit("/", 1)[0]
    return None


def _revive_merged_lora(model, seed):
    """Keras saves a LoRA layer with its factors merged into the kernel and loads it with both
    factors at zero, where neither gets a gradient again: a DP-LoRA run restored by
    `BackupAndRestore` would silently stop learning. Both factors at zero (never the case while
    training: A starts random) mean such a restore: A is drawn afresh from the layer's
    initialiser (seeded by the step count, the same on every worker), B stays zero, so the
    function is unchanged and training continues (from a new factorisation: the resumed run
    is a valid LoRA run, not bit-identical to an uninterrupted one).
    """
    revived = []
    for layer in selection.layers_of(model):
        if not getattr(layer, "lora_enabled", False):
            continue
        factors = [v for v in layer._trainable_variables if v.name.startswith("lora_")]
        a = [v for v in factors if v.name.endswith("_a")]
        if factors and a and all(not tf.reduce_any(tf.not_equal(v, 0)).numpy() for v in factors):
            init = keras.initializers.HeUniform(seed=seed + len(revived))
            for v in a:
                v.assign(init(v.shape, v.dtype))
            revived.append(layer.name)
    if revived:
        warnings.warn(
            f"Restored LoRA factors were merged into their kernels by Keras' saving (both factors "
            f"at zero): re-initialised A of {revived} so that training continues.",
            stacklevel=2,
        )
    return revived
