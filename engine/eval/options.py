"""What the evaluation protocols accept, parsed once for `scc eval`, `scc demo` and the Python API: attack
names per protocol, attack radii, and the statistics every report row carries.

    parse_attacks("pgd,autoattack", "paper")     -> ["pgd", "autoattack"]
    parse_attacks(None, "adaptive")              -> the default adaptive suite
    parse_eps_list("1/255,4/255")                -> [0.0039..., 0.0156...]
"""
from __future__ import annotations

import math
from typing import Sequence

from ..attacks.autoattack import COMPONENTS, STANDARD, TTC_SUBSET
from ..errors import SccError

# Attacks on the undefended classifier (the TTC protocol): PGD-10 / CW-10 (--steps), PGD-100, AutoAttack's components
# one at a time, and two AutoAttack sequences (each component on the images the earlier ones left correct):
# "apgd" = TTC's subset (APGD-CE, APGD-DLR), "autoattack" = the standard version (APGD-CE, APGD-T, FAB-T, Square).
SEQUENCES = {"apgd": TTC_SUBSET, "autoattack": STANDARD}
PAPER_ATTACKS = ("pgd", "cw", "pgd100") + COMPONENTS + tuple(SEQUENCES)
# Attacks through the defense (scc.eval.adaptive): exact PGD-50, APGD, EOT, BPDA, transfer, Square, PGD through a
# surrogate that drops what hides the gradient (DBD); apgd-t and fab-t on request (not in the default suite).
ADAPTIVE_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "eot-pgd", "bpda-pgd", "transfer-nocorrect",
                    "square", "surrogate-pgd")
DEFAULT_ATTACKS = {"paper": ("pgd",),
                   "adaptive": tuple(a for a in ADAPTIVE_ATTACKS if a not in ("apgd-t", "fab-t"))}
NON_ADAPTIVE_WARNING = ("warning: every attack here was made on the undefended classifier and never saw the defense, "
                        "so this is not a robustness claim; for one run `scc eval --protocol adaptive` (attacks "
                        "through the defense, known and fresh draws)")


def describe_attacks(protocol: str) -> str:
    """The attack names of `protocol` for help texts and errors."""
    if protocol == "paper":
        return (", ".join(PAPER_ATTACKS[:-2]) + ", apgd (= TTC's AutoAttack subset: " + "+".join(TTC_SUBSET)
                + "), autoattack (= standard AutoAttack: " + "+".join(STANDARD) + ")")
    return ", ".join(ADAPTIVE_ATTACKS)


def parse_attacks(text: str | Sequence[str] | None, protocol: str) -> list[str]:
    """Attack names of `protocol` ("paper" | "adaptive") from a comma-separated string (None: the protocol's
    default; "none" alone: no attack, clean accuracy only). One SccError names every unknown attack."""
    known = PAPER_ATTACKS if protocol == "paper" else ADAPTIVE_ATTACKS
    if text is None:
        return list(DEFAULT_ATTACKS[protocol])
    names = [a.strip().lower() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    out, bad = [], []
    for name in names:
        if name == "none":
            continue
        if name not in known:
            bad.append(name)
        elif name not in out:
            out.append(name)
    if bad:
        raise SccError(f"unknown {protocol}-protocol attack(s) {bad}; choose from {describe_attacks(protocol)} "
                       "or none")
    return out


def stderr(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n images (binomial)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def parse_eps(text: str) -> float:
    """An attack radius in [0,1] pixel units, written so that its unit is never guessed:

    - a fraction of 255 levels: `4/255` (any `a/b`);
    - a pixel fraction below 1 with a decimal point: `0.0157`;
    - `0` (no perturbation).
    Bare integers (`4`) and values >= 1 (`1.0`) are refused with a hint (write 4/255); so are negative values
    (on the command line a value starting with '-' needs '=': `--eps=-4/255`, which is then refused).
    """
    text = str(text).strip()
    try:
        if "/" in text:
            num, den = text.split("/")
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise SccError(f"bad eps {text!r}: write a fraction of 255 levels like 4/255, or a pixel fraction "
                       "below 1 like 0.0157") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SccError(f"bad eps {text!r}: write e.g. 4/255")
    if value < 0:
        raise SccError(f"eps must be >= 0, got {text}: an attack radius cannot be negative")
    if "/" not in text and value != 0:
        if value >= 1 or "." not in text:
            levels = value if value >= 1 else value * 255
            raise SccError(f"ambiguous eps {text!r}: write {levels:g}/255 for {levels:g} of 255 levels, or a pixel "
                           "fraction below 1 with a decimal point (e.g. 0.0157)")
    if value > 1:
        raise SccError(f"eps must be in [0,1] pixel units, got {text} = {value:.4g}")
    return value




def parse_eps_list(text: str) -> list[float]:
    """Comma-separated radii (see parse_eps); one SccError naming every bad value."""
    values, bad = [], []
    for part in str(text).split(","):
        try:
            values.append(parse_eps(part))
        except SccError as err:
            bad.append(str(err))
    if bad:
        raise SccError("; ".join(bad))
    if not values:
        raise SccError("no attack radius given; e.g. --eps 1/255,4/255")
    return values
