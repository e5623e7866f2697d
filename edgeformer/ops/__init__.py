"""The op registry: op name -> class with ``infer`` (shape rules, load-time checks) and ``bind``."""
from edgeformer.ops.activation import Activation
from edgeformer.ops.add import Add
from edgeformer.ops.attention import Attention
from edgeformer.ops.embedding import Embedding
from edgeformer.ops.generic import OnnxOp, Pack, Unpack
from edgeformer.ops.layer_norm import LayerNorm
from edgeformer.ops.linear import Linear
from edgeformer.ops import linear_int8  # noqa: F401  (registers the int8 weight formats)
from edgeformer.ops import linear_lut  # noqa: F401  (registers the lut weight format)
from edgeformer.ops import attention_binary_hash  # noqa: F401  (registers the binary_hash attention kind)
from edgeformer.ops import attention_quantizable  # noqa: F401  (registers clipped_softmax, gated)
from edgeformer.ops.normalize import Normalize
from edgeformer.ops.patch_embedding import PatchEmbedding
from edgeformer.ops.pool import Pool
from edgeformer.ops.rms_norm import RmsNorm
from edgeformer.ops.rotary import Rotary

REGISTRY = {cls.op: cls for cls in (Embedding, Linear, LayerNorm, Attention, Activation, Pool, Normalize,
                                    RmsNorm, Add, Rotary, PatchEmbedding, OnnxOp, Pack, Unpack)}
