"""Errors of the ONNX importer: every bad file or unsupported graph ends in one of these."""
from __future__ import annotations

from collections import defaultdict

from edgeformer.errors import EdgeformerError


class OnnxImportError(EdgeformerError, ValueError):
    """Base class of the ONNX importer's errors."""


class OnnxFormatError(OnnxImportError):
    """The file is not a valid ONNX model: truncated or corrupt protobuf, missing initializer or external
    data, a cycle, inconsistent dtypes, a graph that fails onnx.checker."""


class UnsupportedOnnxError(OnnxImportError):
    """The graph is valid ONNX but parts of it cannot be fused into edgeformer's coarse ops.

    ``problems`` maps (domain, op_type, opset) to a list of (node name, reason) for every node that
    could not be translated (all of them, not only the first).
    """

    def __init__(self, problems: dict, outputs: list[str] | None = None):
        self.problems = dict(problems)
        lines = [f"cannot convert {'outputs ' + ', '.join(map(repr, outputs)) if outputs else 'the graph'}: "
                 f"{sum(len(v) for v in problems.values())} node(s) of {len(problems)} kind(s) could not be "
                 f"fused or translated into edgeformer ops:"]
        for (domain, op_type, opset), items in sorted(self.problems.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            names = [n for n, _ in items]
            shown = ", ".join(repr(n) for n in names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
            reasons = sorted({r for _, r in items})
            lines.append(f"  ({domain or 'ai.onnx'}, {op_type}, opset {opset}) x{len(items)}: {shown}")
            for reason in reasons[:3]:
                lines.append(f"      {reason}")
        super().__init__("\n".join(lines))


def group_problems(causes) -> dict:
    """[(node_key, reason)] with node_key = (name, domain, op_type, opset) -> UnsupportedOnnxError.problems."""
    grouped: dict = defaultdict(list)
    seen = set()
    for (name, domain, op_type, opset), reason in causes:
        if (name, reason) in seen:
            continue
        seen.add((name, reason))
        grouped[(domain, op_type, opset)].append((name, reason))
    return dict(grouped)
