"""Model loading: the bundled model, open_clip names, local checkpoints, and every loading error."""
import time

import pytest
import torch
import torch.nn.functional as F

import scc
from scc.models import TINY_NAME, WordTokenizer, bundled_meta


def test_tiny_contract(tiny, digits):
    x, y = digits
    assert tiny.image_size == 32 and tiny.num_classes == 10 and tiny.labels[7] == "seven"
    logits = tiny(x[:5])
    assert logits.shape == (5, 10)
    want = tiny.logit_scale * F.normalize(tiny.visual((x[:5] - tiny.mean) / tiny.std), dim=-1) @ tiny.text.t()
    torch.testing.assert_close(logits, want)
    assert torch.allclose(tiny.text.norm(dim=-1), torch.ones(10))
    assert not any(p.requires_grad for p in tiny.parameters())


def test_tiny_held_out_accuracy(tiny, digits):
    x, y = digits
    with torch.no_grad():
        acc = (tiny(x).argmax(1) == y).float().mean().item()
    assert acc > 0.95, acc
    assert abs(acc - bundled_meta(TINY_NAME)["held_out_clean_accuracy"]) < 0.01


def test_random_weight_open_clip_model():
    clf = scc.load("ViT-B-32", pretrained=None, labels=["cat", "dog", "car"])
    assert clf.image_size == 224 and clf.text.shape == (3, 512)
    assert clf(torch.rand(1, 3, 224, 224)).shape == (1, 3)


def test_local_checkpoint_roundtrip(tmp_path):
    from safetensors.torch import save_file

    model = scc.models.create_bundled_model("scc-tiny-digits")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32)
    ref = scc.load(TINY_NAME)(x)
    for name in ("w.safetensors", "w.pt"):
        torch.testing.assert_close(scc.load(TINY_NAME, pretrained=str(tmp_path / name))(x), ref)


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="ViT-B-33", labels=["a", "b"]), r"unknown model 'ViT-B-33'; did you mean"),
    (dict(model="ViT-B-32", pretrained="laion9000", labels=["a", "b"]), "unknown pretrained tag 'laion9000'"),
    (dict(model="ViT-B-32", pretrained="/nope/ckpt.safetensors", labels=["a", "b"]), "does not exist"),
    (dict(labels=[]), "label list is empty"),
    (dict(labels=["one", "one"]), "duplicate labels"),
    (dict(labels=["one"]), "at least two"),
    (dict(labels=["one", ""]), "empty name"),
    (dict(templates=["no placeholder"]), "placeholder"),
    (dict(labels=["one", "zebra"]), "does not know the word"),
])
def test_loading_errors(kwargs, match):
    with pytest.raises(scc.SccError, match=match):
        scc.load(**{"model": TINY_NAME, **kwargs})


def test_bad_checkpoint(tmp_path):
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(scc.SccError, match="could not read checkpoint"):
        scc.load(TINY_NAME, pretrained=str(bad))
    torch.save({"visual.nothing": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(scc.SccError, match="does not fit this architecture"):
        scc.load(TINY_NAME, pretrained=str(tmp_path / "other.pt"))


def test_pretrained_weights_offline_fail_fast(monkeypatch, tmp_path, capfd):
    """Without a network the openai tag must fail quickly with a message saying how to pass a checkpoint. The
    reachability probe is forced to 'offline' and the hub cache is empty, so a connected machine downloads nothing."""
    import huggingface_hub.constants as hub_constants

    from scc import models

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: load() sets it to 1 when offline
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t0 = time.time()
    with pytest.raises(scc.SccError, match=r"could not fetch pretrained weights ViT-B-32/openai.*--pretrained /path") \
            as error:
        scc.load("ViT-B-32", pretrained="openai", labels=["a", "b"])
    assert time.time() - t0 < 30
    out, err = capfd.readouterr()
    # open_clip's own "Failed to download weights" log line is folded into the one error, not printed before it
    assert "Failed to download weights" in str(error.value) and "Failed to download" not in out + err, err


def test_word_tokenizer_keeps_eot_largest():
    tok = WordTokenizer(["a", "photo"], context_length=6)
    ids = tok(["a photo.".replace(".", "")])
    assert ids[0].tolist() == [tok.sot, 1, 2, tok.eot, 0, 0] and tok.eot == ids.max()
    with pytest.raises(scc.SccError, match="more than the bundled model's context"):
        tok(["a a a a a a"])


def test_defended_input_errors(tiny):
    d = scc.defend(tiny, "scc")
    with pytest.raises(scc.SccError, match=r"pixels: expected shape \(B, 3, 32, 32\) in \[0,1\], got \(1, 3, 28, 28\)"):
        d(torch.rand(1, 3, 28, 28))
    with pytest.raises(scc.SccError, match=r"pixels: expected shape .* got \(3, 32, 32\)"):
        d(torch.rand(3, 32, 32))
    with pytest.raises(scc.SccError, match=r"expected float pixels in \[0,1\], got dtype uint8; scale uint8"):
        d(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    bad = torch.rand(3, 3, 32, 32)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(scc.SccError, match=r"images \[1\] contain NaN or Inf"):
        d(bad)
    with pytest.raises(scc.SccError, match=r"must lie in \[0,1\]"):
        d(torch.rand(1, 3, 32, 32) * 255)
