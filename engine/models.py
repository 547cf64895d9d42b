"""Zero-shot CLIP classifiers: open_clip models, local checkpoints, and the bundled tiny models.

The bundled models (`BUNDLED`: `scc-tiny-digits`, `scc-tiny-fashion`) ship their open_clip config, word
vocabulary, labels, evaluation prompt and weights in scc/assets/ and load offline.

`load(...)` returns a `ZeroShotClassifier`, the module every defense wraps:

    pixels in [0,1], (B, 3, H, W)  ->  normalise inside  ->  f(x) (raw embedding)  ->  s * cos(f(x), t_k)

The class text embeddings t_k are computed once from labels x templates (averaged over templates, then
L2-normalised) and stored as a buffer, so a defense never touches the text tower per image.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import socket
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_NAME = "scc-tiny-digits"  # the original bundled model (the default everywhere)
FASHION_NAME = "scc-tiny-fashion"
# Bundled model -> the scc.data dataset it was trained for (its held-out split is that dataset).
BUNDLED: dict[str, str] = {TINY_NAME: "digits", FASHION_NAME: "fashion"}


class SccError(ValueError):
    """A user error: bad input, unknown model, missing weights. The CLI prints its message on one line."""


# ----------------------------------------------------------------------------------------------------------
# The bundled tiny models: each one's open_clip config, word-level tokenizer and weights live in scc/assets/.
# ----------------------------------------------------------------------------------------------------------
def asset_path(name: str) -> Path:
    return Path(str(resources.files("scc") / "assets" / name))


def is_bundled(name: str) -> bool:
    """True for a model shipped with scc (loads offline, word tokenizer, labels from its meta file)."""
    return name in BUNDLED


def bundled_dataset(name: str) -> str:
    """The scc.data dataset spec a bundled model was trained for: 'digits' | 'fashion'."""
    if name not in BUNDLED:
        raise SccError(f"{name!r} is not a bundled model; bundled: {', '.join(BUNDLED)}")
    return BUNDLED[name]


class WordTokenizer:
    """A tiny word-level tokenizer for the bundled model (open_clip has no small-vocabulary tokenizer).

    Ids: 0 = <pad>, 1..V-3 = words, V-2 = <sot>, V-1 = <eot>. <eot> is the largest id because open_clip's
    text tower pools at argmax(token id).
    """

    _split = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")

    def __init__(self, words: Sequence[str], context_length: int, name: str = TINY_NAME):
        self.name = name  # the bundled model it belongs to (for error messages)
        self.words = list(words)
        self.index = {w: i + 1 for i, w in enumerate(self.words)}
        self.sot = len(self.words) + 1
        self.eot = len(self.words) + 2
        self.vocab_size = len(self.words) + 3
        self.context_length = context_length

    def split(self, text: str) -> list[str]:
        return self._split.findall(text.lower())

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.split(text) if w not in self.index]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            unknown = self.unknown_words(text)
            if unknown:
                raise SccError(
                    f"the bundled model {self.name!r} does not know the word(s) {unknown} in {text!r}; "
                    f"it only knows: {' '.join(self.words)}. Use an open_clip model for other labels.")
            ids = [self.sot] + [self.index[w] for w in self.split(text)] + [self.eot]
            if len(ids) > self.context_length:
                raise SccError(f"prompt {text!r} has {len(ids)} tokens, more than the bundled model's "
                               f"context of {self.context_length}")
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def bundled_meta(name: str = TINY_NAME) -> dict:
    """A bundled model's meta file: vocabulary, context length, labels, templates, recipe, accuracies."""
    bundled_dataset(name)
    return json.loads(asset_path(f"{name}.meta.json").read_text())


def bundled_tokenizer(name: str = TINY_NAME) -> WordTokenizer:
    meta = bundled_meta(name)
    return WordTokenizer(meta["words"], meta["context_length"], name)


def create_bundled_model(name: str = TINY_NAME, load_weights: bool = True) -> nn.Module:
    """Build a bundled CLIP from its open_clip config (and load its shipped weights)."""
    import open_clip

    bundled_dataset(name)
    open_clip.add_model_config(asset_path(f"{name}.json"))
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # open_clip warns "initialized randomly": we load weights next
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        root.setLevel(level)
    if load_weights:
        weights = asset_path(f"{name}.safetensors")
        if not weights.exists():
            raise SccError(f"bundled weights {weights} are missing; run `scc train-tiny --dataset "
                           f"{BUNDLED[name]}` to rebuild them")
        _load_state_dict(model, weights)
    return model


def tiny_meta() -> dict:
    return bundled_meta(TINY_NAME)


def tiny_tokenizer() -> WordTokenizer:
    return bundled_tokenizer(TINY_NAME)


def create_tiny_model(load_weights: bool = True) -> nn.Module:
    return create_bundled_model(TINY_NAME, load_weights)


# ----------------------------------------------------------------------------------------------------------
# Loading open_clip models
# ----------------------------------------------------------------------------------------------------------
def _load_state_dict(model: nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a bad pickle
            raise SccError(f"could not read checkpoint {path}: {err}") from err
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise SccError(f"checkpoint {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise SccError(f"checkpoint {path} does not fit this architecture: {len(missing)} missing keys, "
                       f"e.g. {missing[:3]}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def create_open_clip(model_name: str, pretrained: str | None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for an open_clip name and a `pretrained` tag, a local checkpoint path, or None."""
    import open_clip

    if is_bundled(model_name):
        if pretrained not in (None, "", "none", "bundled"):
            model = create_bundled_model(model_name, load_weights=False)
            _load_state_dict(model, Path(pretrained))
        else:
            model = create_bundled_model(model_name, load_weights=True)
        return model, bundled_tokenizer(model_name)
    known = open_clip.list_models()
    if model_name not in known and not model_name.startswith(("hf-hub:", "local-dir:")):
        close = difflib.get_close_matches(model_name, known + list(BUNDLED), n=3)
        raise SccError(f"unknown model {model_name!r}" + (f"; did you mean {close}?" if close else "")
                       + " (see open_clip.list_models())")
    tag = None if pretrained in (None, "", "none") else pretrained
    if tag is not None and (os.path.sep in tag or Path(tag).suffix in (".safetensors", ".pt", ".pth", ".bin")):
        path = Path(tag)
        if not path.exists():
            raise SccError(f"checkpoint file {path} does not exist")
        model = open_clip.create_model(model_name, pretrained=None)
        _load_state_dict(model, path)
    elif tag is not None:
        tags = [t for n, t in open_clip.list_pretrained() if n == model_name]
        if tag not in tags:
            raise SccError(f"unknown pretrained tag {tag!r} for {model_name}; open_clip knows {tags}, "
                           "or pass a local checkpoint path")
        offline = not _hub_reachable()
        if offline:  # fail fast instead of five network retries: only the local cache can answer
            os.environ["HF_HUB_OFFLINE"] = "1"
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True
        try:
            model = open_clip.create_model(model_name, pretrained=tag)
        except (RuntimeError, OSError) as err:
            raise SccError(
                f"could not fetch pretrained weights {model_name}/{tag} ({'no network' if offline else err}). "
                f"Download the checkpoint elsewhere and pass its path: --pretrained /path/to/open_clip_model.safetensors"
            ) from err
    else:
        model = open_clip.create_model(model_name, pretrained=None)
    return model, open_clip.get_tokenizer(model_name)


def image_size_of(model_name: str) -> int:
    """The input resolution of a model, from its config alone (no weights are built)."""
    import open_clip

    if is_bundled(model_name):
        return json.loads(asset_path(f"{model_name}.json").read_text())["vision_cfg"]["image_size"]
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models() + list(BUNDLED), n=3)
        raise SccError(f"unknown model {model_name!r}" + (f"; did you mean {close}?" if close else ""))
    size = cfg["vision_cfg"].get("image_size", 224)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def check_labels(labels: Sequence[str] | None) -> list[str]:
    if labels is None or len(labels) == 0:
        raise SccError("the label list is empty: give at least two class names, e.g. --labels cat,dog")
    labels = [str(l).strip() for l in labels]
    if any(not l for l in labels):
        raise SccError(f"the label list {labels} contains an empty name")
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup:
        raise SccError(f"duplicate labels {dup}: each class must be named once")
    if len(labels) < 2:
        raise SccError(f"only one label {labels}: zero-shot classification needs at least two")
    return labels


class ZeroShotClassifier(nn.Module):
    """[0,1] NCHW pixels -> logits = logit_scale * cos(f(norm(x)), t_k). Weights are frozen."""

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float, image_size: int,
                 labels: Sequence[str], name: str = "", mean=CLIP_MEAN, std=CLIP_STD, clip: nn.Module | None = None,
                 tokenizer=None, templates: Sequence[str] = ()):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        # The whole open_clip model (its text tower is needed by prompt-tuning defenses such as R-TPT) and its
        # tokenizer. `clip.visual` is `self.visual`: no parameter is stored twice.
        self.clip = clip.eval().requires_grad_(False) if clip is not None else None
        self.tokenizer = tokenizer
        self.templates = list(templates)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.register_buffer("text", F.normalize(text_embeddings.float(), dim=-1))  # (C, D)
        self.logit_scale = float(logit_scale)
        self.image_size = int(image_size)
        self.labels = list(labels)
        self.name = name
        self.counter = None  # a scc.cost.PassCounter while passes are being counted

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def check_shape(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            raise SccError(f"expected pixels of shape (B, 3, {self.image_size}, {self.image_size}) in [0,1], "
                           f"got {tuple(x.shape)}; resize/crop images first (scc.data.preprocess)")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(norm(x)): the raw (un-normalised) image embedding, (B, D)."""
        if self.counter is not None:
            x = self.counter.image(x)
        return self.visual((x - self.mean) / self.std)

    def logits_from_embedding(self, e: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(e, dim=-1) @ self.text.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_shape(x)
        return self.logits_from_embedding(self.embed(x))


@torch.no_grad()
def text_embeddings(model: nn.Module, tokenizer, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D): per class, the mean of L2-normalised template embeddings, re-normalised."""
    device = next(model.parameters()).device
    rows = []
    for label in labels:
        tokens = tokenizer([t.format(label) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=-1))
    return torch.stack(rows)


def load(model: str = TINY_NAME, pretrained: str | None = None, labels: Sequence[str] | None = None,
         templates: Sequence[str] | None = None, device: str | torch.device = "cpu") -> ZeroShotClassifier:
    """Zero-shot classifier for an open_clip model name (+ pretrained tag or checkpoint path, or none).

    For a bundled model (`scc-tiny-digits`, `scc-tiny-fashion`) the labels and the held-out evaluation template
    default to those in its meta file (its ten classes).
    """
    if is_bundled(model):
        meta = bundled_meta(model)
        labels = meta["labels"] if labels is None else labels
        templates = meta["eval_templates"] if templates is None else templates
    labels = check_labels(labels)
    templates = list(templates or ["a photo of a {}."])
    if any("{}" not in t for t in templates):
        raise SccError(f"every template needs a '{{}}' placeholder for the class name, got {templates}")
    clip, tokenizer = create_open_clip(model, pretrained)
    clip = clip.to(device).eval().requires_grad_(False)
    text = text_embeddings(clip, tokenizer, labels, templates)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = getattr(clip.visual, "preprocess_cfg", {}) or {}
    return ZeroShotClassifier(clip.visual, text, clip.logit_scale.exp().item(), size, labels, name=model,
                              mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
                              clip=clip, tokenizer=tokenizer, templates=templates).to(device)
