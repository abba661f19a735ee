"""The one place that imports TF Privacy.

`import tensorflow_privacy` fails on TensorFlow 2.20+ because its package `__init__` imports
`tensorflow_estimator`, which no longer exists. The package honours `sys.skip_tf_privacy_import`
(meant for standalone scripts) and then imports nothing, so we set it and import the DP-query
submodules we need directly. Everything else in dp_bitfit_keras imports TF Privacy from here.
"""

import sys

_HINT = (
    "dp_bitfit_keras needs tensorflow-privacy's DP queries "
    "(tensorflow_privacy.privacy.dp_query.gaussian_query and quantile_adaptive_clip_sum_query). "
    "Install the versions pinned in this project's uv.lock (`uv sync`); tensorflow-privacy 0.9.0 "
    "with the dependency overrides in pyproject.toml is known to work on TF 2.21 / Keras 3.15."
)

sys.skip_tf_privacy_import = True  # Skip the package __init__ that imports tensorflow_estimator.
try:
    from tensorflow_privacy.privacy.dp_query import (
        dp_query,  # noqa: E402
        gaussian_query,  # noqa: E402
        quantile_adaptive_clip_sum_query,  # noqa: E402
    )
except Exception as e:  # pragma: no cover - exercised only when the environment is broken.
    raise ImportError(f"Could not import TF Privacy's DP queries: {e!r}. {_HINT}") from e

GaussianSumQuery = gaussian_query.GaussianSumQuery
QuantileAdaptiveClipSumQuery = quantile_adaptive_clip_sum_query.QuantileAdaptiveClipSumQuery
SumAggregationDPQuery = dp_query.SumAggregationDPQuery

__all__ = ["GaussianSumQuery", "QuantileAdaptiveClipSumQuery", "SumAggregationDPQuery"]
