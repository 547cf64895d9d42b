"""scc.images: one preprocessing per model, and every entry point (classify, eval's image folders, the service's
request parsing and replica, the ONNX metadata, the Triton config) giving the same input tensor for the same file."""
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import scc
from scc.cli import main
from scc.data import digits_arrays, fashion_subset, load_dataset
from scc.images import ImageError, Preprocess, decode, image_pixels
from scc.models import BUNDLED, FASHION_NAME, TINY_NAME, preprocessing_of


def png(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def sample_files(folder, seed: int = 0) -> list:
    """Real files of the shapes users send: grayscale, RGB, odd sizes, a JPEG, 16-bit, RGBA."""
    rng = np.random.default_rng(seed)
    images, _, _ = fashion_subset()
    files = {
        "fashion28.png": png(images[3]),
        "fashion28-rgb.png": png(np.repeat(images[7][..., None], 3, axis=2)),
        "odd45x30.png": png(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)),
        "odd17x61.jpg": png(rng.integers(0, 256, (61, 17, 3), dtype=np.uint8), "JPEG"),
        "gray16.png": png(rng.integers(0, 65536, (40, 40)).astype(np.uint16)),
        "rgba33.png": png(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8)),
    }
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return paths


# ----------------------------------------------------------------------------------------------------------
# The rule itself
# ----------------------------------------------------------------------------------------------------------
def test_bundled_rules_reproduce_their_datasets_exactly(tmp_path):
    fashion = load_dataset("fashion", preprocessing_of(FASHION_NAME), limit=20)
    images, _, _ = fashion_subset()
    pre = preprocessing_of(FASHION_NAME)
    for i in range(20):
        (tmp_path / f"{i}.png").write_bytes(png(images[i]))
        assert torch.equal(pre.file(tmp_path / f"{i}.png"), fashion.images[i]), i
        assert torch.equal(pre.encoded(png(images[i])), fashion.images[i]), i
    digits = load_dataset("digits", preprocessing_of(TINY_NAME))
    assert torch.equal(digits.images, digits_arrays(32)[2])  # the images the bundled digits model was tested on


def test_an_int_size_stands_for_the_datasets_own_rule():
    assert torch.equal(load_dataset("fashion", 32, limit=5).images,
                       load_dataset("fashion", preprocessing_of(FASHION_NAME), limit=5).images)
    assert load_dataset("digits", 48, limit=2).images.shape == (2, 3, 48, 48)  # another size: the CLIP rule


@pytest.mark.parametrize("hw", [(200, 300), (640, 480), (37, 37), (224, 224), (100, 400)])
def test_clip_rule_is_torchvisions_resize_256_center_crop_224(hw):
    tv = pytest.importorskip("torchvision.transforms.v2.functional")
    x = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    ours = Preprocess(224)(x)
    ref = tv.center_crop(tv.resize(x, [256], antialias=True), [224, 224]).clamp(0, 1)
    assert ours.shape == (3, 224, 224)
    assert (ours - ref).abs().max() < 1e-5, (hw, (ours - ref).abs().max())


@pytest.mark.parametrize("shape", [(1, 262144), (262144, 1), (3, 5000), (5000, 3)])
@pytest.mark.parametrize("size,crop", [(32, 1.0), (224, 224 / 256)])
def test_extreme_aspect_is_cut_before_the_resize(shape, size, crop, monkeypatch):
    """A thin image cannot make the resize allocate more than max_aspect (S / crop)^2 pixels per channel."""
    sizes = []
    real = F.interpolate

    def spy(x, *a, **k):
        out = real(x, *a, **k)
        sizes.append(out.shape[-2] * out.shape[-1])
        return out

    monkeypatch.setattr(F, "interpolate", spy)
    pre = Preprocess(size, crop=crop)
    x = pre.encoded(png(np.full(shape, 200, dtype=np.uint8)), max_pixels=300_000)
    assert x.shape == (3, size, size) and 0 <= x.min() and x.max() <= 1
    assert sizes and max(sizes) <= pre.max_aspect * round(size / crop) ** 2 + 4 * round(size / crop), sizes


def test_moderate_aspect_is_not_cut():
    x = torch.rand(1, 3, 30, 120, generator=torch.Generator().manual_seed(1))  # exactly 4:1
    assert torch.equal(Preprocess(32)(x), Preprocess(32, max_aspect=1e9)(x))
    y = torch.rand(1, 3, 30, 121)  # just over: the long side is cut to 120 first
    assert torch.equal(Preprocess(32)(y), Preprocess(32)(y[..., :, :120]))


def test_frame_and_record_round_trip():
    pre = Preprocess(32, crop=1.0, frame=2)
    x = pre(torch.ones(3, 50, 50))
    assert x[:, :2].sum() == 0 and x[:, :, -2:].sum() == 0 and x[:, 2:30, 2:30].min() > 0.9999
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    for bad in (dict(size=0), dict(size=32, crop=0), dict(size=32, crop=1.5), dict(size=32, frame=16),
                dict(size=32, max_aspect=0.5)):
        with pytest.raises(scc.SccError, match="Preprocess: "):
            Preprocess(**bad)


def test_unusable_images_are_one_named_line(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    cases = [(text, "notes.jpg: not a readable image"), (tmp_path, "is a directory"),
             (tmp_path / "missing.png", "no such file")]
    for source, words in cases:
        with pytest.raises(ImageError, match=words) as err:
            decode(source)
        assert "\n" not in str(err.value) and not err.value.too_large
    with pytest.raises(ImageError, match="upload: empty image"):
        decode(b"", name="upload")
    big = png(np.zeros((100, 100), dtype=np.uint8))
    with pytest.raises(ImageError, match="100x100 = 10000 pixels exceed the per-image limit of 9999") as err:
        decode(big, max_pixels=9999)
    assert err.value.too_large and image_pixels(big) == 10000
    with pytest.raises(ImageError, match="accepted formats: PNG"):
        decode(png(np.zeros((4, 4), dtype=np.uint8), "JPEG"), formats=("PNG",))


# ----------------------------------------------------------------------------------------------------------
# Every entry point, the same tensor and the same answer
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(BUNDLED))
def model_files(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    (folder / "all").mkdir()
    paths = sample_files(folder / "all")
    return request.param, scc.load(request.param), paths


def test_classify_answers_for_the_preprocessed_file(model_files, capsys):
    model, clf, paths = model_files
    assert main(["classify", *map(str, paths), "--model", model, "--defense", "none", "--json", "-", "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    with torch.no_grad():
        probs = clf(torch.stack([clf.preprocess.file(p) for p in paths])).softmax(-1)
    for row, p in zip(rows, probs):
        assert row["label"] == clf.labels[int(p.argmax())], row
        assert abs(row["score"] - float(p.max())) < 1e-4, row


def test_eval_image_folders_use_the_models_rule(model_files):
    model, clf, paths = model_files
    data = load_dataset(f"imagefolder:{paths[0].parent.parent}", preprocessing_of(model))
    assert torch.equal(data.images, torch.stack([clf.preprocess.file(p) for p in sorted(paths)]))


def test_service_parses_and_answers_like_classify(model_files):
    """The replica publishes its model's rule in /v1/info; the ingress parses with it; the replica answers."""
    from scc.serve.client import multipart
    from scc.serve.requests import parse_request
    from scc.serve.service import Service, service_config

    model, clf, paths = model_files
    service = Service(service_config(model=model, defense="none", backend="eager", max_batch=8), warm=False)
    ingress_rule = Preprocess.from_dict(json.loads(json.dumps(service.info_static["preprocess"])))
    assert ingress_rule == clf.preprocess
    ctype, body = multipart([("image", p.name, p.read_bytes()) for p in paths])
    items = parse_request(ctype, body, {}, ingress_rule)
    for it, p in zip(items, paths):
        assert it.error is None and torch.equal(it.x, clf.preprocess.file(p)), (p, it.error)
    answers = service.handle_batch(items, count=False)
    with torch.no_grad():
        want = clf(torch.stack([clf.preprocess.file(p) for p in paths])).argmax(-1)
    assert [a["index"] for a in answers] == want.tolist()


def test_exports_carry_the_rule(tiny, onnx_dynamic):
    from scc.export.runtime import OrtDefended
    from scc.export.triton_server import triton_server_config

    _, info = onnx_dynamic
    ort = OrtDefended(info["path"], seed=0)
    assert ort.preprocess == tiny.preprocess == preprocessing_of(TINY_NAME)
    text = triton_server_config("m", {"pixels": [3, 32, 32]}, {"logits": [10]}, parameters=dict(ort.metadata))
    assert "scc.preprocess" in text


def test_a_non_bundled_model_gets_the_clip_rule():
    clf = scc.load("ViT-B-32", pretrained=None, labels=["cat", "dog"])
    assert clf.preprocess == Preprocess(224) == preprocessing_of("ViT-B-32")
    assert scc.precision.engine_classifier(clf, torch.float32).preprocess == clf.preprocess


def test_an_export_without_its_rule_warns_for_a_bundled_model(onnx_dynamic, tmp_path):
    onnx = pytest.importorskip("onnx")
    from scc.export.runtime import OrtDefended

    _, info = onnx_dynamic
    model = onnx.load(info["path"])
    kept = [p for p in model.metadata_props if p.key != "scc.preprocess"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "older-export.onnx"
    onnx.save(model, str(old))
    with pytest.warns(RuntimeWarning, match="records no image preprocessing"):
        ort = OrtDefended(old, seed=0)
    assert ort.preprocess == Preprocess(32)  # the CLIP rule it falls back to, said out loud
