"""A ready NVIDIA Triton Inference Server model repository for a defended classifier (`scc export triton-server`).

    export_triton_server(scc.defend(clf, "scc", preset="latency"), "repo", max_batch=8)

writes

    repo/<name>/config.pbtxt        the model configuration (protobuf text format, the server's ModelConfig)
    repo/<name>/labels.txt          one class name per line, in logit order
    repo/<name>/1/model.onnx        the whole defended procedure, batch-dynamic (`scc.export.export_onnx`)

The configuration: `platform: "onnxruntime_onnx"` (the server's ONNX Runtime backend), `max_batch_size` (the
server adds the batch dimension itself, so `dims` leave it out; the backend requires the file's first dimension to be
dynamic when max_batch_size > 0, which the default export is), input `pixels` FP32 (3, S, S) in [0, 1] (plus
`start`/`noise` with draws_as_inputs), output `logits` FP32 (C,) with `label_filename: "labels.txt"` so that
the server's classification extension can answer with class names, `dynamic_batching` (preferred sizes: the
powers of two up to max_batch, and max_batch; a queue delay, given in milliseconds and written in whole
microseconds), an `instance_group` and, with `tensorrt=True`, ONNX
Runtime's TensorRT execution provider as a GPU accelerator (FP32, engine cache on, a shape profile from batch 1
to max_batch). The file's `scc.*` metadata (defense, preset, config, labels as JSON, ...) is repeated as model
`parameters`.

Instance kind (`device`): "auto" (default) writes KIND_AUTO: the server puts the instances on every GPU it sees and
on the CPU when it sees none, so one repository serves on either machine. "gpu" writes KIND_GPU (the model then
fails to load where there is no GPU: explicit), "cpu" writes KIND_CPU. `tensorrt=True` needs "auto" or "gpu".

`validate_config(text)` checks a config.pbtxt: with `tritonclient` installed (`pip install
'scc-defense[triton-server]'`) by parsing it into the server's own ModelConfig protobuf (`tritonclient.grpc.
model_config_pb2`), and always with this module's small text-format reader against the subset of ModelConfig
fields listed in `_SCHEMA` (an unknown or misspelled field, a bad enum value or a value of the wrong kind is
an SccError).
"""
from __future__ import annotations

import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import SccError

from .onnx import export_onnx

PLATFORM = "onnxruntime_onnx"
LABELS_FILE = "labels.txt"
DEVICES = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
DEFAULT_QUEUE_DELAY_MS = 0.5  # dynamic batching's max_queue_delay_microseconds: 500


class Enum(str):
    """A protobuf enum value: written bare (`TYPE_FP32`), not quoted."""


# ----------------------------------------------------------------------------------------------------------
# Writing protobuf text format
# ----------------------------------------------------------------------------------------------------------
def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 kept as is; quotes, backslashes, control chars escaped)."""
    out = []
    for ch in text:
        if ch in "\"\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _scalar(value) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    raise TypeError(f"no text format for {type(value).__name__}")


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a message given as a dict: a dict value is a sub-message, a list of dicts a
    repeated message, a list of scalars a repeated scalar, `Enum` a bare enum value."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if isinstance(value, dict):
            lines += [f"{pad}{key} {{", to_pbtxt(value, indent + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines += [f"{pad}  {{", to_pbtxt(item, indent + 2), f"{pad}  }}" + ("," if i < len(value) - 1 else "")]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(line for line in lines if line)


def _map(entries: dict[str, str], wrap: bool) -> list[dict]:
    """A protobuf map field: one {key, value} message per entry (`wrap`: the value is a ModelParameter)."""
    return [{"key": k, "value": {"string_value": v} if wrap else v} for k, v in entries.items()]


# ----------------------------------------------------------------------------------------------------------
# The configuration
# ----------------------------------------------------------------------------------------------------------
def preferred_batch_sizes(max_batch: int) -> list[int]:
    """Powers of two from 2 up to max_batch, and max_batch: 8 -> [2, 4, 8], 6 -> [2, 4, 6], 1 -> [1]."""
    sizes = [2 ** k for k in range(1, max_batch.bit_length()) if 2 ** k <= max_batch]
    return sorted(set(sizes + [max_batch]))


def queue_delay_us(queue_delay_ms: float) -> int:
    """A queue delay in milliseconds -> the whole microseconds of `max_queue_delay_microseconds` (SccError for a
    negative or non-finite value)."""
    if isinstance(queue_delay_ms, bool) or not isinstance(queue_delay_ms, (int, float)) \
            or not 0 <= queue_delay_ms < float("inf"):
        raise SccError(f"queue delay must be a number of milliseconds >= 0, got {queue_delay_ms!r}")
    return round(queue_delay_ms * 1000)


def triton_server_config(name: str, inputs: dict[str, list[int]], outputs: dict[str, list[int]], max_batch: int = 8,
                         instances: int = 1, device: str = "auto", tensorrt: bool = False,
                         parameters: dict[str, str] | None = None, queue_delay_ms: float = DEFAULT_QUEUE_DELAY_MS,
                         labels_output: str | None = "logits") -> str:
    """The config.pbtxt text. `inputs`/`outputs`: name -> dims WITHOUT the batch dimension (the server adds it),
    e.g. {"pixels": [3, 32, 32]} and {"logits": [10]}. `labels_output` gets `label_filename: "labels.txt"`.
    `queue_delay_ms`: dynamic batching's queue delay, written as whole microseconds."""
    _check_positive("max_batch", max_batch)
    _check_positive("instances", instances)
    if device not in DEVICES:
        raise SccError(f"device must be one of {sorted(DEVICES)} (the server's instance kind), got {device!r}")
    if tensorrt and device == "cpu":
        raise SccError("tensorrt needs GPU instances: use device 'gpu' or 'auto', not 'cpu'")
    delay_us = queue_delay_us(queue_delay_ms)
    config: dict[str, Any] = {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_batch,
        "input": [{"name": k, "data_type": Enum("TYPE_FP32"), "dims": list(v)} for k, v in inputs.items()],
        "output": [{"name": k, "data_type": Enum("TYPE_FP32"), "dims": list(v),
                    **({"label_filename": LABELS_FILE} if k == labels_output else {})} for k, v in outputs.items()],
        "dynamic_batching": {"preferred_batch_size": preferred_batch_sizes(max_batch),
                             "max_queue_delay_microseconds": delay_us},
        "instance_group": [{"count": instances, "kind": Enum(DEVICES[device])}],
    }
    if tensorrt:
        def profile(batch: int) -> str:  # "pixels:1x3x32x32,noise:1x4x3x32x32"
            return ",".join(f"{k}:{'x'.join(str(d) for d in [batch, *v])}" for k, v in inputs.items())

        trt = {"precision_mode": "FP32", "max_workspace_size_bytes": str(1 << 30), "trt_engine_cache_enable": "1",
               "trt_profile_min_shapes": profile(1), "trt_profile_opt_shapes": profile(max_batch),
               "trt_profile_max_shapes": profile(max_batch)}
        config["optimization"] = {"execution_accelerators": {
            "gpu_execution_accelerator": [{"name": "tensorrt", "parameters": _map(trt, wrap=False)}]}}
    if parameters:
        config["parameters"] = _map(parameters, wrap=True)
    return to_pbtxt(config) + "\n"


def _check_positive(what: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SccError(f"{what} must be a positive integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Reading and validating protobuf text format
# ----------------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r'\s+|#[^\n]*|(?P<str>"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\')'
                    r'|(?P<num>[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+)[fF]?)'
                    r'|(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<sym>[{}\[\]:,;<>])')


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise SccError(f"config.pbtxt line {line}: cannot read {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind is not None:
            out.append((kind, m.group(kind), text.count("\n", 0, pos) + 1))
        pos = m.end()
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\([0-7]{3}|.)", lambda m: chr(int(m.group(1), 8)) if len(m.group(1)) == 3 else
                  {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def parse_pbtxt(text: str) -> dict[str, list]:
    """Protobuf text format -> {field: [values]} (every field a list; messages are dicts, enums/identifiers
    str, strings str, numbers int/float). Structure only: field names are checked by `validate_config`."""
    tokens, i = _tokens(text), 0

    def peek(k=0):
        return tokens[i + k] if i + k < len(tokens) else ("eof", "", tokens[-1][2] if tokens else 1)

    def expect(value):
        nonlocal i
        kind, tok, line = peek()
        if tok != value:
            raise SccError(f"config.pbtxt line {line}: expected {value!r}, got {tok or 'end of file'!r}")
        i += 1

    def scalar():
        nonlocal i
        kind, tok, line = peek()
        i += 1
        if kind == "str":
            return _unquote(tok)
        if kind == "num":
            t = tok.rstrip("fF")
            return float(t) if any(c in t for c in ".eE") else int(t)
        if kind == "id":
            return tok
        raise SccError(f"config.pbtxt line {line}: expected a value, got {tok or 'end of file'!r}")

    def message(end):
        nonlocal i
        fields: dict[str, list] = {}
        while peek()[1] != end:
            kind, name, line = peek()
            if kind != "id":
                raise SccError(f"config.pbtxt line {line}: expected a field name, got {name or 'end of file'!r}")
            i += 1
            colon = peek()[1] == ":"
            if colon:
                i += 1
            values = []
            if peek()[1] == "[":  # a list of messages or scalars
                i += 1
                while peek()[1] != "]":
                    values.append(submessage() if peek()[1] in "{<" else scalar())
                    if peek()[1] == ",":
                        i += 1
                expect("]")
            elif peek()[1] in ("{", "<"):
                values.append(submessage())
            elif colon:
                values.append(scalar())
            else:
                raise SccError(f"config.pbtxt line {line}: field {name!r} needs ':' or '{{'")
            fields.setdefault(name, []).extend(values)
            if peek()[1] in (",", ";"):
                i += 1
        return fields

    def submessage():
        nonlocal i
        close = "}" if peek()[1] == "{" else ">"
        i += 1
        fields = message(close)
        expect(close)
        return fields

    fields = message("")
    if i != len(tokens):
        raise SccError(f"config.pbtxt line {peek()[2]}: unexpected {peek()[1]!r}")
    return fields


# The part of the server's ModelConfig (model_config.proto) this module writes or a user is likely to add, as
# field name -> kind: "str" | "int" | "bool" | ("enum", values) | a nested schema dict | ("map", value kind).
_DATA_TYPES = ("TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
               "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
               "TYPE_BF16")
_ACCELERATOR = {"name": "str", "parameters": ("map", "str")}
_SCHEMA: dict[str, Any] = {
    "name": "str", "platform": "str", "backend": "str", "runtime": "str", "max_batch_size": "int",
    "default_model_filename": "str",
    "version_policy": {"latest": {"num_versions": "int"}, "all": {}, "specific": {"versions": "int"}},
    "input": {"name": "str", "data_type": ("enum", _DATA_TYPES), "format": ("enum", ("FORMAT_NONE", "FORMAT_NHWC",
              "FORMAT_NCHW")), "dims": "int", "reshape": {"shape": "int"}, "is_shape_tensor": "bool",
              "allow_ragged_batch": "bool", "optional": "bool"},
    "output": {"name": "str", "data_type": ("enum", _DATA_TYPES), "dims": "int", "reshape": {"shape": "int"},
               "label_filename": "str", "is_shape_tensor": "bool"},
    "dynamic_batching": {"preferred_batch_size": "int", "max_queue_delay_microseconds": "int",
                         "preserve_ordering": "bool", "priority_levels": "int", "default_priority_level": "int"},
    "instance_group": {"name": "str", "kind": ("enum", ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")),
                       "count": "int", "gpus": "int", "profile": "str", "passive": "bool"},
    "optimization": {"priority": ("enum", ("PRIORITY_DEFAULT", "PRIORITY_MAX", "PRIORITY_MIN")),
                     "graph": {"level": "int"},
                     "execution_accelerators": {"gpu_execution_accelerator": _ACCELERATOR,
                                                "cpu_execution_accelerator": _ACCELERATOR},
                     "input_pinned_memory": {"enable": "bool"}, "output_pinned_memory": {"enable": "bool"}},
    "parameters": ("map", {"string_value": "str"}),
}


def _check(fields: dict[str, list], schema: dict[str, Any], where: str) -> None:
    for name, values in fields.items():
        if name not in schema:
            raise SccError(f"config.pbtxt: {where} has no field {name!r}; known fields: {', '.join(sorted(schema))}")
        kind = schema[name]
        for value in values:
            _check_value(value, kind, f"{where}.{name}")


def _check_value(value, kind, where: str) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise SccError(f"config.pbtxt: {where} must be a message {{...}}, got {value!r}")
        _check(value, kind, where)
    elif isinstance(kind, tuple) and kind[0] == "enum":
        if value not in kind[1]:
            raise SccError(f"config.pbtxt: {where} = {value!r} is not one of {', '.join(kind[1])}")
    elif isinstance(kind, tuple) and kind[0] == "map":
        if not isinstance(value, dict) or set(value) != {"key", "value"}:
            raise SccError(f"config.pbtxt: {where} entries need exactly 'key' and 'value', got {value!r}")
        _check_value(value["key"][0], "str", f"{where}.key")
        _check_value(value["value"][0], kind[1], f"{where}[{value['key'][0]!r}]")
    elif kind == "str" and not isinstance(value, str) or kind == "int" and not isinstance(value, int) or \
            kind == "bool" and value not in ("true", "false", "True", "False", "t", "f", 0, 1):
        raise SccError(f"config.pbtxt: {where} must be {'a string' if kind == 'str' else 'an integer' if kind == 'int' else 'true/false'}, got {value!r}")


def validate_config(text: str, use_tritonclient: bool | None = None) -> dict[str, list]:
    """Check a config.pbtxt (see the module docstring); returns the parsed fields ({field: [values]}).

    use_tritonclient: None = also parse with the server's own protobuf when tritonclient is installed,
    True = require it (SccError when missing), False = this module's checks only.
    """
    if use_tritonclient is not False:
        pb = _model_config_pb2()
        if pb is None and use_tritonclient:
            raise SccError("validating with Triton Inference Server's ModelConfig protobuf needs tritonclient: "
                           "pip install 'scc-defense[triton-server]'")
        if pb is not None:
            from google.protobuf import text_format

            try:
                text_format.Parse(text, pb.ModelConfig())
            except text_format.ParseError as err:
                raise SccError(f"config.pbtxt is not a valid Triton Inference Server ModelConfig: {err}") from err
    fields = parse_pbtxt(text)
    _check(fields, _SCHEMA, "ModelConfig")
    for required in ("name", "max_batch_size", "input", "output"):
        if required not in fields:
            raise SccError(f"config.pbtxt: no {required!r} (an scc model configuration always has one)")
    if "platform" not in fields and "backend" not in fields:
        raise SccError("config.pbtxt: ModelConfig needs 'platform' or 'backend'")
    return fields


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2


# ----------------------------------------------------------------------------------------------------------
# The repository
# ----------------------------------------------------------------------------------------------------------
def default_model_name(defended) -> str:
    """'scc-tiny-digits-scc-latency', 'ViT-B-32-ttc': model, defense and a non-default preset."""
    name = f"{defended.classifier.name}-{defended.defense}"
    if defended.preset != "paper":
        name += f"-{defended.preset}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def export_triton_server(defended, repo: str | Path, name: str | None = None, max_batch: int = 8, instances: int = 1,
                         device: str = "auto", tensorrt: bool = False, queue_delay_ms: float = DEFAULT_QUEUE_DELAY_MS,
                         draws_as_inputs: bool = False, opset: int | None = None, optimize: bool = True,
                         overwrite: bool = False, dtype=None, progress=None) -> dict[str, Any]:
    """Write a Triton Inference Server model repository entry for `defended` (see the module docstring) and
    validate its config.

    Returns dict(repo, name, model_dir, config (path), config_text, onnx (export_onnx's report), labels (path),
    validated_with (["scc"] or ["scc", "tritonclient"]), seconds). `repo` is created when its parent exists;
    an existing `repo/name` is refused unless `overwrite` (then it is replaced). `progress`: see export_onnx.
    """
    repo = Path(repo)
    name = name if name is not None else default_model_name(defended)
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        raise SccError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (a folder name; the "
                       "server's model name); pass --name")
    # argument errors first (fail before the minute-long export)
    triton_server_config(name, {"pixels": [3, 1, 1]}, {"logits": [1]}, max_batch, instances, device, tensorrt,
                         queue_delay_ms=queue_delay_ms)
    labels = defended.classifier.labels
    bad = [label for label in labels if "\n" in label or "\r" in label]
    if bad:
        raise SccError(f"labels {bad!r} contain a line break; {LABELS_FILE} holds one label per line")
    if not repo.parent.is_dir():
        raise SccError(f"cannot write the repository {repo}: the folder {repo.parent} does not exist")
    model_dir = repo / name
    if model_dir.exists():
        if not overwrite:
            raise SccError(f"{model_dir} already exists; pass --overwrite (overwrite=True) to replace it, or "
                           "another --name")
        shutil.rmtree(model_dir)
    t0 = time.perf_counter()
    (model_dir / "1").mkdir(parents=True)
    info = export_onnx(defended, model_dir / "1" / "model.onnx", batch_size=None, draws_as_inputs=draws_as_inputs,
                       opset=opset, optimize=optimize, dtype=dtype, progress=progress)
    import onnx

    model = onnx.load(info["path"], load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def dims(values) -> dict[str, list[int]]:  # without the (symbolic) batch dimension
        return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in values if v.name not in inits}

    metadata = {p.key: p.value for p in model.metadata_props}
    text = triton_server_config(name, dims(model.graph.input), dims(model.graph.output), max_batch, instances,
                                device, tensorrt, parameters=metadata, queue_delay_ms=queue_delay_ms)
    validate_config(text)
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(text, encoding="utf-8")
    labels_path = model_dir / LABELS_FILE
    labels_path.write_text("".join(label + "\n" for label in labels), encoding="utf-8")
    return {
        "repo": str(repo), "name": name, "model_dir": str(model_dir), "config": str(config_path),
        "config_text": text, "onnx": info, "labels": str(labels_path),
        "validated_with": ["scc"] + (["tritonclient"] if _model_config_pb2() is not None else []),
        "seconds": time.perf_counter() - t0,
    }


def export_triton(defended, repo: str | Path, name: str | None = None, max_batch: int = 8, instances: int = 1,
                  device: str = "auto", tensorrt: bool = False, queue_delay_us: int = 500, **kwargs) -> dict[str, Any]:
    """Deprecated: use `export_triton_server` (its queue delay is `queue_delay_ms`); this name and its
    `queue_delay_us` go in the next release."""
    warnings.warn("scc.export.export_triton is deprecated; use export_triton_server (queue_delay_ms instead of "
                  "queue_delay_us)", DeprecationWarning, stacklevel=2)
    return export_triton_server(defended, repo, name, max_batch, instances, device, tensorrt,
                                queue_delay_ms=queue_delay_us / 1000, **kwargs)


def model_repository_tree(model_dir: str | Path) -> list[str]:
    """The files under a model's folder, relative to the repository (for printing)."""
    model_dir = Path(model_dir)
    return sorted(str(p.relative_to(model_dir.parent)) for p in model_dir.rglob("*") if p.is_file())
