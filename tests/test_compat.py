import sys

from dp_bitfit_keras import _compat


def test_tf_privacy_queries_import_on_this_tensorflow():
    assert sys.skip_tf_privacy_import is True
    query = _compat.GaussianSumQuery(l2_norm_clip=1.0, stddev=0.5)
    assert query._l2_norm_clip == 1.0
    assert issubclass(_compat.QuantileAdaptiveClipSumQuery, _compat.SumAggregationDPQuery)
