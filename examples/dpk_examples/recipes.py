"""One training run of a named method: what the example binaries and the utility sweep share.

Methods (same model, data and seed; only what is trained and whether it is private differ):
`full`, `bitfit`, `bitfit_head`, `lora` (non-private Keras `fit`), `dp_bitfit`, `dp_bitfit_head`,
`dp_full`, `dp_lora` (DPModel). A new task's classifier head starts random, and bias-only training cannot
rotate it: compare `dp_bitfit_head` with `bitfit_head`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

import keras
import numpy as np

from dp_bitfit_keras.callbacks import PrivacyCallback
from dp_bitfit_keras.methods.dpzero import dpzero
from dp_bitfit_keras.methods.sparta import sparta_fit
from dp_bitfit_keras.methods.two_phase import two_phase_fit
from dp_bitfit_keras.model import DPModel
from dp_bitfit_keras.optimizer import DPOptimizer
from dp_bitfit_keras.selection import apply_selection, enable_lora, head_layer, select_variables
from dp_bitfit_keras.users import PerUserModel, pack_users

METHODS = {
    # name: (variables, private)
    "full": ("all", False),
    "bitfit": ("bias", False),
    "bitfit_head": ("bias+head", False),
    "dp_bitfit": ("bias", True),
    "dp_bitfit_head": ("bias+head", True),
    "dp_full": ("all", True),
    # LoRA through Keras' own enable_lora (rank LORA_RANK; keras-hub: attention query/value)
    # plus the head; the private one gets its per-example norms by book-keeping.
    "lora": ("lora+head", False),
    "dp_lora": ("lora+head", True),
    # Other private methods on the same engine (dp_bitfit_keras.methods):
    "dpzero": ("all", True),  # zeroth order: two forward passes, no backward
    "sparta": ("sparse", True),  # SPARTA as published: private row selection, then DP-SGD on 20% of the kernel entries
    "sparta_signed": ("sparse", True),  # the earlier selection (signed noisy sums, input-feature rows): comparison only
    "two_phase": ("all, then bias", True),  # DP full for half the epochs, then DP-BiTFiT
}
SPECIAL_LEARNING_RATES = {
    "dpzero": 1e-5,  # SGD; the paper's 1e-6 is for OPT-size models and moves MiniLM too little in few steps
    "sparta": 1e-3,  # Adam on the selected rows
    "sparta_signed": 1e-3,
    "two_phase": (5e-4, 5e-3),  # Adam: DP full, then bias-only (the paper's rates)
}
DPZERO_CLIP = 200.0  # the paper's C for the per-example scalar
# Adam learning rates for each kind of run: ~5e-3 for bias-only as in the DP-BiTFiT paper;
# 1e-2 for bias+head (private: 79.8% vs 70.7% at 3e-3 on the offline text task's validation
# split, the study's first stage) and 1e-4 for non-private full fine-tuning (89.9% vs 89.0% at
# 5e-5), both from examples/accuracy_study.py; LoRA's 2e-3 and dp_full's 5e-4 are not tuned
# on text (both stayed at the majority class there).
DEFAULT_LEARNING_RATES = {"all": 1e-4, "bias": 5e-3, "bias+head": 1e-2, "lora+head": 2e-3}
LORA_RANK = 8
LR_SCHEDULES = ("constant", "linear")
# User level: each row clipped at C/k, or each user's packed rows clipped together at C.
USER_CLIPPING = ("rows", "sum")
TWO_PHASE_METHODS = ("sparta", "sparta_signed", "two_phase")  # run by their own fit functions (methods/)
OWN_OPTIMIZER_METHODS = (
    *TWO_PHASE_METHODS,
    "dpzero",
)  # build their own inner optimizers (`optimizer`, `ema_momentum` refused)
OPTIMIZERS = {  # inner optimizer by name (learning rate or schedule -> optimizer)
    "adam": lambda lr, **kw: keras.optimizers.Adam(lr, **kw),
    "sgd": lambda lr, **kw: keras.optimizers.SGD(lr, momentum=0.9, **kw),
}
DP_FULL_LEARNING_RATE = 5e-4


def optimizer_for(method: str, requested: str | None, learning_rate: float | None, default: str = "adam") -> str:
    """The inner optimizer of a run: `requested`, or `default` (the one the method's default
    learning rate is tuned for). Refuses another optimizer with that default rate: Adam's and
    SGD's step sizes differ by an order of magnitude."""
    if requested is None or requested == default:
        return default
    if learning_rate is None:
        raise ValueError(
            f"optimizer={requested!r} for {method}: give its learning rate too (the default rate is {default!r}'s)."
        )
    return requested


def default_learning_rate(method: str) -> float:
    if method in SPECIAL_LEARNING_RATES:
        return SPECIAL_LEARNING_RATES[method]
    trainable, private = METHODS[method]
    return DP_FULL_LEARNING_RATE if (private and trainable == "all") else DEFAULT_LEARNING_RATES[trainable]


class StepTimer(keras.callbacks.Callback):
    """Median wall time of training steps, the first (compilation) excluded.

    With gradient accumulation a step is `group` consecutive micro-batches (`fit`'s batches):
    their times are summed, so ms/step compares across accumulation settings.
    """

    def __init__(self, group: int = 1):
        super().__init__()
        self.group = group
        self.times = []
        self._pending = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._pending.append(time.perf_counter() - self._start)
        if len(self._pending) == self.group:
            self.times.append(sum(self._pending))
            self._pending = []

    @property
    def ms_per_step(self) -> float:
        times = self.times[1:] or self.times
        return 1e3 * float(np.median(times)) if times else math.nan


@dataclasses.dataclass
class RunResult:
    method: str
    epsilon: float
    delta: float
    noise_multiplier: float | None
    validation_accuracy: float
    test_accuracy: float
    ms_per_step: float
    trainable_params: int
    trainable_fraction: float
    steps: int
    model: keras.Model = dataclasses.field(repr=False, default=None)

    @property
    def base_model(self) -> keras.Model:
        """The trained Keras model itself (unwrapped from DPModel): what gets exported."""
        model = self.model.model if isinstance(self.model, DPModel) else self.model
        return model.model if isinstance(model, PerUserModel) else model

    def as_dict(self):
        # Not dataclasses.asdict: it would deep-copy (pickle) the trained model first.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}


def train(
    method: str,
    build_model: Callable[[], keras.Model],
    train_data: tuple,
    validation_data: tuple,
    test_data: tuple,
    *,
    epsilon: float = 8.0,
    delta: float | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    l2_norm_clip: float = 1.0,
    clipping: str = "abadi",
    learning_rate: float | None = None,
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    noise_seed: int | None = None,
    head_init: str = "auto",
    lr_schedule: str = "constant",
    optimizer: str = "adam",
    ema_momentum: float | None = None,
    noise_multiplier: float | None = None,
    user_ids=None,
    max_examples_per_user: int | None = None,
    user_clipping: str = "rows",
    verbose: int = 1,
    callbacks=(),
) -> RunResult:
    """Trains `build_model()` with `method` and evaluates it.

    Args:
        method: one of `METHODS`.
        build_model: returns a fresh, built Keras classifier (logits output).
        train_data, validation_data, test_data: `(x, y)` arrays (x may be a dict).
        epsilon: target ε for private methods (`inf` is not private: use `bitfit`/`full`).
        delta: δ; default 1/(2n).
        batch_size: expected (Poisson) batch size for private methods, fixed otherwise.
        gradient_accumulation_steps: private methods split each Poisson batch into this many
            micro-batches and add the noise once per batch: the same mechanism (and ε) in
            about 1/k of the per-example-gradient memory (what lets `dp_full` fit).
        seed: initialisation, dropout and everything else Keras' global seed governs.
        noise_seed: None (default): the DP noise and the Poisson samples are keyed by secret
            keys from the operating system, so a run is private even though `seed` is public.
            An int makes them reproducible too (warns: not private against whoever knows it).
        l2_norm_clip, clipping: C and the clipping style. Defaults (Abadi clipping at C = 1)
            from `examples/accuracy_study.py`: better than automatic clipping at C = 0.1 on the
            validation splits of both offline tasks.
        head_init: `"random"` (the model's own initialiser), `"zeros"` (the classifier head's
            kernel starts at 0, so the first private steps are not spent undoing a random
            head: +2.4 and +6 points of validation accuracy on the text and digits tasks in
            the study), or `"auto"` (default): zeros for private methods that train the head,
            the model's own otherwise (bias-only training could not move a zero head).
        lr_schedule: `"constant"` (default) or `"linear"`: the learning rate decays linearly
            from `learning_rate` to 0 over the run's optimizer steps (DP-BiTFiT, DP full, DP-LoRA,
            DPZero and the non-private methods; not the two-phase methods).
        optimizer: `"adam"` (default) or `"sgd"` (momentum 0.9) for DP-BiTFiT, DP full,
            DP-LoRA and the non-private methods; the two-phase methods use Adam and DPZero
            plain SGD (its paper's update), whatever this says.
        ema_momentum: None (default), or m in (0, 1): the inner optimizer keeps an exponential
            moving average of the trained weights (Keras' `use_ema`, average ← m·average +
            (1 - m)·weights after every step) and the run ends with the average in the model
            (evaluation and export see it). For a private run it averages the noisy iterates,
            post-processing that costs no ε (De et al. 2022 found it helps DP-SGD). Same methods
            as `optimizer`.
        noise_multiplier: None (default): σ is calibrated so the run spends `epsilon`. A number
            σ >= 0 is used as is and `epsilon` is ignored (the reported ε is what σ spends;
            σ = 0 clips and samples but adds no noise: **not private**, for measuring how much of
            a gap the noise itself costs). Not for the two-phase methods.
        user_ids, max_examples_per_user: user-level privacy (`DPModel.fit`'s): users are
            Poisson-sampled, `batch_size` is the expected number of users per step, each row is
            clipped at C/k and ε (δ default 1/(2·users)) protects each user. DP-BiTFiT, DP full
            and DP-LoRA only.
        user_clipping: with `user_ids`: `"rows"` (default) clips each row at C/k
            (`DPModel.fit(user_ids=...)`); `"sum"` packs each user's rows into one example
            (`dpk.pack_users`, `dpk.PerUserModel`) and clips the gradient of the user's mean
            row loss once at C (per-user gradients by vectorized_map).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}.")
    if head_init not in ("auto", "random", "zeros"):
        raise ValueError(f"head_init must be 'auto', 'random' or 'zeros'; got {head_init!r}.")
    trainable, private = METHODS[method]
    if head_init == "auto":
        head_init = "zeros" if private and trainable != "bias" else "random"
    if noise_multiplier is not None:
        if not private or method in TWO_PHASE_METHODS:
            raise ValueError(f"noise_multiplier applies to the one-phase private methods, not {method}.")
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0; got {noise_multiplier!r}.")
    elif private and not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"{method} needs a finite target epsilon > 0; got {epsilon}.")
    k = gradient_accumulation_steps
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"gradient_accumulation_steps must be an int >= 1; got {k!r}.")
    if k > 1 and (not private or method == "dpzero"):
        raise ValueError(f"gradient_accumulation_steps applies to the gradient-based private methods, not {method}.")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {lr_schedule!r}.")
    if lr_schedule != "constant" and method in TWO_PHASE_METHODS:
        raise ValueError(f"lr_schedule={lr_schedule!r} is not supported for the two-phase method {method}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}; got {optimizer!r}.")
    if optimizer != "adam" and method in OWN_OPTIMIZER_METHODS:
        raise ValueError(f"optimizer={optimizer!r} is not supported for {method} (it has its own).")
    if ema_momentum is not None:
        if not 0 < ema_momentum < 1:
            raise ValueError(f"ema_momentum must be in (0, 1) or None; got {ema_momentum!r}.")
        if method in OWN_OPTIMIZER_METHODS:
            raise ValueError(f"ema_momentum is not supported for {method} (it has its own optimizers).")
    ema = {} if ema_momentum is None else dict(use_ema=True, ema_momentum=ema_momentum)
    if user_ids is not None and (not private or method in TWO_PHASE_METHODS or method == "dpzero"):
        raise ValueError(f"user_ids applies to DP-BiTFiT, DP full and DP-LoRA, not {method}.")
    if user_clipping not in USER_CLIPPING:
        raise ValueError(f"user_clipping must be one of {USER_CLIPPING}; got {user_clipping!r}.")
    keras.utils.set_random_seed(seed)
    evaluated = None  # what evaluate() runs on, when not the trained model itself
    x_train, y_train = train_data
    n = len(y_train) if user_ids is None else len(np.unique(user_ids))  # privacy units
    delta = delta or 1.0 / (2 * n)
    lr = learning_rate or default_learning_rate(method)
    if lr_schedule == "linear":
        # Optimizer steps of the run: Poisson batches (expected size batch_size) or fixed ones.
        steps_per_epoch = max(1, round(n / batch_size)) if private else math.ceil(n / batch_size)
        lr = keras.optimizers.schedules.PolynomialDecay(lr, decay_steps=epochs * steps_per_epoch, end_learning_rate=0.0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    base = build_model()
    if head_init == "zeros":
        zero_head(base)
    if trainable.startswith("lora"):
        enable_lora(base, LORA_RANK)
    timer = StepTimer(group=k)
    fit_kwargs = dict(batch_size=batch_size, epochs=epochs, validation_data=validation_data, verbose=verbose)
    if method in TWO_PHASE_METHODS:
        cbs = [timer, PrivacyCallback(delta=delta), *callbacks]
        common = dict(
            loss=loss,
            batch_size=batch_size,
            l2_norm_clip=l2_norm_clip,
            target_epsilon=epsilon,
            delta=delta,
            clipping=clipping,
            metrics=["accuracy"],
            callbacks=cbs,
            seed=noise_seed,
            gradient_accumulation_steps=k,
            validation_data=validation_data,
            verbose=verbose,
        )
        if method.startswith("sparta"):
            run = sparta_fit(
                base,
                x_train,
                y_train,
                density=0.2,
                epochs=epochs,
                optimizer=keras.optimizers.Adam(lr),
                variant="signed" if method == "sparta_signed" else "published",
                **common,
            )
            # Kept kernel entries, plus what phase 2 trains whole (the head; biases if asked).
            sparse_trainable = run.kept_entries + sum(
                int(np.prod(v.shape)) for v in run.model.selection.variables if v.path not in run.masks
            )
        else:
            lr1, lr2 = lr if isinstance(lr, tuple) else (lr, lr)
            first = epochs // 2  # DP full for the first half (none with 1 epoch), then DP-BiTFiT
            run = two_phase_fit(
                base,
                x_train,
                y_train,
                phase1_epochs=first,
                phase2_epochs=epochs - first,
                phase1_optimizer=keras.optimizers.Adam(lr1),
                phase2_optimizer=keras.optimizers.Adam(lr2),
                **common,
            )
        model = run.model
        selection = model.selection
    elif private:
        if method == "dpzero":
            model = dpzero(base, trainable=trainable)
            inner, clip = keras.optimizers.SGD(lr), DPZERO_CLIP
        elif user_ids is not None and user_clipping == "sum":
            model = DPModel(PerUserModel(base, max_examples_per_user), trainable=trainable)
            inner, clip = OPTIMIZERS[optimizer](lr, **ema), l2_norm_clip
        else:
            model = DPModel(base, trainable=trainable)
            inner, clip = OPTIMIZERS[optimizer](lr, **ema), l2_norm_clip
        budget = (
            dict(target_epsilon=epsilon, target_delta=delta)
            if noise_multiplier is None
            else dict(noise_multiplier=noise_multiplier)
        )
        model.compile(
            optimizer=DPOptimizer(
                inner,
                l2_norm_clip=clip,
                **budget,
                clipping="abadi" if method == "dpzero" else clipping,
                seed=noise_seed,
                gradient_accumulation_steps=k,
            ),
            loss=loss,
            metrics=["accuracy"],
        )
        selection = model.selection
        cbs = [timer, PrivacyCallback(delta=delta), *callbacks]
        if isinstance(model.model, PerUserModel):  # users packed as examples, validated on rows
            x_users, y_users, w_users = pack_users(x_train, y_train, user_ids, max_examples_per_user)
            evaluated = _evaluable(model.model.model, loss)
            cbs.append(_RowValidation(evaluated, validation_data))
            model.fit(x_users, y_users, sample_weight=w_users, callbacks=cbs, **dict(fit_kwargs, validation_data=None))
        else:
            users = {} if user_ids is None else dict(user_ids=user_ids, max_examples_per_user=max_examples_per_user)
            model.fit(x_train, y_train, callbacks=cbs, **fit_kwargs, **users)
    else:
        model = base
        selection = select_variables(model, trainable)
        apply_selection(model, selection)
        model.compile(optimizer=OPTIMIZERS[optimizer](lr, **ema), loss=loss, metrics=["accuracy"], jit_compile=True)
        model.fit(x_train, y_train, callbacks=[timer, *callbacks], **fit_kwargs)
    # SPARTA trains the kept entries of its kernels (and the head whole) only.
    num_trainable = sparse_trainable if method.startswith("sparta") else selection.num_trainable
    eps = model.privacy_spent(delta)[0] if private else math.inf
    evaluated = model if evaluated is None else evaluated  # a packed-users run: its row-level model
    return RunResult(
        method=method,
        epsilon=eps,
        delta=delta,
        noise_multiplier=model.optimizer.noise_multiplier if private else None,
        validation_accuracy=float(evaluated.evaluate(*validation_data, verbose=0, return_dict=True)["accuracy"]),
        test_accuracy=float(evaluated.evaluate(*test_data, verbose=0, return_dict=True)["accuracy"]),
        ms_per_step=timer.ms_per_step,
        trainable_params=num_trainable,
        trainable_fraction=num_trainable / max(selection.num_total, 1),
        steps=model.optimizer.dp_steps if private else int(model.optimizer.iterations.numpy()),
        model=model,
    )


def _evaluable(row_model: keras.Model, loss) -> keras.Model:
    """The row-level model inside a PerUserModel, compiled for evaluation (not for training)."""
    row_model.compile(loss=loss, metrics=["accuracy"])
    return row_model


class _RowValidation(keras.callbacks.Callback):
    """Validation of a packed-users run on the validation rows, logged as Keras' `val_` keys."""

    def __init__(self, row_model, validation_data):
        super().__init__()
        self.row_model, self.validation_data = row_model, validation_data

    def on_epoch_end(self, epoch, logs=None):
        result = self.row_model.evaluate(*self.validation_data, verbose=0, return_dict=True)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in result.items()})


def zero_head(model: keras.Model) -> None:
    """Sets the classifier head's kernel (the last layer with one) to zeros."""
    head = head_layer(model)
    if head is None:
        raise ValueError(f"Model '{model.name}' has no layer with a kernel to use as its head.")
    head.kernel.assign(np.zeros(head.kernel.shape, head.kernel.dtype))


def default_export_dir(dataset: str, method: str, epsilon: float, root: str = "savedmodels") -> str:
    """`savedmodels/<run name>/<next integer version>` (TF Serving's layout)."""
    name = f"{dataset}_{method}" + (f"_eps{epsilon:g}" if METHODS[method][1] else "")
    base = os.path.join(root, re.sub(r"[^A-Za-z0-9_.-]+", "_", name))
    versions = [int(d) for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
    return os.path.join(base, str(max(versions, default=0) + 1))


def print_summary(result: RunResult, export_dir: str, serving_hint: str = "") -> None:
    eps = (
        "∞ (not private)"
        if math.isinf(result.epsilon)
        else f"{result.epsilon:.3f} (δ = {result.delta:.2e}, σ = {result.noise_multiplier:.3f})"
    )
    print("\n== Summary ==")
    print(f"method:              {result.method}")
    print(f"trainable:           {result.trainable_params:,} parameters ({100 * result.trainable_fraction:.3f}%)")
    print(f"ε spent:             {eps}")
    print(f"validation accuracy: {result.validation_accuracy:.4f}")
    print(f"test accuracy:       {result.test_accuracy:.4f}")
    print(f"ms/step:             {result.ms_per_step:.1f} ({result.steps} steps)")
    print(f"SavedModel:          {export_dir}  {serving_hint}".rstrip())
