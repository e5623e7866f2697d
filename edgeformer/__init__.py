"""edgeformer: transformer inference on CPUs with Numba kernels.

    model = edgeformer.load("model.edgeformer", threads=4)
    outputs = model.run({"input_ids": ids, "attention_mask": mask})
"""
from edgeformer import _cache  # noqa: F401  (must run before any kernel module imports numba)
from edgeformer.errors import EdgeformerError, GraphError, InputError, ModelFileError
from edgeformer.session import Model, TensorSpec, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "TensorSpec", "EdgeformerError", "GraphError", "InputError", "ModelFileError",
           "__version__"]
