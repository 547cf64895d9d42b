"""Zero-shot CLIP classifiers: open_clip models, local checkpoints, and the bundled tiny models.

The bundled models (`BUNDLED`: `scc-tiny-digits`, `scc-tiny-fashion`) ship their open_clip config, word
vocabulary, labels, evaluation prompt and weights in scc/assets/ and load offline.

`load(...)` returns a `ZeroShotClassifier`, the module every defense wraps:

    pixels in [0,1], (B, 3, H, W)  ->  normalise inside  ->  f(x) (raw embedding)  ->  s * cos(f(x), t_k)

The class text embeddings t_k are computed once from labels x templates (averaged over templates, then
L2-normalised) and stored as a buffer, so a defense never touches the text tower per image.
"""
from __future__ import annotations

import contextlib
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

from .errors import SccError
from .images import Preprocess
from .validation import check_device, check_labels, check_templates, validate_pixels

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_NAME = "scc-tiny-digits"  # the original bundled model (the default everywhere)
FASHION_NAME = "scc-tiny-fashion"
# Bundled model -> the scc.data dataset it was trained for (its held-out split is that dataset).
BUNDLED: dict[str, str] = {TINY_NAME: "digits", FASHION_NAME: "fashion"}
# How each bundled model's training images were made from the raw ones (scc.images.Preprocess fields; size from its
# config): the 8x8 digit scans resized whole; the 28x28 Fashion-MNIST images zero-padded by 2 pixels to 32x32.
BUNDLED_PREPROCESS: dict[str, dict] = {TINY_NAME: {"crop": 1.0, "frame": 0}, FASHION_NAME: {"crop": 1.0, "frame": 2}}


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

    def check(self, texts: Sequence[str]) -> None:
        """SccError naming every unknown word (and every prompt over the context) of all `texts` at once."""
        unknown = list(dict.fromkeys(w for text in texts for w in self.unknown_words(text)))
        if unknown:
            where = [t for t in texts if self.unknown_words(t)]
            raise SccError(
                f"the bundled model {self.name!r} does not know the word(s) {unknown} (in {where[:3]}"
                f"{f' and {len(where) - 3} more prompts' if len(where) > 3 else ''}); it only knows: "
                f"{' '.join(self.words)}. Use an open_clip model for other labels.")
        long = [(t, len(self.split(t)) + 2) for t in texts if len(self.split(t)) + 2 > self.context_length]
        if long:
            raise SccError("; ".join(f"prompt {t!r} has {n} tokens" for t, n in long)
                           + f", more than the bundled model's context of {self.context_length}")

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        self.check(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot] + [self.index[w] for w in self.split(text)] + [self.eot]
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
    with _quiet_open_clip():  # open_clip warns "initialized randomly": we load weights next
        model = open_clip.create_model(name, pretrained=None)
    if load_weights:
        weights = asset_path(f"{name}.safetensors")
        if not weights.exists():
            raise SccError(f"bundled weights {weights} are missing; run `scc train-tiny --dataset "
                           f"{BUNDLED[name]} --replace-bundled` to rebuild them (or reinstall the package)")
        _load_state_dict(model, weights)
    return model


# ----------------------------------------------------------------------------------------------------------
# Loading open_clip models
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while we load weights ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _captured_logs():
    """Collect what libraries log on the root logger (open_clip's "Failed to download weights") instead of letting
    it print ahead of scc's own one-line error: yields the list of messages; the caller decides what to show."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    root = logging.getLogger()
    handlers = root.handlers[:]
    root.handlers = [Collect(logging.WARNING)]  # a handler present: logging does not add its stderr default
    try:
        yield messages
    finally:
        root.handlers = handlers


def describe_checkpoint(state: dict) -> str:
    """What architecture a CLIP state dict looks like, from its key names and shapes (ViT image towers)."""
    def shape(key):
        t = state.get(key)
        return tuple(t.shape) if isinstance(t, torch.Tensor) else None

    conv, pos = shape("visual.conv1.weight"), shape("visual.positional_embedding")
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    embed = (shape("visual.proj") or (None, None))[1] or (shape("text_projection") or (None, None))[-1]
    if conv is None or pos is None or len(conv) != 4:
        if any(k.startswith("visual.layer1.") for k in state):
            return f"a ResNet CLIP (embed dim {embed})"
        return f"an unknown layout ({len(state)} tensors, e.g. {sorted(state)[:3]})"
    width, patch = conv[0], conv[-1]
    grid = round((pos[0] - 1) ** 0.5)
    info = dict(embed_dim=embed, width=width, layers=layers, patch_size=patch, image_size=grid * patch,
                text_width=(shape("ln_final.weight") or (None,))[0],
                context_length=(shape("positional_embedding") or (None,))[0],
                vocab_size=(shape("token_embedding.weight") or (None,))[0])
    text = (f"a ViT with embed dim {embed}, width {width}, {layers} layers, patch {patch}, "
            f"image {grid * patch}")
    names = _models_like(info)
    return text + (f" (like {', '.join(names[:4])})" if names else "")


def _models_like(info: dict) -> list[str]:
    try:
        import open_clip

        configs = {n: open_clip.get_model_config(n) for n in open_clip.list_models()}
        configs[TINY_NAME] = json.loads(asset_path(f"{TINY_NAME}.json").read_text())
    except Exception:  # best effort: the description stands without names
        return []
    out = []
    for name, cfg in configs.items():
        v = (cfg or {}).get("vision_cfg", {})
        size = v.get("image_size")
        size = size[0] if isinstance(size, (list, tuple)) else size
        t = (cfg or {}).get("text_cfg", {})
        text = (t.get("width", 512), t.get("context_length", 77), t.get("vocab_size", 49408))
        if (cfg.get("embed_dim"), v.get("width"), v.get("layers"), v.get("patch_size"), size) == (
                info["embed_dim"], info["width"], info["layers"], info["patch_size"], info["image_size"]):
            # an exact text tower first (plain CLIP keys), then image-tower-only matches
            exact = text == (info["text_width"], info["context_length"], info["vocab_size"])
            out.append((not exact, len(name), name))
    out.sort()
    return [name for inexact, _, name in out if not inexact] or [name for *_, name in out]


def _load_state_dict(model: nn.Module, path: Path, name: str = "this model") -> None:
    if not path.is_file():
        raise SccError(f"checkpoint file {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises SafetensorError / OSError / ... for a damaged file
            raise SccError(f"could not read checkpoint {path}: not a valid .safetensors file "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                           "re-download it or pass another file") from None
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
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    wrong.sort(key=lambda k: (not k.startswith("visual.conv1"), not k.startswith("visual.")))  # the telling one first
    missing = [k for k in own if k not in state]
    if wrong or missing:
        detail = (f"{len(wrong)} tensors differ in shape, e.g. {wrong[0]}: checkpoint {tuple(state[wrong[0]].shape)} "
                  f"vs model {tuple(own[wrong[0]].shape)}" if wrong else
                  f"{len(missing)} missing keys, e.g. {missing[:3]}")
        raise SccError(f"checkpoint {path} does not fit this architecture ({name}): {detail}; the checkpoint "
                       f"looks like {describe_checkpoint(state)}: load it with that model name")
    model.load_state_dict(state, strict=False)


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_model_name(model_name: str) -> None:
    """SccError (with close matches) for a name that is neither bundled, an open_clip model, nor hf-hub:/local-dir:."""
    import open_clip

    if is_bundled(model_name) or model_name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if model_name not in known:
        close = difflib.get_close_matches(model_name, known + list(BUNDLED), n=3)
        raise SccError(f"unknown model {model_name!r}" + (f"; did you mean {close}?" if close else "")
                       + " (see open_clip.list_models())")


def tokenizer_for(model_name: str):
    """The text tokenizer of a model, without building the model (so prompts are checked before weights load)."""
    import open_clip

    check_model_name(model_name)
    return bundled_tokenizer(model_name) if is_bundled(model_name) else open_clip.get_tokenizer(model_name)


def create_open_clip(model_name: str, pretrained: str | None, seed: int = 0) -> tuple[nn.Module, object]:
    """(model, tokenizer) for an open_clip name and a `pretrained` tag, a local checkpoint path, or None.

    Random weights (`pretrained` None/"none") are drawn from torch's generator seeded with `seed` (the global
    generator's state is restored afterwards), so the same seed gives the same model."""
    import open_clip

    check_model_name(model_name)
    if is_bundled(model_name):
        if pretrained not in (None, "", "none", "bundled"):
            model = create_bundled_model(model_name, load_weights=False)
            _load_state_dict(model, Path(pretrained), model_name)
        else:
            model = create_bundled_model(model_name, load_weights=True)
        return model, bundled_tokenizer(model_name)
    tag = None if pretrained in (None, "", "none") else pretrained
    if tag is not None and (os.path.sep in tag or Path(tag).suffix in (".safetensors", ".pt", ".pth", ".bin")):
        path = Path(tag)
        if not path.exists():
            raise SccError(f"checkpoint file {path} does not exist")
        with _quiet_open_clip():  # "initialized randomly": we load the weights next
            model = open_clip.create_model(model_name, pretrained=None)
        _load_state_dict(model, path, model_name)
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
            with _captured_logs() as logged:
                model = open_clip.create_model(model_name, pretrained=tag)
        except (RuntimeError, OSError) as err:
            said = "; ".join(m.splitlines()[0][:200] for m in logged)
            reason = "no network" if offline else str(err).splitlines()[0][:300]
            raise SccError(
                f"could not fetch pretrained weights {model_name}/{tag} ({reason}{'; ' + said if said else ''}). "
                "Download the checkpoint elsewhere and pass its path: "
                "pretrained='/path/to/open_clip_model.safetensors' "
                "(command line: --pretrained /path/to/open_clip_model.safetensors)"
            ) from err
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
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


def preprocessing_of(model_name: str) -> Preprocess:
    """The model's image preprocessing (scc.images), from its name and config alone: a bundled model's own rule,
    the CLIP/TTC rule (short side to S*256/224, centre crop S) for every other model."""
    return Preprocess(image_size_of(model_name), **BUNDLED_PREPROCESS.get(model_name, {}))


def check_prompts(tokenizer, labels: Sequence[str], templates: Sequence[str], model: str) -> None:
    """Refuse, before any weights load, prompts the tokenizer cannot encode: unknown words of a bundled model
    (all of them named) and prompts longer than the text context (open_clip's tokenizer would silently cut them)."""
    if isinstance(tokenizer, WordTokenizer):
        tokenizer.check([t.format(label) for label in labels for t in templates])
        return
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or not isinstance(context, int):
        return  # HF tokenizers: not checked
    short = lambda t: repr(t if len(t) <= 60 else t[:40] + " ... " + t[-15:])
    too_long = []
    for label in labels:
        for t in templates:
            n = len(encode(t.format(label))) + 2  # <start_of_text> ... <end_of_text>
            if n > context:
                too_long.append((label, t.format(label), n))
                break
    if too_long:
        raise SccError("label(s) too long: " + "; ".join(f"{short(l)} (prompt {short(text)} has {n} tokens)"
                                                          for l, text, n in too_long)
                       + f", more than {model}'s text context of {context}; shorten them (they would be cut off)")


class ZeroShotClassifier(nn.Module):
    """[0,1] NCHW pixels -> logits = logit_scale * cos(f(norm(x)), t_k). Weights are frozen.

    `preprocess` (scc.images.Preprocess) turns an image file or encoded bytes into this model's input:
    `clf(clf.preprocess.file("cat.png")[None])`."""

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float, image_size: int,
                 labels: Sequence[str], name: str = "", mean=CLIP_MEAN, std=CLIP_STD, clip: nn.Module | None = None,
                 tokenizer=None, templates: Sequence[str] = (), preprocess: Preprocess | None = None):
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
        self.preprocess = preprocess if preprocess is not None else Preprocess(self.image_size)
        if self.preprocess.size != self.image_size:
            raise SccError(f"preprocess makes {self.preprocess.size}x{self.preprocess.size} images, the model takes "
                           f"{self.image_size}x{self.image_size}")
        self.labels = list(labels)
        self.name = name
        self.counter = None  # a scc.passes.PassCounter while passes are being counted
        # Hand kernels the defenses call through this classifier ({"sign_step": fn, "view_augment": fn}); empty =
        # the torch reference ops. Only an engine's own copy sets them (scc.precision.engine_classifier).
        self.kernels: dict = {}
        self.validate = True  # forward checks NaN/Inf and the [0,1] range (one host sync); False skips it

    @property
    def num_classes(self) -> int:
        return self.text.shape[0]

    def check_input(self, x: torch.Tensor) -> None:
        """scc.validation.validate_pixels as the defended module does it: shape, float32 (uint8 and float64 get
        a message saying how to convert), and with `self.validate` NaN/Inf and the [0,1] range (one host sync;
        skipped inside torch.compile / tracing)."""
        values = self.validate and not torch.compiler.is_compiling()
        validate_pixels(x, self.image_size, dtype=self.mean.dtype if x.is_floating_point() else None,
                        values=values)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """f(norm(x)): the raw (un-normalised) image embedding, (B, D)."""
        if self.counter is not None:
            x = self.counter.image(x)
        return self.visual((x - self.mean) / self.std)

    def logits_from_embedding(self, e: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(e, dim=-1) @ self.text.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
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
         templates: Sequence[str] | None = None, device: str | torch.device = "cpu",
         seed: int = 0) -> ZeroShotClassifier:
    """Zero-shot classifier for an open_clip model name (+ pretrained tag or checkpoint path, or none).

    For a bundled model (`scc-tiny-digits`, `scc-tiny-fashion`) the labels and the held-out evaluation template
    default to those in its meta file (its ten classes). Random weights (`pretrained=None`) are drawn with `seed`.
    Templates need exactly one `{}`; labels equal after lowercasing and prompts longer than the text context are
    refused.
    """
    if is_bundled(model):
        meta = bundled_meta(model)
        labels = meta["labels"] if labels is None else labels
        templates = meta["eval_templates"] if templates is None else templates
    labels = check_labels(labels)
    templates = check_templates(templates or ["a photo of a {}."])
    check_device(device)
    check_prompts(tokenizer_for(model), labels, templates, model)  # before any weights are built
    clip, tokenizer = create_open_clip(model, pretrained, seed)
    clip = clip.to(device).eval().requires_grad_(False)
    text = text_embeddings(clip, tokenizer, labels, templates)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = getattr(clip.visual, "preprocess_cfg", {}) or {}
    return ZeroShotClassifier(clip.visual, text, clip.logit_scale.exp().item(), size, labels, name=model,
                              mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
                              clip=clip, tokenizer=tokenizer, templates=templates,
                              preprocess=Preprocess(size, **BUNDLED_PREPROCESS.get(model, {}))).to(device)
