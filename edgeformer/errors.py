"""The project's own exception types: every bad input ends in one of these."""


class EdgeformerError(Exception):
    """Base class of every error edgeformer raises on purpose."""


class ModelFileError(EdgeformerError, ValueError):
    """The model file is truncated, corrupt, hostile or of an unknown version."""


class GraphError(EdgeformerError, ValueError):
    """The graph in a model file is inconsistent (unknown op, bad shapes, missing weights)."""


class InputError(EdgeformerError, ValueError):
    """A feed given to Model.run has the wrong name, dtype, rank, shape or values."""
