"""A BiomedCLIP-shaped model (Table 3's backbone) built offline: open_clip's `local-dir:` folder with a timm ViT image
tower, a Hugging Face BERT text tower (256 tokens, CLS pooling, MLP projection, `hf_model_pretrained: false`), the
weights in open_clip_model.safetensors and the BERT config and WordPiece tokenizer files in the folder itself.
Every part is tiny (timm's `test_vit`: 160 px, 6 blocks of width 64; BERT: 2 layers of width 32; a 32-word
vocabulary), with random weights, so the tests check the plumbing, not accuracy: classify, the paper protocol for
every defense, one fine-tuning epoch and the ONNX export.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import scc
from scc.cli import main


def _kernels_shadowed() -> str | None:
    """transformers 5 imports the PyPI package `kernels`. A process that has the repository root on sys.path
    (`python -m pytest` run from it) finds this repository's own kernels/ folder (installed as scc.kernels) first."""
    spec = importlib.util.find_spec("kernels")
    root = Path(__file__).resolve().parents[1]
    if spec is not None and spec.origin and Path(spec.origin).resolve().is_relative_to(root / "kernels"):
        return ("this process has the repository root on sys.path, so its kernels/ folder hides the PyPI package "
                "`kernels` that transformers imports: run the `pytest` script (.venv/bin/pytest), as the README does")
    return None


if _kernels_shadowed():
    pytest.skip(_kernels_shadowed(), allow_module_level=True)
pytest.importorskip("transformers")

WORDS = ["this", "is", "a", "photo", "of", "the", "digit", "zero", "one", "two", "three", "lymph", "node", "tissue",
         "tumor", "healthy", ".", ",", "-"]
LABELS = ["zero", "one"]
TEMPLATE = "this is a photo of the digit {}."


def write_biomedclip_like(folder, seed: int = 0):
    """The folder `local-dir:` loads: open_clip_config.json (BiomedCLIP's layout), config.json (BERT),
    vocab.txt + tokenizer_config.json (WordPiece), open_clip_model.safetensors (random weights from `seed`)."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 256}))
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=256, pad_token_id=0).save_pretrained(folder)
    config = {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 160},
        "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_model_pretrained": False,
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256}},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # no weights in the folder yet: without pretrained_hf=False open_clip would fetch BERT's
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_hf=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def biomed(tmp_path_factory):
    """(model name, image folder with two classes of four 32x32 digit PNGs)."""
    from PIL import Image

    from scc.data import digits_arrays

    root = tmp_path_factory.mktemp("biomedclip")
    folder = write_biomedclip_like(root / "tiny-biomedclip")
    x, y, _, _ = digits_arrays()
    images = root / "images"
    for label, name in enumerate(LABELS):
        (images / name).mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(y.numpy() == label)[:4]):
            pixels = (x[index, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(images / name / f"{i}.png")
    return f"local-dir:{folder}", images


def test_loads_offline_with_the_folders_bert_tokenizer(biomed, monkeypatch):
    """The folder alone (no hub): the HF BERT text tower and its WordPiece tokenizer at 256 tokens, the timm
    image tower at 160 px with BiomedCLIP's normalisation, zero-shot logits for the prompts."""
    from transformers import BertModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = biomed
    clf = scc.load(model, labels=LABELS, templates=[TEMPLATE])
    assert isinstance(clf.clip.text.transformer, BertModel)
    tokens = clf.tokenizer([TEMPLATE.format("zero")])
    assert tokens.shape == (1, 256)
    assert tokens[0, :10].tolist() == [2, 5, 6, 7, 8, 9, 10, 11, 12, 21] and tokens[0, 10] == 3  # CLS ... . SEP
    assert clf.image_size == 160 and clf.preprocess.size == 160 and clf.text.shape == (2, 32)
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    x = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = clf(x)
        text = clf.clip.encode_text(tokens)  # the same text embedding the classifier holds
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    torch.testing.assert_close(clf.text[0], torch.nn.functional.normalize(text[0], dim=-1), atol=1e-6, rtol=0)


def test_classify_and_the_rtpt_refusal(biomed, capsys, tmp_path):
    """`scc classify --model local-dir:DIR` answers every file; R-TPT, whose prompt learner needs a CLIP-style
    (causal, eot-pooled) text tower, is refused up front in one line by classify and eval alike."""
    model, images = biomed
    files = sorted(str(p) for p in images.rglob("*.png"))[:3]
    argv = ["classify", *files, "--model", model, "--labels", ",".join(LABELS), "--templates", TEMPLATE,
            "--defense", "ttc", "--quiet", "--json", str(tmp_path / "c.json")]
    assert main(argv) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert len(out["results"]) == 3 and all(r["label"] in LABELS for r in out["results"]), out
    capsys.readouterr()
    for argv in (["classify", files[0], "--model", model, "--labels", ",".join(LABELS), "--defense", "rtpt"],
                 ["eval", "--model", model, "--dataset", f"imagefolder:{images}", "--defenses", "none,rtpt",
                  "--images", "2", "--quiet"]):
        assert main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "R-TPT needs an open_clip CLIP-style text tower" in err[0], err


def test_paper_protocol_every_defense(biomed, tmp_path):
    """Every test-time defense but R-TPT (refused above) through the paper protocol, PGD-2 at 4/255."""
    model, images = biomed
    defenses = [d for d in scc.defenses.defense_specs() if d != "rtpt"]
    out = tmp_path / "paper.json"
    argv = ["eval", "--model", model, "--dataset", f"imagefolder:{images}", "--images", "3", "--defenses",
            ",".join(defenses), "--attacks", "pgd", "--eps", "4/255", "--steps", "2", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(scc.defenses.spec_of(r["defense"], r["preset"]), r["attack"]): r for r in report["results"]}
    assert set(rows) == {(d, a) for d in defenses for a in ("none", "pgd")}
    assert all(0 <= r["accuracy"] <= 1 for r in rows.values())


def test_one_finetuning_epoch(biomed, tmp_path):
    """`scc finetune --model local-dir:DIR` for one TeCoA epoch on the image folder: the vision tower moves, the
    BERT tower does not, and the checkpoint loads back with --pretrained."""
    model, images = biomed
    out = tmp_path / "ft"
    assert main(["finetune", "--model", model, "--method", "tecoa", "--data", f"imagefolder:{images}",
                 "--epochs", "1", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "tiny-biomedclip-tecoa.meta.json").read_text())
    assert meta["model"] == model and meta["optimizer_steps"] == 2 and len(meta["epochs"]) == 1
    base = scc.load(model, labels=LABELS, templates=[TEMPLATE])
    tuned = scc.load(model, str(out / "tiny-biomedclip-tecoa.safetensors"), labels=LABELS, templates=[TEMPLATE])
    moved = lambda a, b: any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert moved(base.clip.visual, tuned.clip.visual) and not moved(base.clip.text, tuned.clip.text)
    torch.testing.assert_close(base.text, tuned.text)


@pytest.mark.slow
def test_onnx_export_keeps_eager_signs_and_top1(biomed, tmp_path):
    """TTC on the timm image tower exported whole (forward and input-gradient passes), fed eager's draws."""
    pytest.importorskip("onnxruntime")
    from scc.export import OrtDefended, export_onnx
    from scc.metrics import top1_agreement

    model, _ = biomed
    clf = scc.load(model, labels=LABELS, templates=[TEMPLATE])
    defended = scc.defend(clf, "ttc", seed=0)
    info = export_onnx(defended, tmp_path / "ttc.onnx", draws_as_inputs=True, trace_outputs=True)
    assert info["control_flow_nodes"] == 0 and info["dynamic_batch"]
    x = torch.rand(3, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    draws = defended.draws(x)
    ref_trace, trace = [], []
    ref = defended(x, draws, trace=ref_trace)
    out = torch.as_tensor(OrtDefended(tmp_path / "ttc.onnx", threads=1)(x, draws, trace=trace))
    assert top1_agreement(out, ref) == 1.0
    assert min((torch.as_tensor(a) == b).float().mean().item() for a, b in zip(trace, ref_trace)) >= 0.999
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)
