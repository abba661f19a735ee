"""The absl flags that the example binaries (`examples/train_*_classifier.py`) share.

Each binary is its own absl program: `define_shared_flags()` defines these flags as the calling
binary's own (this module disclaims them, so absl attributes them to its caller: the binary's
`--helpshort`, `FLAGS.get_key_flags_for_module(binary)`); they are written once here instead of
once per binary.
"""

from absl import flags

flags.disclaim_key_flags()  # the DEFINEs below belong to the binary that calls define_shared_flags


def define_shared_flags() -> None:
    """Defines the privacy, clipping, optimizer, export and seed flags for the calling binary."""
    flags.DEFINE_float("epsilon", 8.0, "Target ε (private methods).")
    flags.DEFINE_float("delta", None, "δ; default 1/(2n).")
    flags.DEFINE_float("l2_norm_clip", 1.0, "Per-example clipping norm C (default from examples/accuracy_study.py).")
    flags.DEFINE_enum(
        "clipping", "abadi", ["automatic", "abadi"], "Clipping style (Abadi: clip to C; automatic: normalize to C)."
    )
    flags.DEFINE_enum(
        "head_init",
        "auto",
        ["auto", "random", "zeros"],
        "Classifier head kernel at start; auto: zeros for "
        "private methods that train the head (examples/accuracy_study.py), the model's own otherwise.",
    )
    flags.DEFINE_enum(
        "lr_schedule",
        None,
        ["constant", "linear"],
        "Learning rate over the run: constant, or "
        "linear decay to 0 (recipes.train). Default: the task's choice for the method (dp_bitfit_head on "
        "text tasks: linear, chosen on the offline tweets; otherwise constant).",
    )
    flags.DEFINE_enum(
        "optimizer",
        None,
        ["adam", "sgd"],
        "Inner optimizer: Adam, or SGD with momentum 0.9 "
        "(recipes.train; the two-phase methods and DPZero keep their own). Default: the one the method's "
        "default learning rate is for (Adam; SGD for dp_full on the offline digits).",
    )
    flags.DEFINE_string("export_dir", None, "SavedModel directory; default savedmodels/<run name>/<version>.")
    flags.DEFINE_integer("seed", 0, "Seed for initialisation, splits and dropout (not the DP noise or sampling).")
    flags.DEFINE_integer(
        "noise_seed",
        None,
        "Private methods: make the DP noise and Poisson sampling reproducible "
        "from this seed. Default: secret keys from the OS. A run with a known noise seed is NOT private.",
    )
