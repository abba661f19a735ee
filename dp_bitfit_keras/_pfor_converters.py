"""pfor converters for ops that TensorFlow's `vectorized_map` would run in a while_loop.

TensorFlow keeps one registry of converters (`parallel_for.pfor`); an op type is added here only if
TensorFlow has no converter of its own, so a TF release that adds one wins.
"""

import tensorflow as tf
from tensorflow.compiler.tf2xla.ops import gen_xla_ops
from tensorflow.python.ops.parallel_for import pfor as _pfor


def _register(op_type):
    def decorator(converter):
        if op_type not in _pfor._pfor_converter_registry:
            _pfor.RegisterPFor(op_type)(converter)
        return converter

    return decorator


@_register("XlaDynamicUpdateSlice")
def _convert_xla_dynamic_update_slice(pfor_input):
    # Under XLA the gradient of `tf.slice` (e.g. keras-hub's PositionEmbedding) is a dynamic
    # update-slice into zeros. With loop-invariant start indices the batched op is the same
    # update-slice with a leading 0 index for the new batch axis.
    if pfor_input.input(2)[1]:
        return _pfor._fallback_converter(pfor_input, root_cause="loop-variant start indices")
    pfor_input.stack_inputs(stack_indices=[0, 1])
    operand = pfor_input.stacked_input(0)
    update = pfor_input.stacked_input(1)
    indices = pfor_input.unstacked_input(2)
    indices = tf.concat([tf.zeros([1], indices.dtype), indices], axis=0)
    return _pfor.wrap(gen_xla_ops.xla_dynamic_update_slice(operand, update, indices), True)


def _with_invariant_filter(op_type, filter_index, convert):
    """Vectorizes `op_type` by `convert` when its filter is loop-invariant (the model's weights).

    TF's own converter (if any) expects per-iteration filters or is missing; with shared weights
    the examples can simply be folded into the op's batch axis. Other cases go to TF's converter
    or, failing that, to pfor's while_loop (which `per_example_gradients` reports).
    """
    original = _pfor._pfor_converter_registry.get(op_type)

    def converter(pfor_input):
        if not pfor_input.input(filter_index)[1]:
            return convert(pfor_input, op_type)
        if original is not None:
            return original(pfor_input)
        return _pfor._fallback_converter(pfor_input, root_cause="loop-variant filter")

    _pfor._pfor_converter_registry[op_type] = converter


def _fold_batch(pfor_input, op_type):
    return _pfor._convert_flatten_batch(pfor_input, op_type, dims=[0])


def _fold_batch_with_sizes(pfor_input, op_type):
    # (input_sizes, filter, out_backprop): fold out_backprop, scale input_sizes[0] by the loop size.
    return _pfor._convert_flatten_batch_shape_input(pfor_input, op_type, flatten_dims=[2], shape_dim=0)


# Forward ops and the input-gradients of Conv3D, Conv3DTranspose, DepthwiseConv1D/2D and
# SeparableConv1D/2D: without these DP-BiTFiT's step on such layers runs example by example.
_with_invariant_filter("Conv3D", 1, _fold_batch)
_with_invariant_filter("Conv3DBackpropInputV2", 1, _fold_batch_with_sizes)
_with_invariant_filter("DepthwiseConv2dNative", 1, _fold_batch)
_with_invariant_filter("DepthwiseConv2dNativeBackpropInput", 1, _fold_batch_with_sizes)
