"""The defenses the engine knows: one `Defense` record each, their presets and per-model overrides.

A defense is one `Defense` record: its config dataclass (frozen: a compiled graph captures it), its procedure
(a pure function of the classifier, the pixels, the config and the random draws), its draws (declared once as
`key -> scc.draws.Draw`), its presets with their expected encoder passes, and what the other backends can do
with it. Every backend (eager, compiled, Triton, ONNX) can then be fed identical draws.

Adding a defense = its file (config, procedure, draws) + one entry in DEFENSES, e.g.
    "mine": Defense("mine", MyConfig, my_procedure, {"start": Draw("uniform", -1.0, 1.0)},
                    presets={"paper": {}}, passes={"paper": (4, 2, 0, 0, 4)}),

Names: `Defense` is the record; a *defense* (a str) is its bare name ("scc"); a *spec* is the full string a user
writes, `name[-preset][:field=value...]`: "scc" for the paper preset, "scc-latency" otherwise, and
"scc-latency:steps=2" with config overrides.
Config resolution: the preset (`paper`, `latency`) -> the model's own overrides (MODEL_PRESETS, keyed by
model name) -> the caller's overrides (`warmup__steps=1` reaches into the nested warm-up config).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch

from ..draws import Draw, draw_shapes, keyed_draws, make_draws
from ..errors import SccError
from ..models import TINY_NAME
from .agc import AGC_DRAWS, AGCConfig, agc
from .anti_adv import ANTI_ADV_DRAWS, AntiAdvConfig, anti_adv
from .dbd import DBD_DRAWS, DBDConfig, dbd
from .doc import DOC_DRAWS, DOCConfig, doc
from .hd import HD_DRAWS, HDConfig, hd
from .rn import RN_DRAWS, RNConfig, rn
from .rtpt import RTPT_DRAWS, RTPTConfig, rtpt, text_tower
from .scc import SCC_DRAWS, SCCConfig, scc
from .ttc import TTC_DRAWS, TTCConfig, ttc

# Encoder passes per image (spec section 5): image forwards, image backwards, text forwards, text backwards,
# sequential rounds. A backward shares its forward's round. `scc bench --explain` counts them in a real run.
PASS_KEYS = ("image_forwards", "image_backwards", "text_forwards", "text_backwards", "rounds")


@dataclasses.dataclass(frozen=True)
class NoDefenseConfig:
    pass


def _none(clf, x, cfg, trace=None, record=None):
    if record is not None:
        record["perturbation"] = torch.zeros_like(x)
    return clf.logits_from_embedding(clf.embed(x))  # Defended.forward validated x already


@dataclasses.dataclass(frozen=True)
class Defense:
    """One test-time defense and what each backend may do with it.

    procedure(clf, x (B,3,S,S), cfg, **draws, trace=None, record=None) -> logits (B, C); `draw_specs` declares
    every random input (distribution and per-image shape); `presets` maps a preset name to config overrides and
    `passes` the same names to the expected encoder passes per image (PASS_KEYS order; None where the spec has no
    figure); `compiles`: one fullgraph torch.compile graph (scc.backends.compiled.Engine); `exports`: one ONNX
    graph (scc.export); `why_not` says why a backend refuses it; `aliases` maps other preset names to presets
    (a spec "anti-adv-original" is "anti-adv", its paper preset).
    """
    name: str
    config_cls: type
    procedure: Callable[..., torch.Tensor]
    draw_specs: Mapping[str, Draw]
    presets: Mapping[str, Mapping[str, Any]]
    passes: Mapping[str, tuple[float, ...] | None] = dataclasses.field(default_factory=dict)
    compiles: bool = True
    exports: bool = True
    why_not: str = ""  # why a backend refuses it (shown in the error)
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # other preset names, e.g. original -> paper
    # raises SccError when a classifier cannot run the defense at all (R-TPT: no CLIP-style text tower); `defend`
    # and the evaluations call it before any work
    check_model: Callable[[Any], None] | None = None

    def check(self, classifier) -> None:
        """SccError up front when `classifier` cannot run this defense (on any backend)."""
        if self.check_model is not None:
            self.check_model(classifier)

    def draws(self, x: torch.Tensor, cfg, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Draws for a batch from one generator stream (example inputs for compiling and tracing)."""
        return make_draws(self.draw_specs, cfg, x, generator)

    def keyed_draws(self, x: torch.Tensor, cfg, seed: int, keys: Sequence[Hashable]) -> dict[str, torch.Tensor]:
        """Per-image draws: row b depends on (seed, keys[b]) only (scc.draws.keyed_draws)."""
        return keyed_draws(self.draw_specs, cfg, x, seed, keys)

    def draw_shapes(self, cfg, image: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return draw_shapes(self.draw_specs, cfg, image)

    def require(self, backend: str, capability: str) -> None:
        """Raise SccError up front when `backend` (needing `capability`: 'compiles' | 'exports') cannot run it."""
        if not getattr(self, capability):
            raise SccError(f"defense {self.name!r} does not run on the {backend} backend: {self.why_not}; "
                           "use the eager backend for it")


DEFENSES: dict[str, Defense] = {
    "none": Defense("none", NoDefenseConfig, _none, {}, presets={"paper": {}}, passes={"paper": (1, 0, 0, 0, 1)}),
    # the official run script's defaults: reference, 2 steps, final forward
    "ttc": Defense("ttc", TTCConfig, ttc, TTC_DRAWS, presets={"paper": {}}, passes={"paper": (4, 2, 0, 0, 4)}),
    "scc": Defense("scc", SCCConfig, scc, SCC_DRAWS, presets={
        "paper": {},  # K_w = 2, S = 3, L = 4 (spec section 3.4)
        # same number of sequential rounds as TTC (4): K_w = 1, S = 1, Stage 1 fused with the first step
        "latency": {"warmup__steps": 1, "steps": 1, "fuse": True},
    }, passes={"paper": (19, 14, 0, 0, 7), "latency": (10, 5, 0, 0, 4)}),
    # 64 views, "a photo of a", AdamW lr 5e-3, 1 step, p = 0.1, top-20, T = 0.01; the "minimal equivalent" of
    # spec section 5: 1 image round, then text forward + backward (the tuning step) and the tuned text forward
    "rtpt": Defense("rtpt", RTPTConfig, rtpt, RTPT_DRAWS, presets={"paper": {}}, passes={"paper": (64, 0, 2, 1, 3)},
                    compiles=False, exports=False,
                    why_not="R-TPT tunes the text prompt with the open_clip text tower and an optimizer, which the "
                            "compiled engine's classifier copy and the exporter do not carry",
                    check_model=lambda clf: text_tower(clf.clip)),
    # Table 1's other test-time defenses; "paper" is each one's own paper/official-code setting
    # Anti-adv: K = 2 descent steps of 0.15 (official AWP run), or TTC's budget (1/255 steps inside 4/255)
    "anti-adv": Defense("anti-adv", AntiAdvConfig, anti_adv, ANTI_ADV_DRAWS, presets={
        "paper": {}, "ttc-budget": {"alpha": 1 / 255, "eps": 4 / 255}},
        passes={"paper": (3, 2, 0, 0, 3), "ttc-budget": (3, 2, 0, 0, 3)}, aliases={"original": "paper"}),
    # HD: eps 8/255, step 0.007, T = 20 (official defaults, CIFAR), or TTC's budget (4/255, 1/255, T = 2)
    "hd": Defense("hd", HDConfig, hd, HD_DRAWS, presets={
        "paper": {}, "ttc-budget": {"eps": 4 / 255, "alpha": 1 / 255, "steps": 2}},
        passes={"paper": (20, 19, 0, 0, 20), "ttc-budget": (2, 1, 0, 0, 2)}, aliases={"original": "paper"}),
    # DOC: main-text eps 4/255, T = 4, step 3/255; lambda, mu, M, tau, gamma unverified (see doc.py)
    "doc": Defense("doc", DOCConfig, doc, DOC_DRAWS, presets={"paper": {}}, passes={"paper": (11, 4, 0, 0, 6)}),
    # forward-only: 32 views (DBD) and 1 + 32 views (AGC) in one round, the official defaults
    "dbd": Defense("dbd", DBDConfig, dbd, DBD_DRAWS, presets={"paper": {}}, passes={"paper": (32, 0, 0, 0, 1)}),
    "agc": Defense("agc", AGCConfig, agc, AGC_DRAWS, presets={"paper": {}}, passes={"paper": (33, 0, 0, 0, 1)}),
    # RN: TTC's random start alone (U(-4/255, 4/255) per pixel, one draw per image), then one forward
    "rn": Defense("rn", RNConfig, rn, RN_DRAWS, presets={"paper": {}}, passes={"paper": (1, 0, 0, 0, 1)}),
}

PRESETS: dict[str, Mapping[str, Mapping[str, Any]]] = {name: d.presets for name, d in DEFENSES.items()}

# Per-model overrides on top of every preset. Digits are not flip-invariant (a flipped 2 or 7 is another
# glyph), so the bundled model's views replace the flip by a 0.85 centre zoom; see README "Bundled model".
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    TINY_NAME: {"scc": {"views": ("id", "zoom0.85", "noise", "zoom0.85+noise"), "sigma": 0.02},
                "rtpt": {"flip": False},  # R-TPT's RandomResizedCrop+flip views: no flip for digits
                "dbd": {"flip": False}},  # the same for DBD's crop views
}


def _name_and_preset(head: str) -> tuple[str, str]:
    """'scc-latency' -> ('scc', 'latency'); a registered name that contains '-' ('anti-adv') is matched whole,
    the longest first ('anti-adv-ttc-budget' -> ('anti-adv', 'ttc-budget')); preset aliases resolved."""
    for name in sorted(DEFENSES, key=len, reverse=True):
        if head == name:
            return name, "paper"
        if head.startswith(name + "-"):
            preset = head[len(name) + 1:]
            return name, DEFENSES[name].aliases.get(preset, preset)
    name, _, preset = head.partition("-")
    return name, preset or "paper"


def split_spec(spec: str) -> tuple[str, str]:
    """'scc-latency' -> ('scc', 'latency'); 'ttc' -> ('ttc', 'paper'); config overrides stay with the preset:
    'scc:semantic=off' -> ('scc', 'paper:semantic=off') (see `parse_overrides`)."""
    head, sep, overrides = str(spec).strip().partition(":")
    name, preset = _name_and_preset(head.strip().lower())
    return name, preset + sep + overrides


def spec_of(name: str, preset: str) -> str:
    """('scc', 'latency') -> 'scc-latency'; ('ttc', 'paper') -> 'ttc'; ('scc', 'paper:semantic=off') ->
    'scc:semantic=off'."""
    base, sep, overrides = preset.partition(":")
    return (name if base == "paper" else f"{name}-{base}") + sep + overrides


def defense_specs() -> list[str]:
    """Every spec without overrides the CLI and `defend` accept: 'none', 'ttc', 'scc', 'scc-latency', 'rtpt',
    'anti-adv', ... (preset aliases such as 'anti-adv-original' are accepted too but not listed)."""
    return [spec_of(n, p) for n, d in DEFENSES.items() for p in d.presets]


def _deprecated(old, new):
    """`old` kept for one release: calls `new` after a DeprecationWarning."""
    def alias(*args, **kwargs):
        warnings.warn(f"{old} is deprecated; use {new.__name__}", DeprecationWarning, stacklevel=2)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    alias.__doc__ = f"Deprecated: use `{new.__name__}` (the same function; this name goes in the next release)."
    return alias


split_label = _deprecated("split_label", split_spec)
label_of = _deprecated("label_of", spec_of)
defense_labels = _deprecated("defense_labels", defense_specs)


# ----------------------------------------------------------------------------------------------------------
# Config overrides in a spec: name[-preset]:field=value[:field=value...]
# ----------------------------------------------------------------------------------------------------------
BOOL_WORDS = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
OVERRIDE_SYNTAX = ("name[-preset]:field=value[:...], e.g. scc:semantic=off:spatial=off, scc:warmup.steps=1, "
                   "scc:views=id|noise")


def _field_type(cls: type, path: list[str], name: str) -> tuple[str, Any]:
    """(annotation text, default) of the config field at `path` (e.g. ['warmup', 'steps']) of `cls`."""
    for i, part in enumerate(path):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(path[:i]) or name
            raise SccError(f"{where} has no setting {part!r}; settings: {', '.join(sorted(fields))} "
                           f"(syntax: {OVERRIDE_SYNTAX})")
        field = fields[part]
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        if i < len(path) - 1:
            if not dataclasses.is_dataclass(default):
                raise SccError(f"{'.'.join(path[:i + 1])} of {name} is not a nested config; settings: "
                               f"{', '.join(sorted(fields))}")
            cls = type(default)
    return str(field.type), default


def _coerce(text: str, kind: str, key: str) -> Any:
    """The value `text` as the field type `kind` (its annotation text) wants; SccError naming the field."""
    low = text.strip().lower()
    if "None" in kind and low == "none":
        return None
    try:
        if kind.startswith("tuple"):
            inner = kind[kind.index("[") + 1:].partition("]")[0]
            elem = "float" if "float" in inner else "int" if "int" in inner else "str"
            return tuple(_coerce(part, elem, key) for part in text.split("|"))
        if "bool" in kind:
            if low not in BOOL_WORDS:
                raise ValueError
            return BOOL_WORDS[low]
        if "float" in kind:
            num, slash, den = low.partition("/")
            return float(num) / float(den) if slash else float(low)
        if "int" in kind:
            return int(low)
    except (ValueError, ZeroDivisionError):
        want = {"bool": "on/off", "float": "a number such as 4/255 or 0.5", "int": "an integer"}
        hint = next((v for k, v in want.items() if k in kind), kind)
        raise SccError(f"bad value {text!r} for {key} ({hint})") from None
    return text.strip()


def parse_overrides(name: str, text: str) -> tuple[dict[str, Any], str]:
    """'semantic=off:warmup.steps=1' -> ({'semantic': False, 'warmup__steps': 1}, 'semantic=off:warmup.steps=1'):
    the typed overrides of defense `name` (make_config's keyword form) and their canonical text for specs.
    SccError naming an unknown field (with the valid ones) or a value of the wrong type."""
    values, canon = {}, []
    for item in [t for t in text.split(":") if t.strip()]:
        key, eq, raw = item.partition("=")
        key = key.strip().lower()
        if not eq or not key or not raw.strip():
            raise SccError(f"bad override {item!r} for {name}: write field=value ({OVERRIDE_SYNTAX})")
        path = key.replace("__", ".").split(".")
        kind, _ = _field_type(DEFENSES[name].config_cls, path, name)
        value = _coerce(raw, kind, ".".join(path))
        values["__".join(path)] = value
        shown = ("on" if value else "off") if isinstance(value, bool) else raw.strip()
        canon.append(f"{'.'.join(path)}={shown}")
    return values, ":".join(canon)


def parse_defense(spec: str) -> tuple[str, str]:
    """'scc-latency' -> ('scc', 'latency'), 'scc:Semantic=OFF' -> ('scc', 'paper:semantic=off') after checking the
    name, the preset and every override (its field and its value); SccError listing the valid choices."""
    name, preset = split_spec(str(spec).strip())
    name = name.lower()
    base, _, overrides = preset.partition(":")
    base = base.lower()
    if name not in DEFENSES:
        raise SccError(f"unknown defense {spec!r}; choose from {', '.join(defense_specs())} (each optionally "
                       f"with config overrides: {OVERRIDE_SYNTAX})")
    if base not in PRESETS[name]:
        raise SccError(f"unknown preset {base!r} for {name}; choose from {sorted(PRESETS[name])} "
                       f"(defenses: {', '.join(defense_specs())})")
    if not overrides:
        return name, base
    values, canon = parse_overrides(name, overrides)
    make_config(name, base, **values)  # the config's own checks (ranges, view names) run now, not mid-evaluation
    return name, f"{base}:{canon}"


def parse_defenses(text: str | Sequence[str]) -> list[str]:
    """'none,ttc,scc-latency,scc:semantic=off' -> the canonical specs; one SccError naming every bad one (and
    why)."""
    specs = [d.strip() for d in (text.split(",") if isinstance(text, str) else text) if d.strip()]
    if not specs:
        raise SccError(f"no defense given; choose from {', '.join(defense_specs())} (comma-separated)")
    out, unknown, bad = [], [], []
    for spec in specs:
        try:
            out.append(spec_of(*parse_defense(spec)))
        except SccError as err:
            if split_spec(spec)[0].lower() in DEFENSES:
                bad.append(f"{spec}: {err}")
            else:
                unknown.append(spec)
    if unknown or bad:
        head = [f"unknown defense(s) {unknown}; choose from {', '.join(defense_specs())} (each optionally with "
                f"config overrides: {OVERRIDE_SYNTAX})"] if unknown else []
        raise SccError("; ".join(head + bad))
    if len(set(out)) != len(out):
        raise SccError(f"a defense is listed twice in {', '.join(out)}: each spec names one column of the report")
    return out


def make_config(name: str, preset: str = "paper", model: str = "", **overrides) -> Any:
    """The frozen config of `name` under `preset` (which may carry a spec's overrides, 'paper:semantic=off'), the
    model's overrides and the caller's (SccError on any unknown setting, all of them named)."""
    base, _, text = preset.partition(":")
    base = DEFENSES[name].aliases.get(base, base) if name in DEFENSES else base
    if name not in DEFENSES or base not in PRESETS[name]:
        parse_defense(spec_of(name, base))  # raises with the valid choices
    spec_values = parse_overrides(name, text)[0] if text else {}
    values = {**PRESETS[name][base], **MODEL_PRESETS.get(model, {}).get(name, {}), **spec_values, **overrides}
    cls = DEFENSES[name].config_cls
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted({key.partition("__")[0] for key in values} - set(fields))
    if unknown:
        raise SccError(f"{name} has no setting(s) {unknown}; settings: {sorted(fields)}")
    top, nested = {}, {}
    for key, value in values.items():
        head, _, sub = key.partition("__")
        (nested.setdefault(head, {}).__setitem__(sub, value) if sub else top.__setitem__(head, value))
    for head, sub in nested.items():
        base_cfg = top.get(head) or fields[head].default_factory()
        top[head] = dataclasses.replace(base_cfg, **sub)
    try:
        return cls(**top)
    except TypeError as err:
        raise SccError(f"bad settings for {name}: {err}") from err


def expected_passes(name: str, preset: str) -> dict | None:
    """The spec's encoder passes per image for a defense preset ({PASS_KEYS: value}), or None."""
    passes = DEFENSES[name].passes.get(preset)
    return dict(zip(PASS_KEYS, passes)) if passes else None
