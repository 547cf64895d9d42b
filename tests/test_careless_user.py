"""The CLI and the API hold up against a careless user: no tracebacks, no lost results, no silent
nonsense. Every case runs `scc.cli.main([...])` in this process (one real subprocess at the end) and checks the
exit code, that no traceback escaped, and that the one `scc: error: ...` line names the bad value."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import scc
from scc.cli import main
from scc.models import TINY_NAME


def run(capsys, *args):
    """(exit code, stdout, stderr) of `scc ARGS`; an escaping exception fails the test (no traceback)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err):
    return [l for l in err.splitlines() if l.strip() and not l.startswith("WARNING")]


def refused(capsys, *args, names=()):
    """The command exits 2 with exactly one `scc: error:` line that contains every string in `names`."""
    code, out, err = run(capsys, *args)
    lines = error_lines(err)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    assert len(lines) == 1 and lines[0].startswith("scc: error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    d = tmp_path_factory.mktemp("careless")
    x, _ = digits
    arr = lambda i: (x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    (d / "digits").mkdir()
    for i in range(3):
        Image.fromarray(arr(i)).save(d / "digits" / f"{i}.png")
    (d / "empty").mkdir()
    Image.fromarray((np.random.default_rng(0).random((200, 260, 3)) * 255).astype(np.uint8)).save(d / "photo.jpg")
    Image.fromarray(arr(0)).resize((50, 50)).save(d / "big50.png")  # 2500 px: over a 2000 px limit (warning)
    Image.fromarray(arr(0)).resize((70, 70)).save(d / "big70.png")  # 4900 px: over twice the limit (error)
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    return d


# ----------------------------------------------------------------------------------------------------------
# Lost work and damaged installs
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["eval", "--images", "2"], ["bench", "--images", "2"], ["demo", "--images", "2"]])
def test_json_into_a_missing_folder_fails_before_the_run(command, capsys, tmp_path):
    refused(capsys, *command, "--json", "/nonexistent/dir/out.json", names=["/nonexistent/dir", "does not exist"])
    refused(capsys, *command, "--json", tmp_path, names=[str(tmp_path), "is a directory"])


def test_table_is_printed_before_the_file_is_written(capsys, tmp_path, monkeypatch):
    from pathlib import Path

    def fail(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail)
    code, out, err = run(capsys, "eval", "--images", "2", "--defenses", "none", "--attacks", "none", "--quiet",
                         "--json", tmp_path / "r.json")
    assert code == 2 and out.startswith("defense") and "none" in out  # the table came first
    assert error_lines(err) == [f"scc: error: could not write --json {tmp_path / 'r.json'}: No space left on device"]


def test_json_dash_and_bare_json_mean_stdout(capsys):
    for flag in (["--json", "-"], ["--json"]):
        code, out, err = run(capsys, "eval", "--images", "2", "--defenses", "none", "--attacks", "none",
                             "--quiet", *flag)
        assert code == 0, err
        assert json.loads(out)["n_images"] == 2  # stdout is the JSON alone


def test_json_refuses_to_overwrite_an_input_image(capsys, files):
    img = files / "digits" / "1.png"
    before = img.read_bytes()
    refused(capsys, "classify", files / "digits" / "0.png", "--json", img, names=[str(img), "overwrite"])
    assert img.read_bytes() == before


def test_train_tiny_never_touches_the_bundled_model_by_default(capsys, tmp_path, monkeypatch, digits):
    from safetensors.torch import load_file

    from scc.models import asset_path

    bundled = asset_path(f"{TINY_NAME}.safetensors")
    before = bundled.read_bytes()
    monkeypatch.chdir(tmp_path)
    refused(capsys, "train-tiny", "--out", tmp_path / "x", "--replace-bundled", names=["--replace-bundled"])
    refused(capsys, "train-tiny", "--epochs", "0", names=["--epochs", "'0'"])
    code, out, err = run(capsys, "train-tiny", "--epochs", "1", "--quiet")
    torch.set_num_threads(1)
    assert code == 0, err
    assert bundled.read_bytes() == before
    written = tmp_path / "scc-tiny-out"
    weights = written / f"{TINY_NAME}.safetensors"
    # the newly trained model: every tensor of the bundled architecture, finite, not the bundled values
    trained, shipped = load_file(weights), load_file(bundled)
    assert trained.keys() == shipped.keys()
    assert all(trained[k].shape == shipped[k].shape and torch.isfinite(trained[k]).all() for k in shipped)
    assert any(not torch.equal(trained[k], shipped[k]) for k in shipped), "the bundled weights were written"
    meta = json.loads((written / f"{TINY_NAME}.meta.json").read_text())
    assert meta["threads"] == 1 and meta["recipe"]["epochs"] == 1 and meta["recipe"]["seed"] == 0
    assert meta["labels"] == scc.models.bundled_meta(TINY_NAME)["labels"]
    # it loads as a checkpoint (--pretrained), and scores on the held-out digits what its meta says
    clf = scc.load(TINY_NAME, pretrained=str(weights))
    with torch.no_grad():
        accuracy = (clf(digits[0]).argmax(1) == digits[1]).float().mean().item()
    assert round(accuracy, 4) == meta["held_out_clean_accuracy"], (accuracy, meta["held_out_clean_accuracy"])


def test_train_tiny_has_its_own_help(capsys):
    code, out, _ = run(capsys, "train-tiny", "--help")
    assert code == 0 and out.startswith("usage: scc train-tiny") and "--replace-bundled" in out


# ----------------------------------------------------------------------------------------------------------
# Tracebacks where the README promises none
# ----------------------------------------------------------------------------------------------------------
def test_garbage_safetensors(capsys, files):
    ckpt = files / "garbage.safetensors"
    refused(capsys, "classify", files / "digits" / "0.png", "--pretrained", ckpt,
            names=[str(ckpt), "not a valid .safetensors"])


def test_checkpoint_of_another_architecture_says_what_it_looks_like(capsys, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in scc.models.create_bundled_model("scc-tiny-digits").state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(48, 3, 4, 4)
    state["visual.positional_embedding"] = torch.zeros(65, 48)
    save_file(state, str(tmp_path / "other.safetensors"))
    line = refused(capsys, "classify", "x.png", "--pretrained", tmp_path / "other.safetensors",
                   names=["other.safetensors", "does not fit", "visual.conv1.weight", "width 48", "patch 4"])
    assert "size mismatch" not in line


def test_checkpoint_description_names_the_open_clip_model():
    meta = lambda *s: torch.empty(*s, device="meta")
    state = {"visual.conv1.weight": meta(768, 3, 32, 32), "visual.positional_embedding": meta(50, 768),
             "visual.proj": meta(768, 512), "ln_final.weight": meta(512), "positional_embedding": meta(77, 512),
             "token_embedding.weight": meta(49408, 512),
             **{f"visual.transformer.resblocks.{i}.ln_1.weight": meta(768) for i in range(12)}}
    text = scc.models.describe_checkpoint(state)
    assert "width 768, 12 layers, patch 32, image 224" in text and "ViT-B-32" in text


def test_image_over_the_pixel_limit_is_skipped_and_named(capsys, files, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    good = files / "digits" / "0.png"
    code, out, err = run(capsys, "classify", good, files / "big50.png", files / "big70.png")
    assert code == 1 and "Traceback" not in err
    assert out.startswith(f"{good}: ")  # the good file is still answered
    lines = error_lines(err)
    assert len(lines) == 2 and all("limit of 2000 pixels" in l for l in lines)
    assert "big50.png" in lines[0] and "big70.png" in lines[1]


@pytest.mark.parametrize("device", ["cuda", "mps", "tpu"])
def test_missing_device(device, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(capsys, "classify", "x.png", "--device", device, names=[f"--device {device}"])
    with pytest.raises(scc.SccError, match=device):
        scc.load(device=device)


@pytest.mark.parametrize("command", [["classify", "x.png"], ["eval"], ["bench"], ["demo"]])
@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_must_be_positive(command, value, capsys):
    refused(capsys, *command, "--batch-size", value, names=["--batch-size", f"'{value}'"])


def test_templates_need_exactly_one_placeholder(capsys):
    refused(capsys, "classify", "x.png", "--templates", "a {} of {}", names=["'a {} of {}'", "exactly one"])
    refused(capsys, "eval", "--templates", "a photo|a {}.", names=["'a photo'"])
    with pytest.raises(scc.SccError, match="exactly one"):
        scc.load(templates=["{} and {}"])


# ----------------------------------------------------------------------------------------------------------
# Silent nonsense
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["eval"], ["demo"], ["bench"]])
@pytest.mark.parametrize("value", ["-3", "0"])
def test_images_must_be_positive(command, value, capsys):
    refused(capsys, *command, "--images", value, names=["--images", f"'{value}'"])


def test_steps_zero(capsys):
    refused(capsys, "eval", "--steps", "0", names=["--steps", "'0'"])


@pytest.mark.parametrize("eps", ["1", "1.0", "4", "2.5"])
def test_ambiguous_eps_is_refused_with_a_hint(eps, capsys):
    refused(capsys, "eval", "--eps", eps, names=[f"'{eps}'", "/255"])


def test_eps_unit_rule():
    from scc.eval.options import parse_eps

    assert parse_eps("4/255") == pytest.approx(4 / 255)
    assert parse_eps("0.0157") == pytest.approx(0.0157)
    assert parse_eps("0") == 0.0
    for bad in ("4", "1.0", "abc", "1/0", "-0.01", "nan"):
        with pytest.raises(scc.SccError):
            parse_eps(bad)


def test_negative_eps(capsys):
    refused(capsys, "eval", "--eps=-4/255", names=["-4/255", ">= 0"])
    refused(capsys, "eval", "--eps", "-4/255", names=["--eps", "--eps=-4/255"])  # argparse: needs '='


def test_seed_seeds_random_weights_and_labels_file_keeps_commas(capsys, files, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat, the big one\n\n# a comment\ndog\n")
    args = ["classify", files / "digits" / "0.png", "--model", "ViT-B-32", "--pretrained", "none",
            "--labels-file", labels, "--defense", "none", "--json", "-", "--seed", "3"]
    first, second = (json.loads(run(capsys, *args)[1]) for _ in range(2))
    assert first["labels"] == ["cat, the big one", "dog"]
    assert first["results"] == second["results"]
    a, b = (scc.models.create_open_clip("RN50", None, seed)[0].visual.conv1.weight for seed in (0, 1))
    assert not torch.equal(a, b)


def test_loaded_checkpoint_prints_no_random_init_warning(tmp_path, caplog):
    import open_clip
    from safetensors.torch import save_file

    from scc.models import asset_path

    config = tmp_path / "tiny-clone.json"
    config.write_text(asset_path(f"{TINY_NAME}.json").read_text())
    open_clip.add_model_config(config)
    state = {k: v.contiguous() for k, v in scc.models.create_bundled_model("scc-tiny-digits").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with caplog.at_level("WARNING"):
        scc.models.create_open_clip("tiny-clone", str(tmp_path / "w.safetensors"))
        scc.load(TINY_NAME, pretrained=str(tmp_path / "w.safetensors"))
    assert "initialized randomly" not in caplog.text


# ----------------------------------------------------------------------------------------------------------
# Speed surprises
# ----------------------------------------------------------------------------------------------------------
def test_threads_are_set_and_recorded(capsys, files):
    try:
        code, out, err = run(capsys, "classify", files / "digits" / "0.png", "--threads", "2", "--json", "-")
        assert code == 0, err
        assert json.loads(out)["threads"] == 2
        code, out, err = run(capsys, "eval", "--images", "2", "--defenses", "none", "--attacks", "none",
                             "--threads", "2", "--json", "-")
        assert code == 0 and json.loads(out)["hardware"]["torch_threads"] == 2
    finally:
        torch.set_num_threads(1)
    refused(capsys, "bench", "--threads", "0", names=["--threads", "'0'"])


def test_bench_prints_the_busy_warning(capsys, monkeypatch):
    import scc.provenance

    monkeypatch.setattr(scc.provenance, "busy_warning", lambda: "warning: load average 9.0 on 2 cores")
    code, out, err = run(capsys, "bench", "--images", "2", "--defenses", "none", "--quiet")
    assert code == 0 and "warning: load average 9.0" in err and "none" in out


def test_classify_batches_with_progress(capsys, files):
    paths = [files / "digits" / f"{i}.png" for i in range(3)]
    code, out, err = run(capsys, "classify", *paths, "--batch-size", "2", "--defense", "none")
    assert code == 0 and len(out.splitlines()) == 3
    assert "classify" in err and "3/3" in err  # tqdm, on stderr
    code, out, err = run(capsys, "classify", *paths, "--batch-size", "2", "--defense", "none", "--quiet")
    assert code == 0 and err == ""


# ----------------------------------------------------------------------------------------------------------
# Consistency
# ----------------------------------------------------------------------------------------------------------
def test_export_speaks_the_same_defense_and_template_language(capsys, tmp_path, monkeypatch):
    import scc.export

    seen = {}

    def fake_export(defended, path, **kw):
        seen.update(spec=defended.spec, templates=defended.classifier.templates)
        return {"path": str(path), "bytes": 1, "nodes": 1, "opset": 18, "batch_size": 1, "inputs": ["pixels"],
                "seconds": 0.0, "dtype": "fp32"}

    monkeypatch.setattr(scc.export, "export_onnx", fake_export)
    out = tmp_path / "x.onnx"
    code, _, err = run(capsys, "export", "onnx", "--model", TINY_NAME, "--defense", "scc-latency",
                       "--templates", "a photo of the digit {}.|the digit {}.", "--out", out)
    assert code == 0, err
    assert seen == {"spec": "scc-latency", "templates": ["a photo of the digit {}.", "the digit {}."]}
    code, _, err = run(capsys, "export", "onnx", "--model", TINY_NAME, "--defense", "scc", "--preset", "latency",
                       "--templates", "a photo of the digit {}.", "the digit {}.", "--out", out)  # older form
    assert code == 0 and seen["spec"] == "scc-latency"
    refused(capsys, "export", "onnx", "--model", TINY_NAME, "--defense", "scc-latency", "--preset", "paper",
            "--out", out, names=["disagree"])
    refused(capsys, "export", "onnx", "--model", TINY_NAME, "--defense", "magic", "--out", out,
            names=["'magic'", "scc-latency"])
    refused(capsys, "export", "onnx", "--model", TINY_NAME, "--defense", "ttc", "--out", tmp_path,
            names=[str(tmp_path), "directory"])


@pytest.mark.parametrize("command", [["classify", "x.png"], ["eval", "--defenses", "none,magic"],
                                     ["bench", "--defenses", "magic"]])
def test_unknown_defense_lists_every_name(command, capsys):
    if command[0] == "classify":
        command = command + ["--defense", "magic"]
    refused(capsys, *command, names=["'magic'", "scc-latency", "rtpt"])


COMPUTES = {"demo", "classify", "eval", "bench", "onnx", "triton-server", "serve", "train-tiny"}  # these take --threads


@pytest.mark.parametrize("command", [[], ["demo"], ["classify"], ["eval"], ["bench"], ["export"], ["export", "onnx"],
                                     ["export", "triton-server"], ["serve"], ["loadtest"], ["train-tiny"]])
def test_version_and_quiet_everywhere(command, capsys):
    code, out, _ = run(capsys, *command, "--version")
    assert code == 0 and out.strip() == f"scc {scc.__version__}"
    if command and command != ["export"]:
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "--quiet" in out
        assert ("--threads" in out) == (command[-1] in COMPUTES), command


def test_help_shows_every_default():
    import argparse

    from scc.cli import build_parser
    from scc.cli.args import Formatter

    def subparsers(parser):  # every command, nested ones (export onnx|triton-server) included
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield child
                    yield from subparsers(child)

    parsers = list(subparsers(build_parser()))
    assert {p.prog for p in parsers} >= {"scc demo", "scc classify", "scc eval", "scc bench", "scc export onnx",
                                         "scc export triton-server", "scc serve", "scc loadtest", "scc train-tiny"}
    fmt = Formatter("scc")
    for parser in parsers:
        for action in parser._actions:
            if action.nargs == 0 or action.required or action.default is argparse.SUPPRESS:
                continue  # flags, required values, --help/--version
            assert "default" in fmt._get_help_string(action).lower(), (parser.prog, action.option_strings)


def test_classify_expands_a_folder_and_names_an_empty_one(capsys, files):
    code, out, err = run(capsys, "classify", files / "digits", files / "empty", "--defense", "none")
    assert code == 1 and [l.split(":")[0] for l in out.splitlines()] == [str(files / "digits" / f"{i}.png")
                                                                         for i in range(3)]
    lines = error_lines(err)
    assert len(lines) == 1 and str(files / "empty") in lines[0] and "no image files" in lines[0]
    assert "ERROR" not in out  # errors print once, on stderr


def test_imagefolder_needs_class_subfolders(capsys, files):
    refused(capsys, "eval", "--dataset", f"imagefolder:{files / 'digits'}", "--images", "2",
            names=[str(files / "digits"), "sub-folder per class"])


def test_labels_equal_after_lowercasing_and_labels_too_long(capsys):
    refused(capsys, "classify", "x.png", "--labels", "one,One", names=["'One'", "duplicate"])
    long = "very " * 80 + "cat"
    refused(capsys, "classify", "x.png", "--model", "ViT-B-32", "--pretrained", "none", "--labels", f"{long},dog",
            names=["too long", "context of 77"])


def test_bundled_model_note_on_a_photo(capsys, files):
    code, out, err = run(capsys, "classify", files / "photo.jpg", "--defense", "none")
    assert code == 0 and out.startswith(str(files / "photo.jpg"))
    notes = [l for l in err.splitlines() if l.startswith("scc: note:")]
    assert len(notes) == 1 and TINY_NAME in notes[0] and "--model" in notes[0]
    code, out, err = run(capsys, "classify", files / "digits" / "0.png", "--defense", "none")
    assert "note" not in err


# ----------------------------------------------------------------------------------------------------------
# Python API parity
# ----------------------------------------------------------------------------------------------------------
def test_undefended_classifier_validates_like_the_defended_module(tiny):
    x = torch.rand(2, 3, 32, 32)
    for bad, match in ((x.double(), "expected dtype float32, got float64"),
                       ((x * 255).to(torch.uint8), r"got dtype uint8; scale uint8 images: x.float\(\) / 255"),
                       (x * 255, r"must lie in \[0,1\]"),
                       (torch.full_like(x, float("nan")), "contain NaN or Inf")):
        with pytest.raises(scc.SccError, match=match):
            tiny(bad)
        with pytest.raises(scc.SccError, match=match):
            scc.defend(tiny, "none")(bad)
    tiny.validate = False  # switchable, like Defended.validate: no host sync
    try:
        assert tiny(x * 255).shape == (2, 10)
    finally:
        tiny.validate = True


def test_api_messages_speak_api():
    with pytest.raises(scc.SccError, match=r"labels=\['cat', 'dog'\]") as info:
        scc.load(labels=[])
    assert "--labels" not in str(info.value)
    with pytest.raises(scc.SccError, match="list of class names"):
        scc.load(labels="one,two")


# ----------------------------------------------------------------------------------------------------------
# Install
# ----------------------------------------------------------------------------------------------------------
def test_missing_extra_hint_covers_wheel_and_checkout(tiny, monkeypatch):
    from scc.backends import make_runner

    monkeypatch.setitem(sys.modules, "scc.export", None)
    with pytest.raises(scc.SccError) as info:
        make_runner(scc.defend(tiny, "ttc"), "onnx", 1)
    assert "pip install 'scc-defense[onnx]'" in str(info.value) and "pip install -e '.[onnx]'" in str(info.value)


def test_a_real_process_loses_nothing_and_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "scc.cli", "eval", "--images", "-3", "--json",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["scc: error: argument --images: must be a positive integer, got '-3' "
                                                "(see `scc eval --help`)"]


def test_one_unusable_file_alone_is_exit_2(capsys, tmp_path):
    """A text file named .jpg is the README's "bad input": one line, exit 2 (exit 1 is kept for a batch in which
    some files were answered)."""
    text = tmp_path / "photo.jpg"
    text.write_text("not an image\n")
    refused(capsys, "classify", text, names=[str(text), "not a readable image"])
