"""A NumPy evaluator of small ONNX graphs: the reference ONNX Runtime's results are checked against.

It covers the dense op set the shipped models export to (Gemm/MatMul, element-wise arithmetic and
activations, reshapes, reductions, shape arithmetic), op by op in the graph's own dtypes, with
ONNX's broadcasting and IEEE semantics (no warnings on inf/nan, as ONNX Runtime gives none).
Parsing needs the `onnx` package, which is not a runtime dependency: it is imported only when a
reference is built, and its absence is a `ReferenceUnavailable`. Graphs with other ops (Conv, LSTM,
other domains) are refused at load, naming the ops, so a model is either evaluated completely or
not at all.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from gateway.errors import ModelError

Attrs = dict[str, Any]
Op = Callable[[list[Any], Attrs], list[np.ndarray]]


class ReferenceUnavailable(ModelError):
    """The NumPy reference cannot evaluate this model here (no `onnx` package, or ops it lacks)."""

    def __init__(self, message: str, *, ops: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.ops = tuple(ops)  # the graph's ops it lacks; empty when the onnx package is missing


def _onnx() -> ModuleType:
    try:
        return importlib.import_module("onnx")
    except ImportError as exc:
        raise ReferenceUnavailable("needs onnx: pip install onnx") from exc


def _axes(inputs: list[Any], attrs: Attrs, position: int) -> tuple[int, ...] | None:
    """Axes from the attribute (older opsets) or from an optional input (Squeeze/Unsqueeze 13, ReduceMean 18)."""
    if "axes" in attrs:
        return tuple(int(a) for a in attrs["axes"])
    if len(inputs) > position and inputs[position] is not None:
        return tuple(int(a) for a in np.asarray(inputs[position]).reshape(-1))
    return None


def _same(fn: Callable[..., np.ndarray]) -> Op:
    """An element-wise op whose result keeps the first input's dtype (ONNX does not promote)."""

    def op(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
        return [np.asarray(fn(*inputs)).astype(inputs[0].dtype, copy=False)]

    return op


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Integer Div truncates toward zero in ONNX; NumPy's // floors.
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(np.true_divide(a, b))
    return np.divide(a, b)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| only, so large inputs neither overflow nor lose the tiny side's precision.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _gemm(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    a, b = inputs[0], inputs[1]
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = np.matmul(a, b)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if alpha != 1.0:
        y = y * np.asarray(alpha, dtype=y.dtype)
    if len(inputs) > 2 and inputs[2] is not None:
        c = inputs[2] if beta == 1.0 else inputs[2] * np.asarray(beta, dtype=y.dtype)
        y = y + c
    return [y]


def _reshape(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    data, shape = inputs[0], [int(s) for s in inputs[1]]
    if not attrs.get("allowzero", 0):  # 0 copies the input's dimension at that position
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


def _flatten(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    # Explicit sizes, not -1: a batch of 0 rows must still give [0, K].
    return [x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))]


def _transpose(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    perm = attrs.get("perm")
    return [np.transpose(inputs[0], None if perm is None else [int(p) for p in perm])]


def _reduce_mean(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    if axes is None or not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = tuple(range(x.ndim))
    return [np.mean(x, axis=axes, keepdims=bool(attrs.get("keepdims", 1))).astype(x.dtype, copy=False)]


def _softmax(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    x = inputs[0]
    axis = attrs.get("axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return [(e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype, copy=False)]


def _squeeze(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    axes = _axes(inputs, attrs, 1)
    return [np.squeeze(inputs[0], axis=axes)]


def _unsqueeze(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    axes = _axes(inputs, attrs, 1)
    if axes is None:
        raise ModelError("NumPy reference: Unsqueeze without axes")
    return [np.expand_dims(inputs[0], axis=axes)]


def _concat(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    return [np.concatenate([x for x in inputs if x is not None], axis=attrs["axis"])]


def _shape(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    dims = np.array(inputs[0].shape, dtype=np.int64)
    return [dims[attrs.get("start", 0) : attrs.get("end", len(dims))]]


def _gather(inputs: list[Any], attrs: Attrs) -> list[np.ndarray]:
    # np.take counts negative indices from the end, as ONNX does.
    return [np.take(inputs[0], inputs[1].astype(np.int64), axis=attrs.get("axis", 0))]


OPS: dict[str, Op] = {
    "Add": _same(np.add),
    "Sub": _same(np.subtract),
    "Mul": _same(np.multiply),
    "Div": _same(_div),
    "Pow": _same(np.power),
    "Sqrt": _same(np.sqrt),
    "Relu": _same(lambda x: np.maximum(x, 0)),
    "Sigmoid": _same(_sigmoid),
    "Tanh": _same(np.tanh),
    "MatMul": _same(np.matmul),
    "Gemm": _gemm,
    "Softmax": _softmax,
    "Identity": lambda inputs, attrs: [inputs[0]],
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Shape": _shape,
    "Gather": _gather,
    "ReduceMean": _reduce_mean,
}
# Constant is folded at load; Softmax before opset 13 flattened to 2-D first, which this does not do.
SUPPORTED_OPS = frozenset({*OPS, "Constant"})
_MIN_OPSET = {"Softmax": 13}


class NumpyReference:
    """An ONNX model evaluated op by op with NumPy; build it with `load_numpy_reference` or `from_proto`."""

    name = "numpy-reference"

    def __init__(
        self,
        nodes: list[tuple[Op, list[str], list[str], Attrs]],
        constants: dict[str, np.ndarray],
        inputs: list[str],
        outputs: list[str],
        op_types: frozenset[str],
    ) -> None:
        self._nodes = nodes
        self._constants = constants
        self.inputs = inputs
        self.outputs = outputs
        self.op_types = op_types

    @classmethod
    def from_proto(cls, model: Any) -> NumpyReference:
        """Build from an `onnx.ModelProto`; raises ReferenceUnavailable naming any op it cannot evaluate."""
        onnx = _onnx()
        from onnx import numpy_helper

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        graph = model.graph
        unsupported = sorted(
            {
                n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                for n in graph.node
                if n.domain not in ("", "ai.onnx")
                or n.op_type not in SUPPORTED_OPS
                or opset < _MIN_OPSET.get(n.op_type, 0)
            }
        )
        if unsupported:
            raise ReferenceUnavailable(f"no {', '.join(unsupported)} in its op set (opset {opset})", ops=unsupported)
        constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes: list[tuple[Op, list[str], list[str], Attrs]] = []
        for n in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant":
                constants[n.output[0]] = _constant(attrs, numpy_helper)
            else:
                nodes.append((OPS[n.op_type], list(n.input), list(n.output), attrs))
        feeds = [i.name for i in graph.input if i.name not in constants]
        return cls(nodes, constants, feeds, [o.name for o in graph.output], frozenset(n.op_type for n in graph.node))

    def evaluate(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the graph on `feeds` ({input name: array}); returns {output name: array} for `outputs` (default all)."""
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise ModelError(f"NumPy reference: missing input(s) {missing}")
        values: dict[str, Any] = {**self._constants, **feeds, "": None}  # "" names an omitted optional input
        # ONNX defines division by zero and overflow as IEEE inf/nan; so does ONNX Runtime, silently.
        with np.errstate(all="ignore"):
            for op, ins, outs, attrs in self._nodes:
                for name, value in zip(outs, op([values[i] for i in ins], attrs), strict=False):
                    values[name] = value
        return {name: values[name] for name in (outputs or self.outputs)}


def _constant(attrs: Attrs, numpy_helper: ModuleType) -> np.ndarray:
    """The value of a Constant node, from whichever of its attribute forms it uses."""
    if "value" in attrs:
        return numpy_helper.to_array(attrs["value"])
    kinds = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    for key, dtype in kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    raise ReferenceUnavailable(f"no Constant of form {sorted(attrs)} in its op set", ops=["Constant"])


def load_numpy_reference(path: Path) -> NumpyReference:
    """Parse the ONNX file at `path` into a NumPy reference (blocking); ReferenceUnavailable when it cannot."""
    onnx = _onnx()
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, OSError, ... with no common base
        raise ModelError(f"{path}: cannot parse ONNX model: {exc}") from exc
    return NumpyReference.from_proto(model)
