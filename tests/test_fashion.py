"""The second bundled model `scc-tiny-fashion` and the Fashion-MNIST datasets."""
import gzip
import json

import numpy as np
import pytest
import torch

import scc
import scc.data as scc_data
from scc.cli import main
from scc.data import FASHION_CLASSES, fashion_arrays, fashion_subset, fashion_subset_indices, load_dataset
from scc.defenses import make_config
from scc.errors import SccError
from scc.metrics import top1_agreement
from scc.models import FASHION_NAME, TINY_NAME, bundled_dataset, bundled_meta, is_bundled

debian = pytest.mark.skipif(not (scc_data.FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                            reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def fashion_clf():
    return scc.load(FASHION_NAME)


@pytest.fixture(scope="module")
def fashion():
    """The 1000 shipped held-out test images: (1000, 3, 32, 32) in [0,1] and targets."""
    return load_dataset("fashion", 32)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def test_shipped_subset_loads(fashion):
    x, y = fashion.images, fashion.targets
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.99
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grayscale in 3 channels
    assert x[:, :, :2].abs().sum() == 0 and x[:, :, :, -2:].abs().sum() == 0  # 28x28 zero-padded to 32x32
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10  # stratified: 100 per class
    assert len(set(y[:50].tolist())) >= 8  # ordered by test index, not by class: `--images N` sees every class
    assert fashion.classes == list(FASHION_CLASSES) and fashion.name == "fashion"
    _, labels, index = fashion_subset()
    assert np.all(np.diff(index) > 0) and 0 <= index.min() and index.max() < 10000
    assert torch.equal(load_dataset("fashion", 48, limit=7).targets, y[:7])
    assert load_dataset("fashion", 48, limit=7).images.shape == (7, 3, 48, 48)


@debian
def test_shipped_subset_is_the_stratified_official_test_sample():
    x, y = fashion_arrays("test")
    images, labels, index = fashion_subset()
    assert np.array_equal(index, fashion_subset_indices(y))
    assert np.array_equal(images, x[index]) and np.array_equal(labels, y[index])


def test_bundled_training_subset_needs_no_package(monkeypatch, tmp_path):
    """The fine-tuning subset ships with scc (small, stratified, sorted indices into the 60000 training images,
    none of the 5000 validation ones): `--data fashion --images 2560 --seed 0` trains from it with the Debian folder
    missing; any other subset of the training split names the apt command and the bundled subset."""
    from scc.models import asset_path, preprocessing_of
    from scc.train.finetune import training_data

    assert asset_path(scc_data.FASHION_TRAIN_SUBSET).stat().st_size < 1.5e6
    images, labels, index = scc_data.fashion_train_subset()
    assert images.shape == (2560, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [256] * 10
    assert np.all(np.diff(index) > 0) and 0 <= index.min() and index.max() < 60000
    monkeypatch.setattr(scc_data, "FASHION_DIR", tmp_path / "absent")
    pre = preprocessing_of(FASHION_NAME)
    data = training_data("fashion", pre, images=2560, seed=0)
    assert len(data) == 2560 and torch.equal(data.targets, torch.from_numpy(labels))
    torch.testing.assert_close(data.batch(torch.arange(3)), scc_data.fashion_pixels(images[:3]), atol=0, rtol=0)
    assert data.description.endswith("a stratified subset of 2560 (train_test_split random_state=0)")
    for images_, seed in ((None, 0), (1000, 0), (2560, 1)):
        with pytest.raises(SccError, match="apt-get install dataset-fashion-mnist.*--images 2560 --seed 0"):
            training_data("fashion", pre, images=images_, seed=seed)


@debian
def test_bundled_training_subset_is_rebuilt_bit_for_bit(monkeypatch, tmp_path):
    """write_fashion_train_subset rebuilds the shipped file from the Debian files (arrays and bytes), and it holds
    exactly what the Debian route of `scc finetune --data fashion --images 2560 --seed 0` selects, in its order."""
    from scc.models import asset_path, preprocessing_of
    from scc.train.finetune import training_data

    rebuilt = scc_data.write_fashion_train_subset(tmp_path / "subset.npz")
    assert rebuilt.read_bytes() == asset_path(scc_data.FASHION_TRAIN_SUBSET).read_bytes()
    x, y = fashion_arrays("train")
    images, labels, index = scc_data.fashion_train_subset()
    assert np.array_equal(images, x[index]) and np.array_equal(labels, y[index])
    pre = preprocessing_of(FASHION_NAME)
    bundled = training_data("fashion", pre, images=2560, seed=0)
    monkeypatch.setattr(scc_data, "FASHION_TRAIN_SUBSET", "absent.npz")  # forces the Debian route
    debian_route = training_data("fashion", pre, images=2560, seed=0)
    every = torch.arange(2560)
    assert torch.equal(bundled.batch(every), debian_route.batch(every))
    assert torch.equal(bundled.targets, debian_route.targets) and bundled.description == debian_route.description


def test_full_test_split_missing_is_one_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(scc_data, "FASHION_DIR", tmp_path)
    with pytest.raises(SccError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-full", 32)
    assert main(["eval", "--model", FASHION_NAME, "--dataset", "fashion-full", "--quiet"]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("scc: error:") and "dataset-fashion-mnist" in err[0]


def test_corrupt_idx_file_is_an_scc_error(monkeypatch, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # claims 5 x ? x ? images, holds none
    monkeypatch.setattr(scc_data, "FASHION_DIR", tmp_path)
    with pytest.raises(SccError, match="idx"):
        load_dataset("fashion-full", 32)


@debian
def test_full_test_split_loads():
    x, y = fashion_arrays("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and np.bincount(y).tolist() == [1000] * 10
    ds = load_dataset("fashion-full", 32, limit=64)
    assert ds.images.shape == (64, 3, 32, 32) and ds.name == "fashion-full"
    assert torch.equal(ds.targets, torch.from_numpy(y[:64].astype(np.int64)))


def test_bundled_registry():
    assert is_bundled(TINY_NAME) and is_bundled(FASHION_NAME) and not is_bundled("ViT-B-32")
    assert bundled_dataset(TINY_NAME) == "digits" and bundled_dataset(FASHION_NAME) == "fashion"
    with pytest.raises(SccError, match="not a bundled model"):
        bundled_dataset("ViT-B-32")
    meta = bundled_meta(FASHION_NAME)
    assert meta["labels"] == list(FASHION_CLASSES) and meta["eval_templates"] == ["a photo of a {}."]
    assert meta["eval_templates"][0] not in meta["train_templates"]  # the evaluation prompt is held out
    assert scc.models.image_size_of(FASHION_NAME) == 32


def test_load_contract(fashion_clf, fashion):
    clf = fashion_clf
    assert clf.image_size == 32 and clf.num_classes == 10 and clf.labels == list(FASHION_CLASSES)
    assert clf.name == FASHION_NAME and clf.templates == ["a photo of a {}."]
    logits = clf(fashion.images[:5])
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    assert torch.allclose(clf.text.norm(dim=-1), torch.ones(10))
    assert not any(p.requires_grad for p in clf.parameters())
    with pytest.raises(SccError, match=f"bundled model '{FASHION_NAME}' does not know"):
        scc.load(FASHION_NAME, labels=["cat", "dog"])


def test_held_out_accuracy_matches_meta(fashion_clf, fashion):
    with torch.no_grad():
        acc = (fashion_clf(fashion.images).argmax(1) == fashion.targets).float().mean().item()
    assert abs(acc - bundled_meta(FASHION_NAME)["held_out_clean_accuracy"]) < 0.01, acc
    assert acc > 0.8


def test_flip_invariance_motivates_the_papers_views(fashion_clf, fashion):
    """A horizontal flip keeps a garment's label: accuracy on flipped images stays close (unlike digits)."""
    x, y = fashion.images, fashion.targets
    with torch.no_grad():
        pred, pred_flip = fashion_clf(x).argmax(1), fashion_clf(x.flip(-1)).argmax(1)
    acc, acc_flip = (pred == y).float().mean().item(), (pred_flip == y).float().mean().item()
    assert abs(acc - acc_flip) < 0.02, (acc, acc_flip)
    assert (pred == pred_flip).float().mean().item() > 0.9


def test_defaults_keep_the_papers_views_and_rtpt_flips():
    cfg = make_config("scc", "paper", FASHION_NAME)
    assert cfg.views == ("id", "flip", "noise", "flip+noise") and cfg.sigma == 0.01
    assert make_config("rtpt", "paper", FASHION_NAME).flip is True
    assert make_config("scc", "paper", TINY_NAME).views != cfg.views  # the digits preset is untouched


def test_demo_fashion_json(capsys):
    assert main(["demo", "--model", FASHION_NAME, "--images", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["model"], report["dataset"], report["n_images"]) == (FASHION_NAME, "fashion", 20)
    got = {(r["defense"], r["attack"], round(r["eps"] * 255)) for r in report["results"]}
    assert got == {(d, a, e) for d in ("none", "ttc", "scc") for a, e in (("none", 0), ("pgd", 1), ("pgd", 4))}
    clean = {r["defense"]: r["accuracy"] for r in report["results"] if r["attack"] == "none"}
    assert clean["none"] >= 0.6


def test_demo_header_and_defenses_option(capsys):
    assert main(["demo", "--model", FASHION_NAME, "--images", "4", "--defenses", "none,scc-latency"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{FASHION_NAME} on 4 held-out Fashion-MNIST test images")
    assert [l.split()[0] for l in out[3:]] == ["none", "scc-latency"]
    assert main(["demo", "--model", "ViT-B-32"]) == 2  # not a bundled model: one error line
    assert "invalid choice: 'ViT-B-32'" in capsys.readouterr().err


def test_eval_on_the_bundled_subset(tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", FASHION_NAME, "--dataset", "fashion", "--images", "10", "--defenses", "none",
                 "--attacks", "none", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dataset"] == "fashion" and report["n_images"] == 10


def test_classify_raw_fashion_mnist_files(fashion_clf, fashion, tmp_path, capsys):
    """A 28x28 Fashion-MNIST file is fitted into the training layout (zero frame), not zoomed by the TTC crop."""
    from PIL import Image

    images, _, _ = fashion_subset()
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(images[i]).save(paths[-1])
    assert torch.equal(fashion_clf.preprocess.file(paths[0]), fashion.images[0])
    assert main(["classify", *paths, "--model", FASHION_NAME, "--defense", "none", "--json"]) == 0
    got = [r["label"] for r in json.loads(capsys.readouterr().out)["results"]]
    with torch.no_grad():
        want = [FASHION_CLASSES[i] for i in fashion_clf(fashion.images[:6]).argmax(1)]
    assert got == want


# ----------------------------------------------------------------------------------------------------------
# Everywhere the digits model works: bench, export, serve, the adaptive evaluation
# ----------------------------------------------------------------------------------------------------------
def test_bench_defaults_to_its_own_images(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", FASHION_NAME, "--images", "2", "--defenses", "none,ttc", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == FASHION_NAME and "Fashion-MNIST" in report["pixels"]
    # with TTC among the defenses the official TTC procedure is timed beside it (scc.bench.official)
    assert [r["spec"] for r in report["rows"]] == ["none", "ttc-official", "ttc"]


@pytest.mark.slow  # the default suite exports the tiny architecture once (the digits model)
def test_onnx_export_keeps_eager_signs_and_top1(fashion_clf, fashion, tmp_path):
    """TTC exported from the fashion model: same draws -> same per-step signs and top-1 as the eager module."""
    from scc.export import OrtDefended, export_onnx

    defended = scc.defend(fashion_clf, "ttc", seed=0)
    path = tmp_path / "fashion-ttc.onnx"
    export_onnx(defended, path, batch_size=None, draws_as_inputs=True, trace_outputs=True)
    ort_defended = OrtDefended(path, threads=1)
    x = fashion.images[:16]
    draws = defended.draws(x, keys=range(16))
    trace_eager, trace_ort = [], []
    eager = defended(x, draws, trace=trace_eager)
    got = ort_defended(x, draws, trace=trace_ort)
    assert top1_agreement(got, eager) == 1.0
    assert len(trace_ort) == len(trace_eager) > 0
    for step, (a, b) in enumerate(zip(trace_eager, trace_ort)):
        assert (a == b).float().mean().item() >= 0.999, f"step {step}: signs differ"


def test_serve_handler_answers_like_the_eager_module(fashion):
    from scc.serve.requests import Item
    from scc.serve.service import Service, service_config

    service = Service(service_config(model=FASHION_NAME, defense="scc-latency", backend="eager", max_batch=2))
    assert service.classifier.labels == list(FASHION_CLASSES)
    items = [Item(name=f"i{j}", x=fashion.images[j], seed=3, key=j, top_k=10) for j in range(3)]
    answers = service.handle_batch(items)
    reference = scc.defend(scc.load(FASHION_NAME), "scc", preset="latency", seed=3)
    with torch.no_grad():
        probs = reference(fashion.images[:3], keys=[0, 1, 2]).softmax(-1)
    for j, r in enumerate(answers):
        got = torch.tensor([r["scores"][lab] for lab in FASHION_CLASSES])
        assert r["index"] == int(probs[j].argmax()) and torch.allclose(got, probs[j], atol=1e-5)


def test_adaptive_protocol_runs_on_fashion(tmp_path):
    from scc.eval.adaptive import evaluate
    from scc.eval.suite import Suite

    suite = Suite(attacks=("pgd", "square"), pgd_steps=3, queries=5, checkpoints=(0, 3), sanity_images=0)
    report = evaluate(FASHION_NAME, dataset="fashion", defenses=["none", "ttc"], n_images=4, batch_size=4,
                      seed=0, suite=suite, progress=False, log=lambda line: None)
    assert report["dataset"] == "fashion" and report["n_images"] == 4
    worst = {(r["defense"], r["draws"]): r for r in report["results"] if r["attack"] == "worst"}
    assert set(worst) == {("none", "known"), ("none", "fresh"), ("ttc", "known"), ("ttc", "fresh")}
    assert all(0 <= r["accuracy"] <= 1 for r in worst.values())
