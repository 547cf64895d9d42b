"""`scc export triton-server`: a Triton Inference Server model repository (config.pbtxt, labels.txt,
1/model.onnx).

Every generated config is validated by this package's reader and, when `tritonclient` is installed
(`pip install 'scc-defense[triton-server]'`), by the server's own ModelConfig protobuf. The repository's model.onnx
is run with ONNX Runtime at batch 1 and at max_batch_size, as the server's ONNX Runtime backend would feed it. No
Triton Inference Server runs here (it needs docker and NVIDIA's container).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import scc
from scc.export import OrtDefended
from scc.cli import main as cli_main
from scc.export.triton_server import (export_triton_server, parse_pbtxt, preferred_batch_sizes, to_pbtxt,
                                      triton_server_config, validate_config)

ort = pytest.importorskip("onnxruntime")

try:
    from tritonclient.grpc import model_config_pb2
except ImportError:
    model_config_pb2 = None

VALIDATORS = [False, pytest.param(True, marks=pytest.mark.skipif(
    model_config_pb2 is None, reason="tritonclient not installed (pip install 'scc-defense[triton-server]')"))]


@pytest.fixture(autouse=True)
def _threads():  # overrides conftest's: one thread (a shared 2-core machine)
    torch.set_num_threads(1)
    yield


def export_main(argv):
    return cli_main(["export", *argv])


def sample_config(**kwargs) -> str:
    args = dict(max_batch=8, instances=2, device="gpu", tensorrt=True,
                parameters={"scc.labels": '["zero", "one"]', "scc.note": 'a "quoted" back\\slash, café'})
    args.update(kwargs)
    return triton_server_config("tiny-ttc", {"pixels": [3, 32, 32], "noise": [4, 3, 32, 32]}, {"logits": [10]}, **args)


def test_preferred_batch_sizes():
    assert preferred_batch_sizes(8) == [2, 4, 8]
    assert preferred_batch_sizes(6) == [2, 4, 6]
    assert preferred_batch_sizes(1) == [1]
    assert preferred_batch_sizes(64) == [2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("tritonclient", VALIDATORS, ids=["scc-reader", "tritonclient"])
def test_config_parses(tritonclient):
    fields = validate_config(sample_config(), use_tritonclient=tritonclient)
    assert fields["platform"] == ["onnxruntime_onnx"] and fields["max_batch_size"] == [8]
    pixels, noise = fields["input"]
    assert pixels["name"] == ["pixels"] and pixels["dims"] == [3, 32, 32] and pixels["data_type"] == ["TYPE_FP32"]
    assert noise["dims"] == [4, 3, 32, 32]
    assert fields["output"][0]["label_filename"] == ["labels.txt"] and fields["output"][0]["dims"] == [10]
    batching = fields["dynamic_batching"][0]
    assert batching["preferred_batch_size"] == [2, 4, 8] and batching["max_queue_delay_microseconds"] == [500]
    assert fields["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"]}]
    trt = fields["optimization"][0]["execution_accelerators"][0]["gpu_execution_accelerator"][0]
    trt_params = {p["key"][0]: p["value"][0] for p in trt["parameters"]}
    assert trt["name"] == ["tensorrt"] and trt_params["precision_mode"] == "FP32"
    assert trt_params["trt_profile_min_shapes"] == "pixels:1x3x32x32,noise:1x4x3x32x32"
    assert trt_params["trt_profile_max_shapes"] == "pixels:8x3x32x32,noise:8x4x3x32x32"
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in fields["parameters"]}
    assert params == {"scc.labels": '["zero", "one"]', "scc.note": 'a "quoted" back\\slash, café'}


@pytest.mark.skipif(model_config_pb2 is None, reason="tritonclient not installed")
def test_tritonclient_reads_the_same_values():
    from google.protobuf import text_format

    config = text_format.Parse(sample_config(device="auto"), model_config_pb2.ModelConfig())
    assert config.max_batch_size == 8 and config.platform == "onnxruntime_onnx"
    assert list(config.input[0].dims) == [3, 32, 32] and config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert config.output[0].label_filename == "labels.txt"
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert config.instance_group[0].count == 2
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt" and accelerator.parameters["trt_engine_cache_enable"] == "1"
    assert config.parameters["scc.note"].string_value == 'a "quoted" back\\slash, café'


@pytest.mark.parametrize("tritonclient", VALIDATORS, ids=["scc-reader", "tritonclient"])
@pytest.mark.parametrize("bad, message", [
    (("max_batch_size:", "max_batch_sise:"), "max_batch_sise"),
    (("preferred_batch_size", "prefered_batch_size"), "prefered_batch_size"),
    (("KIND_GPU", "KIND_TPU"), "KIND_TPU"),
    (("label_filename: \"labels.txt\"", "label_filename: 7"), "label_filename"),
])
def test_misspelled_or_mistyped_field_is_rejected(tritonclient, bad, message):
    text = sample_config()
    assert bad[0] in text
    with pytest.raises(scc.SccError, match=message):
        validate_config(text.replace(bad[0], bad[1], 1), use_tritonclient=tritonclient)


def test_pbtxt_round_trip():
    message = {"name": "m", "dims": [1, 2], "sub": {"flag": True, "x": 1.5}, "list": [{"a": "b"}, {"a": "c"}]}
    assert parse_pbtxt(to_pbtxt(message)) == {"name": ["m"], "dims": [1, 2], "sub": [{"flag": ["true"], "x": [1.5]}],
                                              "list": [{"a": ["b"]}, {"a": ["c"]}]}
    with pytest.raises(scc.SccError, match="line 2: expected a value"):
        parse_pbtxt('name: "m"\nmax_batch_size: }')


def test_config_errors():
    with pytest.raises(scc.SccError, match="tensorrt needs GPU instances"):
        sample_config(device="cpu")
    with pytest.raises(scc.SccError, match="max_batch must be a positive integer, got 0"):
        sample_config(max_batch=0)
    with pytest.raises(scc.SccError, match=r"device must be one of \['auto', 'cpu', 'gpu'\].*'tpu'"):
        sample_config(device="tpu")
    with pytest.raises(scc.SccError, match="no 'max_batch_size'"):
        validate_config('name: "m"\nplatform: "onnxruntime_onnx"\ninput [ { name: "x" } ]\noutput [ { name: "y" } ]',
                        use_tritonclient=False)


def test_export_errors_before_exporting(tiny, tmp_path):
    defended = scc.defend(tiny, "ttc")
    with pytest.raises(scc.SccError, match=r"model name 'a/b' must be letters"):
        export_triton_server(defended, tmp_path / "repo", name="a/b")
    with pytest.raises(scc.SccError, match="the folder .*missing does not exist"):
        export_triton_server(defended, tmp_path / "missing" / "repo")
    (tmp_path / "repo" / "taken").mkdir(parents=True)
    with pytest.raises(scc.SccError, match="already exists; pass --overwrite"):
        export_triton_server(defended, tmp_path / "repo", name="taken")
    odd = scc.load("scc-tiny-digits", labels=[f"digit\n{w}" if i == 3 else w for i, w in enumerate(tiny.labels)])
    with pytest.raises(scc.SccError, match="contain a line break"):
        export_triton_server(scc.defend(odd, "ttc"), tmp_path / "repo")
    with pytest.raises(scc.SccError, match="queue delay must be a number of milliseconds >= 0, got -1"):
        export_triton_server(defended, tmp_path / "repo", queue_delay_ms=-1)


def test_queue_delay_is_given_in_milliseconds_and_written_in_microseconds():
    fields = validate_config(sample_config(queue_delay_ms=0.25), use_tritonclient=False)
    assert fields["dynamic_batching"][0]["max_queue_delay_microseconds"] == [250]
    fields = validate_config(sample_config(queue_delay_ms=0), use_tritonclient=False)
    assert fields["dynamic_batching"][0]["max_queue_delay_microseconds"] == [0]


def test_old_names_still_work_and_warn_once(tiny, tmp_path, capsys):
    """`scc export triton`, `--queue-delay-us` and scc.export.export_triton: the names of the previous release."""
    from scc.cli import build_parser
    from scc.export import export_triton

    parse = build_parser().parse_args
    new = parse(["export", "triton-server", "--model", "m", "--defense", "ttc", "--out", "r",
                 "--queue-delay-ms", "0.25"])
    assert capsys.readouterr().err == ""
    old = parse(["export", "triton", "--model", "m", "--defense", "ttc", "--out", "r", "--queue-delay-us", "250"])
    assert capsys.readouterr().err.splitlines() == [
        "scc: warning: scc export triton is deprecated; use scc export triton-server",
        "scc: warning: --queue-delay-us is deprecated; use --queue-delay-ms"]
    assert old.queue_delay_ms == new.queue_delay_ms == 0.25 and old.func is new.func
    assert export_main(["triton", "--model", "scc-tiny-digits", "--defense", "ttc", "--max-batch", "0",
                        "--out", str(tmp_path / "repo")]) == 2  # the old command runs the same checks
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("scc: warning: scc export triton is deprecated") and "--max-batch" in err[1]
    with pytest.warns(DeprecationWarning, match="export_triton is deprecated; use export_triton_server"):
        with pytest.raises(scc.SccError, match="model name 'a/b' must be letters"):
            export_triton(scc.defend(tiny, "ttc"), tmp_path / "repo", name="a/b", queue_delay_us=250)


def test_cli_errors(tmp_path, capsys):
    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "ttc", "--device", "cpu",
                        "--tensorrt",
                        "--out", str(tmp_path / "repo")]) == 2
    assert "tensorrt needs GPU instances" in capsys.readouterr().err
    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "ttc", "--max-batch", "0",
                        "--out", str(tmp_path / "repo")]) == 2
    assert "--max-batch: must be a positive integer, got '0'" in capsys.readouterr().err
    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "ttc", "--queue-delay-ms", "-1",
                        "--out", str(tmp_path / "repo")]) == 2
    assert "--queue-delay-ms: must be a number >= 0, got '-1'" in capsys.readouterr().err


def test_cli_writes_a_repository_around_the_exported_file(tiny, digits, onnx_dynamic, tmp_path, capsys,
                                                           monkeypatch):
    """`scc export triton-server --draws-as-inputs` around the session's SCC-latency file (the export itself is the one
    ONNX export of the default suite, copied here): config inputs/outputs and dims read from the file, labels,
    metadata, and a model that runs at batch 1 and max_batch_size with the draws fed in."""
    import shutil

    import scc.export.triton_server as server_module

    defended, info = onnx_dynamic
    calls = []

    def copy_export(defended_arg, path, **kwargs):
        calls.append((defended_arg.spec, kwargs))
        shutil.copy(info["path"], path)
        return {**info, "path": str(path)}

    monkeypatch.setattr(server_module, "export_onnx", copy_export)
    repo = tmp_path / "repo"
    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "scc-latency", "--out", str(repo),
                        "--max-batch", "8", "--draws-as-inputs", "--quiet"]) == 0
    assert calls == [("scc-latency", {"batch_size": None, "draws_as_inputs": True, "opset": None, "optimize": True,
                                      "dtype": torch.float32, "progress": None})]
    model_dir = repo / "scc-tiny-digits-scc-latency"
    fields = validate_config((model_dir / "config.pbtxt").read_text(encoding="utf-8"))
    assert fields["name"] == ["scc-tiny-digits-scc-latency"] and fields["max_batch_size"] == [8]
    assert [(i["name"][0], i["dims"]) for i in fields["input"]] == [("pixels", [3, 32, 32]), ("start", [3, 32, 32]),
                                                                   ("noise", [4, 3, 32, 32])]
    assert fields["output"][0]["name"] == ["logits"] and fields["output"][0]["dims"] == [10]
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in fields["parameters"]}
    assert params["scc.defense"] == "scc" and params["scc.preset"] == "latency"
    assert params["scc.batch_size"] == "dynamic" and params["scc.draws_as_inputs"] == "true"
    assert (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == tiny.labels
    ort_defended = OrtDefended(model_dir / "1" / "model.onnx", threads=1)
    for batch in (1, 8):
        x = digits[0][:batch]
        draws = defended.draws(x, keys=range(batch))
        torch.testing.assert_close(ort_defended(x, draws), defended(x, draws), atol=1e-3, rtol=0)


@pytest.mark.slow
def test_cli_writes_a_servable_repository(tiny, digits, tmp_path, capsys):
    """The real thing: a repository whose config parses, whose model's batch dimension is dynamic and whose
    model runs at batch 1 and at max_batch_size, with per-row in-graph draws and TTC's accuracy."""
    repo = tmp_path / "repo"
    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "ttc", "--out", str(repo),
                        "--max-batch", "8", "--instances", "2"]) == 0
    printed = capsys.readouterr().out
    model_dir = repo / "scc-tiny-digits-ttc"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        "scc-tiny-digits-ttc/1/model.onnx", "scc-tiny-digits-ttc/config.pbtxt", "scc-tiny-digits-ttc/labels.txt"]
    assert "scc-tiny-digits-ttc/1/model.onnx" in printed and "tritonserver --model-repository=" in printed
    text = (model_dir / "config.pbtxt").read_text(encoding="utf-8")
    fields = validate_config(text)  # with tritonclient's protobuf too when it is installed
    assert fields["name"] == ["scc-tiny-digits-ttc"] and fields["max_batch_size"] == [8]
    assert fields["input"] == [{"name": ["pixels"], "data_type": ["TYPE_FP32"], "dims": [3, 32, 32]}]
    assert fields["output"] == [{"name": ["logits"], "data_type": ["TYPE_FP32"], "dims": [10],
                                 "label_filename": ["labels.txt"]}]
    assert fields["instance_group"] == [{"count": [2], "kind": ["KIND_AUTO"]}] and "optimization" not in fields
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in fields["parameters"]}
    assert params["scc.defense"] == "ttc" and params["scc.batch_size"] == "dynamic"
    assert (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines() == tiny.labels

    # model.onnx as Triton Inference Server's ONNX Runtime backend sees it: one input, first dimension dynamic
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (pixels,) = session.get_inputs()
    assert pixels.name == "pixels" and isinstance(pixels.shape[0], str) and pixels.shape[1:] == [3, 32, 32]
    x = digits[0][:100]
    for batch in (1, 8):
        (logits,) = session.run(["logits"], {"pixels": x[:batch].numpy()})
        assert logits.shape == (batch, 10) and np.isfinite(logits).all()
    same = np.repeat(x[:1].numpy(), 8, axis=0)  # one image 8 times: each row gets its own random start
    (logits,) = session.run(["logits"], {"pixels": same})
    assert not np.allclose(logits[0], logits[1])
    ort_defended = OrtDefended(model_dir / "1" / "model.onnx", threads=1)
    xa, ya = digits  # all 450 held-out digits: ORT's in-graph draws are not torch's, so compare accuracies
    eager = (scc.defend(tiny, "ttc")(xa).argmax(1) == ya).float().mean().item()
    onnx = (ort_defended(xa).argmax(1) == ya).float().mean().item()
    assert abs(onnx - eager) <= 0.04 and onnx >= 0.9, (onnx, eager)

    assert export_main(["triton-server", "--model", "scc-tiny-digits", "--defense", "ttc", "--out", str(repo)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
