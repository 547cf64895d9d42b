"""Train the bundled `scc-tiny-digits` CLIP on scikit-learn's digits (train split only).

    scc train-tiny [--epochs 40] [--seed 0] [--out ./scc-tiny-out] [--replace-bundled]

By default the weights go to ./scc-tiny-out/ (use them with `--pretrained scc-tiny-out/scc-tiny-digits.safetensors`);
only --replace-bundled overwrites the model shipped inside the installed package.

Recipe: images /16 -> [0,1], bilinear 8->32, 3 channels; the fixed stratified split of `scc.data.digits_arrays`
(1347 train / 450 held-out test, never trained on). Each image is paired with one of ten training templates
("the digit {}.", ...); the evaluation template "a photo of the digit {}." is held out. open_clip ClipLoss,
AdamW lr 2e-3, wd 0.05, batch 128, cosine schedule, light random affine augmentation (no flips: flipped
digits change meaning). One CPU thread trains such tiny steps faster than two.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DIGIT_WORDS, digits_arrays

TRAIN_TEMPLATES = [
    "a photo of the number {}.", "the digit {}.", "a handwritten {}.", "a drawing of the number {}.",
    "an image of a {}.", "the number {}.", "a picture of the digit {}.", "a scan of a handwritten {}.",
    "a {}.", "a blurry photo of the number {}.",
]
EVAL_TEMPLATES = ["a photo of the digit {}."]

OPEN_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": None, "width": 64, "heads": 2, "layers": 2},
}


def build_vocab() -> list[str]:
    from .models import WordTokenizer

    split = WordTokenizer([], 0).split
    words = sorted({w for t in TRAIN_TEMPLATES + EVAL_TEMPLATES for d in DIGIT_WORDS for w in split(t.format(d))})
    return words


def random_affine(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.08, max_rot: float = 0.15,
                  max_scale: float = 0.1) -> torch.Tensor:
    n = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)
    ang, sc = u(-max_rot, max_rot), u(1 - max_scale, 1 + max_scale)
    tx, ty = u(-max_shift, max_shift) * 2, u(-max_shift, max_shift) * 2
    theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang), tx], -1),
                         torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), ty], -1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


DEFAULT_OUT = Path("scc-tiny-out")


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


def train(epochs: int = 40, seed: int = 0, out: Path | None = None, verbose: bool = True,
          threads: int = 1) -> dict:
    """Train and save the model to `out` (default ./scc-tiny-out; `bundled_dir()` replaces the shipped one)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from .models import TINY_NAME, WordTokenizer, ZeroShotClassifier, text_embeddings

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    words = build_vocab()
    tok = WordTokenizer(words, OPEN_CLIP_CONFIG["text_cfg"]["context_length"])
    cfg = json.loads(json.dumps(OPEN_CLIP_CONFIG))
    cfg["text_cfg"]["vocab_size"] = tok.vocab_size
    out = Path(out) if out else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{TINY_NAME}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(out / f"{TINY_NAME}.json")
    model = open_clip.create_model(TINY_NAME, pretrained=None)

    xtr, ytr, xte, yte = digits_arrays(32)
    # (10 classes, 10 templates, context) token table; a batch picks one template per image
    tokens = torch.stack([tok([t.format(d) for t in TRAIN_TEMPLATES]) for d in DIGIT_WORDS])
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batch, n = 128, len(ytr)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i: i + batch]
            img = random_affine(xtr[idx], gen).clamp(0, 1)
            img = (img - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
                open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
            tmpl = torch.randint(len(TRAIN_TEMPLATES), (len(idx),), generator=gen)
            txt = tokens[ytr[idx], tmpl]
            img_f = F.normalize(model.encode_image(img), dim=-1)
            txt_f = F.normalize(model.encode_text(txt), dim=-1)
            loss = loss_fn(img_f, txt_f, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        if verbose and (epoch % 10 == 9 or epoch == epochs - 1):
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    clf = ZeroShotClassifier(model.visual, text_embeddings(model, tok, DIGIT_WORDS, EVAL_TEMPLATES),
                             model.logit_scale.exp().item(), 32, DIGIT_WORDS)
    with torch.no_grad():
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{TINY_NAME}.safetensors"))
    meta = {"words": words, "context_length": tok.context_length, "labels": list(DIGIT_WORDS),
            "train_templates": TRAIN_TEMPLATES, "eval_templates": EVAL_TEMPLATES,
            "recipe": {"epochs": epochs, "seed": seed, "optimizer": "AdamW lr 2e-3 wd 0.05 one-cycle", "batch": batch,
                       "split": "sklearn load_digits, train_test_split(test_size=450, stratify=y, random_state=0)"},
            "held_out_clean_accuracy": round(acc, 4), "train_seconds": round(time.time() - t0, 1),
            "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}
    (out / f"{TINY_NAME}.meta.json").write_text(json.dumps(meta, indent=2))
    if verbose:
        print(f"held-out clean accuracy {acc:.4f}, {meta['params']} params, saved to {out}")
    return meta


def main(argv=None) -> int:
    from .cli import Parser, add_common, apply_threads, positive_int
    from .models import SccError

    ap = Parser(prog="scc train-tiny", description=__doc__)
    ap.add_argument("--epochs", type=positive_int, default=40, help="training epochs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and augmentation")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help=f"folder for the weights, config and meta (default: ./{DEFAULT_OUT})")
    ap.add_argument("--replace-bundled", action="store_true",
                    help="overwrite the bundled model inside the installed package instead of writing to --out")
    add_common(ap, json_output=False, threads_default=1)
    args = ap.parse_args(argv)
    if args.replace_bundled and args.out is not None:
        raise SccError("give either --out DIR or --replace-bundled, not both")
    out = bundled_dir() if args.replace_bundled else (args.out or DEFAULT_OUT)
    if out.exists() and not out.is_dir():
        raise SccError(f"--out {out} is a file: give a folder")
    if not out.exists() and not out.parent.is_dir():
        raise SccError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    threads = apply_threads(args.threads)
    train(args.epochs, args.seed, out, verbose=not args.quiet, threads=threads)
    if not args.replace_bundled and not args.quiet:
        print(f"use it with: scc classify IMG --pretrained {out / 'scc-tiny-digits.safetensors'} "
              "(the bundled model is unchanged; --replace-bundled overwrites it)")
    return 0


if __name__ == "__main__":
    import sys

    from .cli import main as cli_main

    sys.exit(cli_main(["train-tiny", *sys.argv[1:]]))
