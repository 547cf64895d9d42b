"""ONNX export of a whole defended procedure: `export_onnx(scc.defend(clf, "scc"), "scc.onnx")`.

The file computes everything `Defended(x, draws)` computes, as one static graph without control flow:
the TTC counterattack warm-up (its reference forward, the tau gate, K sign-gradient steps with their
input gradients, the softmax(beta k) weighting), SCC's views, prototype and corrective steps, and the
view-averaged logits. The class text embeddings and all weights are constants (initializers).

    input  `pixels`  float32 (B, 3, S, S) in [0, 1]
    output `logits`  float32 (B, C)
    with draws_as_inputs=True also the inputs of `Defended.draws(x)`: `start` (B, 3, S, S) ~ U(-1, 1) and,
    for SCC, `noise` (B, L, 3, S, S) ~ N(0, 1). Feed the draws of an eager run to get the eager result.

Batch size. By default (`batch_size=None`) B is symbolic: one file serves every batch size (metadata
`scc.batch_size` = "dynamic"; ONNX Runtime and Triton's ONNX Runtime backend batch freely). `batch_size=N`
writes a fixed-shape file (every dimension a number: TensorRT engines and ORT CUDA graphs want that);
`scc.export.OrtDefended` splits larger inputs into chunks of N and pads the last one.
How the batch stays symbolic: the procedure is traced with fake inputs whose first dimension is a symbol and
every other dimension a number, and its input gradients are taken with torch.autograd.grad instead of
torch.func.grad (`scc.grad.grad_route("autograd")`, entered only around this trace): under torch.func.grad,
make_fx specialises the batch to the example's (a guard recorded in `F.linear`). The trace then checks that
every input and output still has a symbolic batch.

Randomness. By default the draws are made inside the graph: `start` by RandomUniformLike(pixels, -1, 1) and
`noise` by RandomNormal(shape=(B, L, 3, S, S)) in a fixed-batch file, RandomNormalLike of a (B, L, 3, S, S)
tensor built from the pixels' batch in a dynamic one. Every element is drawn, so each row of a batch gets its
own draws. They follow the same distributions as the torch draws but come from ONNX Runtime's own generator,
so they never equal torch's: a file without draw inputs agrees with eager PyTorch in accuracy, not image by
image. ORT seeds each random node when the session is created (from `onnxruntime.set_seed` if it was called,
otherwise from a fresh seed) and advances it on every run.

How. `torch.onnx.export(dynamo=True)` cannot export `torch.func.grad`. The procedure is first traced to a
flat ATen graph with `make_fx` (forward and backward ops, no autograd left), under the math SDPA backend so
attention is plain matmul + softmax, then that graph is exported. (Proxy tensors also keep
nn.MultiheadAttention off its fused inference fast path, which differs from the autograd path by ~1e-6;
the trace is checked for it.) While tracing, a few backward ops are
rewritten into ops that translate to cheap ONNX (see `_DECOMPOSITIONS`):
    convolution_backward (input grad)  -> a transposed convolution (ONNX ConvTranspose)
    select_backward / slice_backward    -> a zero pad (ONNX Pad) instead of ScatterElements / ScatterND
    avg_pool2d_backward                 -> a depthwise transposed convolution with a constant kernel
    _safe_softmax                       -> softmax (no masked rows without an attention mask)
and `F.one_hot`, whose range check reads tensor values, becomes a comparison with `arange`. After export,
constants are folded (onnxscript), MatMul operands that are a 2-D constant broadcast over a batch (expand + bmm
in the trace; materialised by ONNX) are replaced by the 2-D constant, and onnxoptimizer's fuse/eliminate passes
run (when onnxoptimizer is installed: the `onnx` extra brings it; `export_onnx` reports skipped passes).
Graph checks: no control flow (If/Loop/Scan), no Scatter* nodes; both are reported by `export_onnx`.
"""
from __future__ import annotations

import collections
import json
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import attention
from ..defenses import Defended
from ..draws import like_image
from ..errors import SccError
from ..grad import grad_route
from ..precision import dtype_name

aten = torch.ops.aten
MIN_OPSET = 18

# ----------------------------------------------------------------------------------------------------------
# Tracing: the defended procedure -> a flat ATen graph (torch.fx.GraphModule)
# ----------------------------------------------------------------------------------------------------------
def _conv_transpose_output_padding(grad: torch.Tensor, inp: torch.Tensor, weight: torch.Tensor, stride, padding,
                                   dilation) -> list[int]:
    """Extra rows/cols a transposed convolution needs to give back the input's exact size."""
    pads = []
    for i in range(len(stride)):
        k = weight.shape[2 + i]
        size = (grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1
        pads.append(inp.shape[2 + i] - size)
    return pads


def _convolution_backward(grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                          groups, output_mask):
    """The input gradient of a convolution is the transposed convolution of the output gradient."""
    if transposed or output_mask[1] or output_mask[2] or not output_mask[0]:
        return NotImplemented  # weight/bias gradients: never needed by a defense (weights are frozen)
    opad = _conv_transpose_output_padding(grad, inp, weight, stride, padding, dilation)
    grad_input = aten.convolution.default(grad, weight, None, stride, padding, dilation, True, opad, groups)
    return grad_input, None, None


def _pad_spec(rank: int, dim: int, before: int, after: int) -> list[int]:
    """constant_pad_nd's pad list (last dimension first) that pads only `dim`."""
    return [0, 0] * (rank - 1 - dim) + [before, after]


def _select_backward(grad, input_sizes, dim, index):
    """Gradient of x.select(dim, index): the gradient padded with zeros, not scattered into zeros."""
    dim = dim % len(input_sizes)
    size = input_sizes[dim]
    index = index % size
    return aten.constant_pad_nd.default(aten.unsqueeze.default(grad, dim),
                                        _pad_spec(len(input_sizes), dim, index, size - index - 1), 0.0)


def _slice_backward(grad, input_sizes, dim, start, end, step):
    if step != 1:
        return NotImplemented
    dim = dim % len(input_sizes)
    size = input_sizes[dim]
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, start), size)
    return aten.constant_pad_nd.default(grad, _pad_spec(len(input_sizes), dim, start, size - end), 0.0)


def _avg_pool2d_backward(grad, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Average pooling spreads each output gradient evenly over its window: a depthwise transposed convolution."""
    kernel = list(kernel_size) * (2 if len(kernel_size) == 1 else 1)
    stride = list(stride or kernel) * (2 if len(stride or kernel) == 1 else 1)
    padding = list(padding) * (2 if len(padding) == 1 else 1)
    if ceil_mode or (any(padding) and not count_include_pad and divisor_override is None):
        return NotImplemented  # the divisor would vary per window
    channels = inp.shape[1]
    divisor = divisor_override or kernel[0] * kernel[1]
    weight = torch.full((channels, 1, *kernel), 1.0 / divisor, dtype=grad.dtype, device=grad.device)
    opad = _conv_transpose_output_padding(grad, inp, weight, stride, padding, [1, 1])
    return aten.convolution.default(grad, weight, None, stride, padding, [1, 1], True, opad, channels)


def _safe_softmax(x, dim, dtype=None):
    # _safe_softmax only differs from softmax on rows that are entirely -inf (fully masked attention rows);
    # CLIP image towers attend without a mask, so every row has finite scores.
    return aten._softmax.default(x if dtype is None else x.to(dtype), dim, False)


_DECOMPOSITIONS = {
    aten.convolution_backward.default: _convolution_backward,
    aten.select_backward.default: _select_backward,
    aten.slice_backward.default: _slice_backward,
    aten.avg_pool2d_backward.default: _avg_pool2d_backward,
    aten._safe_softmax.default: _safe_softmax,
}


class _TraceableOneHot(TorchFunctionMode):
    """`F.one_hot` checks its indices' range by reading them (`.item()`), which a tracer cannot do: compare
    with `arange` instead (same result for in-range indices, which argmax outputs always are)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.one_hot:
            indices, num_classes = args[0], kwargs.get("num_classes", args[1] if len(args) > 1 else -1)
            if num_classes < 0:
                raise SccError("export needs F.one_hot(..., num_classes=C) with an explicit class count")
            return (indices[..., None] == torch.arange(num_classes, device=indices.device)).long()
        return func(*args, **kwargs)


EXAMPLE_BATCH = 3  # the example batch a batch-dynamic trace runs with (any size >= 2 works; 0/1 would specialise)


def _batch_dynamic_inputs(tensors):
    """Fake copies of `tensors` whose first dimension is a symbol and every other dimension is static.

    make_fx's own tracing_mode="symbolic" turns every dimension into a symbol (image size, view count...);
    here only the batch is one, so everything else traces exactly as in a fixed-shape export. The tensors'
    batch symbols are separate at first; the first op that combines two inputs records that they are equal.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)  # weights stay real constants
    fakes = [mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1))) for t in tensors]
    return fakes, shape_env


def trace_procedure(defended: Defended, batch_size: int | None = 1, trace_outputs: bool = False):
    """(GraphModule, example inputs, input names, output names) for the defended procedure.

    The graph's inputs are the pixels (B, 3, S, S) and the draws (in `Defended.draws` order, each with B
    rows); its outputs are the logits (B, C) and, with `trace_outputs`, each sign-gradient step's
    `grad.sign()` (B, 3, S, S) (as `Defended(x, trace=[])` collects).

    `batch_size=N` traces with real tensors at batch N: every shape in the graph is a number. `batch_size=None`
    traces with fake tensors whose batch is a symbol (example inputs of batch `EXAMPLE_BATCH`), so B stays a
    symbol through the whole procedure; this takes the input gradients with torch.autograd.grad (`scc.grad`'s
    "autograd" route), because torch.func.grad specialises the batch to the example's.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    clf = defended.classifier
    dynamic = batch_size is None
    pixels, draws = defended.example_inputs(EXAMPLE_BATCH if dynamic else batch_size)  # values never matter
    procedure, config = defended.record.procedure, defended.config
    names = list(draws)
    example = (pixels, *draws.values())

    def run(x, *values):
        steps = [] if trace_outputs else None
        extra = {"trace": steps} if trace_outputs else {}
        with _TraceableOneHot():
            logits = procedure(clf, x, config, **dict(zip(names, values)), **extra)
        return (logits, *steps) if trace_outputs else logits

    if clf.kernels:  # an engine's copy with Triton launchers: the file holds the reference ops instead
        raise SccError("export_onnx traces the torch reference ops: pass the scc.defend(...) module, not an "
                       "engine's classifier copy with kernels")
    with attention("trace", pixels.device), torch.no_grad():
        if dynamic:
            fakes, shape_env = _batch_dynamic_inputs(example)
            with grad_route("autograd"):
                graph = make_fx(run, decomposition_table=_DECOMPOSITIONS, tracing_mode="symbolic",
                                _allow_non_fake_inputs=True)(*fakes)
            _check_batch_symbolic(graph, shape_env)
        else:
            graph = make_fx(run, decomposition_table=_DECOMPOSITIONS)(*example)
    fast_path = [n for n in graph.graph.nodes if n.op == "call_function" and "_native_multi_head_attention" in str(n.target)]
    if fast_path:  # the fused inference kernel: no backward, and ~1e-6 off the autograd path
        raise RuntimeError(f"the trace took nn.MultiheadAttention's fast path ({len(fast_path)} nodes); "
                           "export needs the autograd path")
    outputs = ["logits"] + ([f"step_sign_{i}" for i in range(_count_outputs(graph) - 1)] if trace_outputs else [])
    return graph.eval(), example, ["pixels", *names], outputs


def _check_batch_symbolic(graph: torch.fx.GraphModule, shape_env) -> None:
    """Every input and output of a batch-dynamic trace must still have a symbolic first dimension."""
    ends = [n for n in graph.graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    ends += list(out) if isinstance(out, (tuple, list)) else [out]
    frozen = [n.name for n in ends if not isinstance(n.meta["val"].shape[0], torch.SymInt)]
    if frozen:
        guards = [str(g.expr) for g in shape_env.guards]
        raise RuntimeError(f"the batch dimension was specialised while tracing ({frozen} have a fixed batch; "
                           f"guards {guards[:8]}); export with a fixed batch_size instead")


def _count_outputs(graph: torch.fx.GraphModule) -> int:
    out = next(n for n in graph.graph.nodes if n.op == "output").args[0]
    return len(out) if isinstance(out, (tuple, list)) else 1


# ----------------------------------------------------------------------------------------------------------
# ONNX graph edits
# ----------------------------------------------------------------------------------------------------------
def _draws_in_graph(model, defended: Defended, pixels_name: str, draw_names: list[str]) -> None:
    """Replace the draw inputs by random nodes at the graph's top, from the distributions the defense declares
    (its `Defense.draw_specs`):

    uniform, shaped like the image (B, 3, S, S): RandomUniformLike(pixels, low, high).
    normal or uniform of any other shape (B, ...): RandomNormal / RandomUniform(shape) when B is a number; with a
    symbolic B, RandomNormalLike / RandomUniformLike(ConstantOfShape(Concat(Shape(pixels)[:1], [...]))). ORT
    fills every element of a random node from the node's own generator, so each row of a batch gets its own
    draws either way.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    first = next(iter(graph))
    pixels = inputs[pixels_name]
    for name in draw_names:
        value, draw = inputs[name], defended.record.draw_specs[name]
        nodes = []
        if draw.kind == "uniform" and draw.shape is like_image:
            low, high = draw.bounds(defended.config)
            nodes.append(ir.node("RandomUniformLike", [pixels],
                                 {"low": float(low), "high": float(high), "dtype": ir.DataType.FLOAT.value}))
        elif draw.kind in ("normal", "uniform"):  # any other shape: (B, ...) from the pixels' batch
            low, high = draw.bounds(defended.config)
            op, attrs = (("RandomNormal", {"mean": 0.0, "scale": 1.0}) if draw.kind == "normal" else
                         ("RandomUniform", {"low": float(low), "high": float(high)}))
            attrs["dtype"] = ir.DataType.FLOAT.value
            if all(isinstance(d, int) for d in value.shape):
                nodes.append(ir.node(op, [], {"shape": [int(d) for d in value.shape], **attrs}))
            else:  # a symbolic batch: the shape is built from the pixels' batch
                rest = ir.Value(name=f"{name}_shape_rest", shape=ir.Shape([len(value.shape) - 1]),
                                type=ir.TensorType(ir.DataType.INT64),
                                const_value=ir.tensor(np.array([int(d) for d in value.shape[1:]], dtype=np.int64)))
                graph.register_initializer(rest)
                batch = ir.node("Shape", [pixels], {"start": 0, "end": 1})
                shape = ir.node("Concat", [batch.outputs[0], rest], {"axis": 0})
                zeros = ir.node("ConstantOfShape", [shape.outputs[0]])
                nodes += [batch, shape, zeros, ir.node(op + "Like", [zeros.outputs[0]], attrs)]
        else:
            raise SccError(f"export cannot draw {name!r} ({draw.kind}) inside the graph; "
                           "export with draws_as_inputs=True and feed it")
        for node in nodes:
            graph.insert_before(first, node)
        out = nodes[-1].outputs[0]
        out.name, out.shape, out.type = f"{name}_drawn", value.shape, value.type
        value.replace_all_uses_with(out)
        graph.inputs.remove(value)


def _constant(value, depth: int = 0):
    """The numpy value of a constant, or of a Reshape/Transpose/Expand chain over one (left unfolded when
    large). An Expand stays a stride-0 numpy view: nothing is materialised."""
    import numpy as np

    if value is None or value.const_value is not None:
        return None if value is None else value.const_value.numpy()
    node = value.producer()
    if node is None or depth > 6 or node.op_type not in ("Reshape", "Transpose", "Expand"):
        return None
    data = _constant(node.inputs[0], depth + 1)
    if data is None:
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm")
        return data.transpose(perm) if perm is not None else data.T
    if node.inputs[1] is None or node.inputs[1].const_value is None:
        return None
    shape = [int(d) for d in node.inputs[1].const_value.numpy()]
    if node.op_type == "Expand":
        return np.broadcast_to(data, np.broadcast_shapes(data.shape, tuple(shape)))
    shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]  # 0 keeps the input's size
    return data.reshape(shape)


def _repeats_along(array, dims: int) -> bool:
    """Whether `array` holds one slice repeated along its first `dims` dimensions."""
    import numpy as np

    if all(stride == 0 or size == 1 for stride, size in zip(array.strides[:dims], array.shape[:dims])):
        return True  # a broadcast view
    return np.array_equal(array, np.broadcast_to(array[(0,) * dims], array.shape))


def _shrink_broadcast_constants(model) -> int:
    """MatMul(C, X) where C is a constant repeated along its leading dims -> MatMul(C[0, ..., 0], X).

    make_fx writes `A @ x` for a 2-D A and a batched x (a view's zoom matrix, a linear layer's weight on a
    non-contiguous input) as expand(A) -> bmm. In eager the expand is a free stride-0 view; in ONNX it is
    either folded into a stored (batch, H, H) copy or an Expand that materialises the weight on every run
    (350 MB per in-projection for ViT-B-32 at 4 views). ONNX MatMul broadcasts, so the 2-D A gives the same
    result. Returns the number of MatMul operands replaced (the expanded copies become dead and are removed).
    """
    import numpy as np
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph, shrunk = model.graph, 0
    existing = _InitializerIndex(graph)
    for node in list(graph):
        if node.op_type != "MatMul" or any(v is None or v.shape is None for v in node.inputs):
            continue
        for i, value in enumerate(node.inputs):
            other = node.inputs[1 - i]
            if len(value.shape) <= 2 or len(other.shape) < len(value.shape):
                continue
            lead = tuple(value.shape)[:-2]
            if tuple(other.shape)[len(other.shape) - len(value.shape):][:-2] != lead:
                continue  # the other operand must carry the same leading dims, so the output shape is unchanged
            array = _constant(value)
            if array is None or not _repeats_along(array, len(lead)):
                continue
            node.replace_input_with(i, existing.value_for(np.ascontiguousarray(array[(0,) * len(lead)]), node,
                                                          f"{value.name}_unbroadcast", value.type))
            shrunk += 1
    if shrunk:
        RemoveUnusedNodesPass()(model)  # the Reshape/expanded copies nobody reads any more
    return shrunk


class _InitializerIndex:
    """Finds a graph's 2-D initializers by content so that a needed matrix reuses a stored one (or its
    transpose, through a Transpose node that ORT folds at load) instead of storing the weights twice."""

    def __init__(self, graph):
        self.graph, self.by_shape = graph, {}
        for v in graph.initializers.values():
            if v.const_value is not None and v.shape is not None and len(v.shape) == 2:
                self.by_shape.setdefault(tuple(v.shape), []).append(v)

    def _find(self, array):
        import numpy as np

        for v in self.by_shape.get(array.shape, []):
            if v.const_value.dtype.numpy() == array.dtype and np.array_equal(v.const_value.numpy(), array):
                return v
        return None

    def value_for(self, array, before, name: str, type_):
        import onnx_ir as ir

        if array.ndim == 2:
            same = self._find(array)
            if same is not None:
                return same
            transposed = self._find(array.T)
            if transposed is not None:
                node = ir.node("Transpose", [transposed], {"perm": [1, 0]})
                self.graph.insert_before(before, node)
                node.outputs[0].name, node.outputs[0].type = name, type_
                node.outputs[0].shape = ir.Shape(array.shape)
                return node.outputs[0]
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=type_, const_value=ir.Tensor(array, name=name))
        self.graph.register_initializer(value)
        if array.ndim == 2:
            self.by_shape.setdefault(array.shape, []).append(value)
        return value


def _fold(model) -> None:
    """Constant folding + dead-code removal (onnxscript). Always needed: the raw export builds the zoom
    matrices with a 1-D Resize and casts with CastLike, which ORT's CPU provider cannot run."""
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)


# onnxoptimizer's fuse-and-eliminate passes minus the ones that are moot or risky here: `fuse_qkv` (renames
# weights for a pattern CLIP's packed in-projection does not have) and `rewrite_where`.
_ONNXOPTIMIZER_SKIP = {"fuse_qkv", "rewrite_where"}
_PROTOBUF_LIMIT = 2**31 - 2**26  # one serialized ModelProto must stay under 2 GiB; keep a margin for the graph


ONNXOPTIMIZER_MISSING = "onnxoptimizer (not installed: pip install onnxoptimizer, or the extra scc-defense[onnx])"


def _save(program, model, path: Path, optimize: bool) -> list[str]:
    """Write the model; with `optimize`, through onnxoptimizer's passes when it is installed and the model
    fits in one protobuf. Returns the optimizer passes that were skipped, each with the reason (empty when
    onnxoptimizer ran or `optimize` was off)."""
    import onnx_ir as ir

    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    try:
        import onnxoptimizer
    except ImportError:
        onnxoptimizer = None
    skipped = []
    if optimize and onnxoptimizer is None:
        skipped.append(ONNXOPTIMIZER_MISSING)
    elif optimize and weights > _PROTOBUF_LIMIT:
        skipped.append(f"onnxoptimizer (weights {weights / 2**30:.1f} GiB: over one protobuf's 2 GiB, saved "
                       "with external data instead)")
    if not optimize or skipped:
        program.save(str(path))  # large models: weights go to external data next to the file
        return skipped
    import onnx

    passes = [p for p in onnxoptimizer.get_fuse_and_elimination_passes() if p not in _ONNXOPTIMIZER_SKIP]
    proto = onnxoptimizer.optimize(ir.serde.serialize_model(model), passes)
    onnx.save(proto, str(path))
    return skipped


def op_counts(model) -> dict[str, int]:
    """{op_type: count} over the top-level graph of an onnx.ModelProto (the export has no subgraphs)."""
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def _metadata(defended: Defended, batch_size: int | None, draws_as_inputs: bool, draws: dict[str, list]) -> dict:
    clf = defended.classifier
    return {
        "scc.format": "1",
        "scc.model": clf.name,
        "scc.defense": defended.defense,
        "scc.preset": defended.preset,
        "scc.config": repr(defended.config),
        "scc.labels": json.dumps(clf.labels),
        "scc.image_size": str(clf.image_size),
        "scc.preprocess": json.dumps(clf.preprocess.to_dict()),  # image file -> pixels (scc.images.Preprocess)
        "scc.batch_size": "dynamic" if batch_size is None else str(batch_size),
        "scc.draws": json.dumps(draws),  # name -> shape ("batch" for a dynamic batch), inputs or made in the graph
        "scc.draws_as_inputs": json.dumps(draws_as_inputs),
        "scc.dtype": dtype_name(defended.dtype),  # the image tower's; inputs and outputs are fp32
    }


# ----------------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------------
def _check_exporter() -> None:
    for module in ("onnx", "onnxscript", "onnx_ir"):
        try:
            __import__(module)
        except ImportError as err:
            raise SccError(f"ONNX export needs the {module!r} package ({err}); "
                           "install the extra: pip install 'scc-defense[onnx]'") from err


def export_onnx(defended: Defended, path: str | Path, batch_size: int | None = None, draws_as_inputs: bool = False,
                opset: int | None = None, optimize: bool = True, trace_outputs: bool = False,
                dtype: torch.dtype | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the whole defended procedure of `defended` to an ONNX file; see the module docstring.

    batch_size: None (default) writes one file for every batch size: the first dimension of `pixels`
    (B, 3, S, S), of the draw inputs and of every output is the symbol "batch". An integer N writes a
    fixed-shape file (every dimension a number), for runtimes that need static shapes (TensorRT engines,
    ORT CUDA graphs).

    Returns dict(path, seconds (whole export), trace_seconds, bytes (the .onnx file), batch_size (None when
    dynamic), dynamic_batch, inputs, outputs, nodes, ops ({op_type: count}), scatter_nodes, control_flow_nodes,
    opset, constants_unbroadcast, onnxoptimizer (whether its passes ran), skipped_passes (optimizer passes not
    run, each with its reason; a UserWarning names them too)). `trace_outputs=True` adds one output per
    sign-gradient step (`step_sign_0`, ...: each step's gradient sign, as `Defended(x, trace=[])` collects) for
    parity tests. `dtype` (default: the module's own, fp32 unless `defended.with_dtype(...)`): torch.float16 or
    torch.bfloat16 writes the image tower's weights and activations in that type, with its patch stem and
    LayerNorms in fp32 (`Defended.with_dtype(dtype, export=True)`); pixels, draws, perturbation, sign steps, losses and logits stay
    fp32, as in the compiled engine. fp16 files are for GPU runtimes (ORT CUDA, TensorRT); ORT's CPU provider
    runs them too, slower than fp32. `optimize=False` skips the un-broadcasting of constants and onnxoptimizer's passes; constant
    folding always runs (the raw export holds ops ORT cannot run). Models over 2 GB are saved with external data.
    `progress(line)` is told each stage as it starts (tracing, exporting, optimizing, saving): on ViT-B/32 the
    whole export takes minutes.
    """
    say = progress or (lambda line: None)
    if not isinstance(defended, Defended):
        raise SccError(f"export_onnx needs a defended classifier from scc.defend(...), got {type(defended).__name__}")
    defended.record.require("onnx", "exports")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise SccError(f"batch_size must be a positive integer (a fixed-shape file) or None (a dynamic batch), "
                       f"got {batch_size!r}")
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise SccError(f"opset must be an integer >= {MIN_OPSET} (torch's ONNX exporter writes opset 18 and "
                       f"newer; Pad and other ops have no down-conversion), got {opset!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise SccError(f"cannot write {path}: the folder {path.parent} does not exist")
    _check_exporter()
    dynamic = batch_size is None
    dtype = defended.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SccError(f"export dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype!r}")
    defended = defended.with_dtype(dtype, export=True)  # the module itself in fp32

    t0 = time.perf_counter()
    say(f"tracing {defended.spec} on {defended.classifier.name} (forward and input-gradient passes, "
        f"{'dynamic batch' if dynamic else f'batch {batch_size}'}, {dtype_name(dtype)})")
    graph, example, input_names, output_names = trace_procedure(defended, batch_size, trace_outputs)
    trace_seconds = time.perf_counter() - t0
    say(f"traced {len(graph.graph.nodes)} ATen nodes in {trace_seconds:.1f} s; exporting to ONNX")
    dynamic_shapes = None
    if dynamic:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in example)
    # torch's own optimize=True adds onnxscript's pattern rewriter, whose generic matcher takes most of the
    # export time on these ~5000-node graphs for no runtime gain; constant folding + onnxoptimizer do the job.
    with warnings.catch_warnings():  # every input's batch is the one "batch" axis: expected, not news
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used")
        program = torch.onnx.export(graph, example, dynamo=True, input_names=input_names, output_names=output_names,
                                    opset_version=opset, optimize=False, verbose=False, dynamic_shapes=dynamic_shapes)
    model = program.model
    draw_names = input_names[1:]
    if not draws_as_inputs and draw_names:
        _draws_in_graph(model, defended, "pixels", draw_names)
    say("folding constants and optimizing the graph")
    _fold(model)
    draws = {name: (["batch"] if dynamic else []) + list(t.shape)[1 if dynamic else 0:]
             for name, t in zip(draw_names, example[1:])}
    shrunk = _shrink_broadcast_constants(model) if optimize else 0
    model.metadata_props.update(_metadata(defended, batch_size, draws_as_inputs, draws))
    say(f"saving {path}")
    skipped = _save(program, model, path, optimize)
    if skipped:
        warnings.warn(f"{path}: skipped optimizer passes: {'; '.join(skipped)} (the file is larger but correct)",
                      UserWarning, stacklevel=2)
    seconds = time.perf_counter() - t0
    import onnx

    saved = onnx.load(str(path), load_external_data=False)
    ops = op_counts(saved)
    return {
        "path": str(path),
        "seconds": seconds,
        "trace_seconds": trace_seconds,
        "bytes": path.stat().st_size,
        "batch_size": batch_size,
        "dynamic_batch": dynamic,
        "dtype": dtype_name(defended.dtype),
        "inputs": [v.name for v in saved.graph.input],
        "outputs": [v.name for v in saved.graph.output],
        "nodes": sum(ops.values()),
        "ops": ops,
        "scatter_nodes": sum(n for op, n in ops.items() if op.startswith("Scatter")),
        "control_flow_nodes": sum(ops.get(op, 0) for op in ("If", "Loop", "Scan")),
        "opset": next((o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")), None),
        "constants_unbroadcast": shrunk,
        "onnxoptimizer": optimize and not skipped,
        "skipped_passes": skipped,
    }
