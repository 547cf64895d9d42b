"""The `scc` CLI end to end, and every bad-input case: one clear line, the rest of the batch still answered."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from scc.cli import main


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits):
    """Real held-out digits as files in many formats, plus broken files."""
    d = tmp_path_factory.mktemp("imgs")
    x, y = digits
    arr = lambda i: (x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr(0)).save(d / "rgb.png")
    Image.fromarray(arr(1)[..., 0]).save(d / "gray.png")  # mode L
    Image.fromarray(arr(2)).convert("RGBA").save(d / "rgba.png")
    Image.fromarray((arr(3)[..., 0].astype(np.uint16) * 257)).save(d / "gray16.png")  # mode I;16
    Image.fromarray(arr(4)).resize((45, 23)).save(d / "odd.jpg")  # odd size, JPEG
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    good = (d / "rgb.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    return d, [int(v) for v in y[:5]]


def test_classify_all_formats(image_dir, capsys):
    d, labels = image_dir
    files = [str(d / n) for n in ("rgb.png", "gray.png", "rgba.png", "gray16.png", "odd.jpg")]
    assert main(["classify", *files, "--defense", "scc-latency", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in out["results"]] == files
    assert (out["defense"], out["spec"]) == ("scc", "scc-latency")  # the bare name and the full spec
    words = "zero one two three four five six seven eight nine".split()
    hits = sum(r["label"] == words[t] for r, t in zip(out["results"][:4], labels[:4]))
    assert hits >= 3, out  # real digits: the first four keep their content whatever the file mode


def test_classify_bad_files_keep_the_rest(image_dir, capsys):
    d, _ = image_dir
    names = ["rgb.png", "corrupt.png", "gray.png", "truncated.png", "empty.jpg", "notes.txt", "missing.png"]
    code = main(["classify", *[str(d / n) for n in names], "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 1
    by_name = {r["path"].split("/")[-1]: r for r in out["results"]}
    assert "label" in by_name["rgb.png"] and "label" in by_name["gray.png"]
    for bad in names[1:2] + names[3:]:
        assert "error" in by_name[bad] and bad in by_name[bad]["error"], by_name[bad]
    assert captured.err.count("scc: error:") == 5


def test_scikit_image_photos(capsys):
    """Real photos shipped with scikit-image (RGB 512x512 and grayscale) go through any open_clip model."""
    data = pytest.importorskip("skimage.data")
    import scc
    import torch

    from scc.images import pil_to_tensor

    clf = scc.load("ViT-B-32", pretrained=None, labels=["astronaut", "camera", "coffee"])
    imgs = [clf.preprocess(pil_to_tensor(Image.fromarray(a))) for a in (data.astronaut(), data.camera(), data.coffee())]
    x = torch.stack(imgs)
    assert x.shape == (3, 3, 224, 224) and 0 <= x.min() and x.max() <= 1
    with torch.no_grad():
        assert scc.defend(clf, "ttc")(x).shape == (3, 3)


def run_cli(capsys, *args):
    """`scc ARGS` in this process (an escaping exception fails the test): (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["classify", "x.png", "--model", "ViT-B-33", "--labels", "a,b"], "unknown model 'ViT-B-33'"),
    (["classify", "x.png", "--labels", ""], "empty name"),
    (["classify", "x.png", "--labels", "one,one"], "duplicate labels"),
    (["classify", "x.png", "--model", "ViT-B-32"], "--labels is required"),
    (["classify", "x.png", "--defense", "magic"], "unknown defense 'magic'"),
    (["eval", "--dataset", "cifar10:/nonexistent", "--images", "2"], "not found under '/nonexistent'"),
    (["eval", "--eps", "abc"], "bad eps 'abc'"),
])
def test_user_errors_are_one_line(args, message, capsys):
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip() and "WARNING" not in l]
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("scc: error: "), err


def test_a_real_process_prints_no_traceback():
    """One subprocess keeps the installed entry point honest: a user error is one line and exit 2."""
    proc = subprocess.run([sys.executable, "-m", "scc.cli", "classify", "x.png", "--defense", "magic"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown defense 'magic'" in proc.stderr


def test_demo_json(capsys):
    code, out, err = run_cli(capsys, "demo", "--images", "30", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "scc-tiny-digits" and report["n_images"] == 30
    got = {(r["defense"], r["attack"], round(r["eps"] * 255)) for r in report["results"]}
    assert got == {(d, a, e) for d in ("none", "ttc", "scc") for a, e in (("none", 0), ("pgd", 1), ("pgd", 4))}
    assert set(report["results"][0]) == {"defense", "preset", "backend", "dtype", "attack", "eps", "accuracy",
                                         "s_per_image", "protocol", "draws", "steps", "stderr"}
    assert {(r["protocol"], r["draws"]) for r in report["results"]} == {("paper", None)}
    clean = {r["defense"]: r["accuracy"] for r in report["results"] if r["attack"] == "none"}
    assert clean["none"] >= 0.9 and clean["scc"] >= 0.9, clean  # the bundled model on held-out digits
    # the headline: SCC lifts PGD-10 4/255 robust accuracy far above the undefended model's, and above TTC's
    robust = {r["defense"]: r["accuracy"] for r in report["results"]
              if r["attack"] == "pgd" and round(r["eps"] * 255) == 4}
    assert robust["scc"] - robust["none"] >= 0.4, robust
    assert robust["scc"] >= robust["ttc"], robust


def test_eval_imagefolder(image_dir, tmp_path, digits):
    x, y = digits
    root = tmp_path / "folder"
    words = "zero one two three four five six seven eight nine".split()
    for i in range(20):
        (root / words[int(y[i])]).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(root / words[int(y[i])] / f"{i}.png")
    (root / "one" / "broken.png").write_bytes(b"junk")
    out = tmp_path / "r.json"
    code = main(["eval", "--dataset", f"imagefolder:{root}", "--defenses", "none,ttc", "--attacks", "cw",
                 "--eps", "1/255", "--json", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 20
    clean = [r for r in report["results"] if r["attack"] == "none" and r["defense"] == "none"][0]
    assert clean["accuracy"] > 0.5  # class names come from the folders, real digits inside


def test_eval_help_names_every_attack_of_each_protocol():
    """The parser's help strings are written out (it is built without importing torch): they must name what
    scc.eval.options accepts, no more and no less."""
    from scc.cli.evaluate import ADAPTIVE_HELP
    from scc.eval.options import ADAPTIVE_ATTACKS

    assert [a.strip() for a in ADAPTIVE_HELP.split(",")] == list(ADAPTIVE_ATTACKS)
