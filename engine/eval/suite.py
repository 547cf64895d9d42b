"""The adaptive protocol's suite and per-batch evaluation (scc.eval.adaptive drives it; sharding runs it in
worker processes or Ray tasks): attacks through the defense, scored with the attacker's draws and fresh ones,
merged per image into rows, the worst case and AutoAttack-style sanity flags.

The suite (scc.eval.options.ADAPTIVE_ATTACKS; every PGD step size is madry_step, 2.5 eps / steps, Madry et al.):
  pgd                 PGD-50 on the summed cross-entropy, exact gradients through the defense with known draws;
                      per image it keeps the iterate that fooled the attacker's view (else the highest loss).
  apgd-ce, apgd-dlr   APGD (scc.attacks.apgd; 100 iterations, 1 restart) on the known-draws module. APGD calls
                      the model on sub-batches (x[ind]), so `KnownDraws` maps every row back to its image by matching
                      it against the batch's clean images (L_inf distance <= eps + 1e-6 to exactly one of them).
  apgd-t, fab-t       on request (not in the default suite): APGD-T (targeted DLR, 9 targets, >= 4 classes) and
                      FAB-T (9 targets, 100 iterations), AutoAttack's targeted components, on the known-draws module.
  eot-pgd             EOT-PGD, 20 steps, each step's gradient averaged over k = 8 fresh draws (an attacker who
                      does not know the draws); final iterate.
  bpda-pgd            BPDA-PGD, 50 steps: logits = classifier(x + stopgrad(Delta(x))) with the gradient of the
                      [0,1] clamp kept (zero where x + Delta sits on the box boundary); Delta with known draws.
  transfer-nocorrect  exact PGD-50 on the defense with its correction switched off, transferred (every defense
                      but none). SCC: `semantic=False` (Stages 1-2 off: the warm-up counterattack and the
                      view-averaged prediction stay, the corrective steps go; `steps=0` gives the same logits but
                      still pays for Stage 1's forward). Every other defense: its deterministic core, the
                      undefended classifier (the whole defense is the correction).
  square              Square (scc.attacks.square; L_inf, margin loss, --queries, default 1000, p schedule rescaled
                      to the budget) on the known-draws module: a black-box check for gradient masking.
  surrogate-pgd       PGD-50 with known draws through a surrogate of the defense (SURROGATES: config changes that
                      take away what hides its gradient), transferred to the defense; the iterate kept per image
                      as in pgd. DBD's surrogate averages its views' features without the two-stream boost of D
                      (boost 1) and selects views softly (`soft` 0.2: sigmoid weights on the entropies and the
                      score threshold, scc.defenses.dbd). Measured on 32 digits at 16/255, 50 steps: 3 % survive
                      against 22 % under exact PGD-20 through DBD itself (where F_0's -1.5 weight turns the
                      gradient against the attack). Only defenses with an entry in SURROGATES take it.

Which attacks fit which defense (`Suite.applies`):
  - eot-pgd needs random draws to average over: defenses without any (none, anti-adv) skip it (it would be PGD-20
    with k identical copies).
  - bpda-pgd holds the defense's pixel perturbation (record["perturbation"]) constant: for the pixel-space
    defenses (ttc, scc, anti-adv, hd, doc) that is BPDA through their sign steps, projections and clamps (HD with
    T > 2 averages the logits of T - 1 iterates; BPDA keeps the last). The feature-space defenses (dbd, agc,
    rtpt) add no pixel perturbation: their bpda-pgd would be transfer-nocorrect again, so they skip it.
  - transfer-nocorrect matters most where the defense's own correction hides the gradient: Anti-adv's pseudo-label
    is an argmax of the input's prediction (flip it on the undefended classifier and the anti-adversary then
    reinforces the wrong class), and the forward-only defenses are evaluated this way in their papers.
  - pgd / apgd on dbd and agc differentiate through every augmented view with its known draws; their bit-depth
    and JPEG views round with a straight-through gradient (BPDA inside the defense), the rest is exact.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..attacks import apgd, apgd_targeted, attack as paper_attack, fab_targeted, square
from ..attacks.adaptive import KnownDraws, bpda_objective, ce_objective, eot_objective, madry_step, sign_pgd
from ..backends import make_runner
from ..defenses import DEFENSES, Defended, defend, spec_of, split_spec
from ..draws import derive_seed
from ..errors import SccError
from ..perturbation import clip_image
from ..precision import dtype_name
from ..timing import timed_call
from .options import ADAPTIVE_ATTACKS, DEFAULT_ATTACKS, stderr

FEATURE_SPACE = ("dbd", "agc", "rtpt")  # defenses that correct features or prompts, not pixels
# surrogate-pgd: per defense, the config changes that make the attacker's surrogate (the same draws)
SURROGATES = {"dbd": {"boost": 1.0, "soft": 0.2}}


# ----------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Suite:
    """Attack budgets of the adaptive protocol (the CLI's flags set these)."""
    attacks: tuple[str, ...] = DEFAULT_ATTACKS["adaptive"]
    pgd_steps: int = 50
    apgd_steps: int = 100
    eot_steps: int = 20
    eot_k: int = 8
    bpda_steps: int = 50
    transfer_steps: int = 50
    queries: int = 1000
    targets: int = 9  # apgd-t and fab-t target classes
    fab_steps: int = 100
    checkpoints: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100)
    sanity_images: int = 32  # PGD-20 at 16/255 through each defense on the first N images (0: off)
    sanity_eps: float = 16 / 255
    sanity_steps: int = 20

    def steps_of(self, attack: str) -> int:
        return {"pgd": self.pgd_steps, "apgd-ce": self.apgd_steps, "apgd-dlr": self.apgd_steps,
                "apgd-t": self.apgd_steps, "fab-t": self.fab_steps,
                "eot-pgd": self.eot_steps, "bpda-pgd": self.bpda_steps, "transfer-nocorrect": self.transfer_steps,
                "square": self.queries, "surrogate-pgd": self.pgd_steps}[attack]

    def applies(self, attack: str, defense: str, n_classes: int) -> bool:
        """Whether `attack` runs against `defense` (a name: none, ttc, scc, ...) on an n_classes task."""
        if attack == "transfer-nocorrect":
            return defense != "none"
        if attack == "apgd-dlr":
            return n_classes >= 3
        if attack == "apgd-t":
            return n_classes >= 4
        if attack == "eot-pgd":
            return bool(DEFENSES[defense].draw_specs)
        if attack == "bpda-pgd":
            return defense not in FEATURE_SPACE
        if attack == "surrogate-pgd":
            return defense in SURROGATES
        return True


def attack_batch(attack: str, defended, x: torch.Tensor, y: torch.Tensor, keys: Sequence[int], eps: float,
                 suite: Suite, seed: int, batch_id: int) -> tuple[torch.Tensor, dict]:
    """Adversarial images for one batch (x, y, global keys) by `attack` on the defended module `defended` (whose
    seed the attacker knows for 'known-draws' attacks). `batch_id` (the batch's first global index) seeds the
    attack's own randomness, so a batch computes the same in one process or in any Ray shard."""
    gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, f"{attack}:start:{batch_id}"))
    known = KnownDraws(defended, x, keys, eps)

    def madry_pgd(objective, steps, **kw):
        return sign_pgd(objective, x, y, eps, steps, madry_step(eps, steps), generator=gen, **kw)

    info: dict = {}
    if attack == "pgd":
        adv, info = madry_pgd(ce_objective(known, y), suite.pgd_steps, keep_best=True,
                              checkpoints=[c for c in suite.checkpoints if c <= suite.pgd_steps])
    elif attack in ("apgd-ce", "apgd-dlr"):
        adv = apgd(known, x, y, eps, loss=attack.split("-")[1], steps=suite.apgd_steps,
                   seed=derive_seed(seed, f"{attack}:{batch_id}"))
    elif attack == "apgd-t":
        adv = apgd_targeted(known, x, y, eps, steps=suite.apgd_steps, targets=suite.targets,
                            seed=derive_seed(seed, f"{attack}:{batch_id}"))
    elif attack == "fab-t":  # its iterates leave the eps ball: rows go to their nearest clean image
        nearest = KnownDraws(defended, x, keys, eps, draws=known.draws, match="nearest")
        adv = fab_targeted(nearest, x, y, eps, steps=suite.fab_steps, targets=suite.targets,
                           seed=derive_seed(seed, f"{attack}:{batch_id}"))
    elif attack == "eot-pgd":
        draw_gen = torch.Generator().manual_seed(derive_seed(seed, f"eot:draws:{batch_id}"))
        draws_for = lambda rep: {k: v.to(rep.device) for k, v in
                                 defended.record.draws(rep.cpu(), defended.config, draw_gen).items()}
        adv, info = madry_pgd(eot_objective(defended, y, suite.eot_k, draws_for), suite.eot_steps)
    elif attack == "bpda-pgd":
        adv, info = madry_pgd(bpda_objective(defended, y, known.draws), suite.bpda_steps)
    elif attack == "transfer-nocorrect":
        if defended.defense == "scc":
            core = KnownDraws(defended.with_config(semantic=False), x, keys, eps, draws=known.draws)
        else:  # the whole defense is the correction: its core is the classifier it defends
            core = defended.classifier
        adv, info = madry_pgd(ce_objective(core, y), suite.transfer_steps)
    elif attack == "surrogate-pgd":
        surrogate = KnownDraws(defended.with_config(**SURROGATES[defended.defense]), x, keys, eps,
                               draws=known.draws)
        adv, info = madry_pgd(ce_objective(surrogate, y), suite.pgd_steps, keep_best=True)
    elif attack == "square":
        adv = square(known, x, y, eps, queries=suite.queries, seed=derive_seed(seed, f"square:{batch_id}"))
    else:
        raise SccError(f"unknown adaptive attack {attack!r}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    adv = clip_image(adv, x, eps)  # every attack's output inside the threat model, whatever it did
    return adv.detach(), info


class Scorer:
    """Predictions of one defense with known and fresh draws on `backend` (its tower in the defense's dtype):
    `scorer(x, keys, "known" | "fresh") -> top-1 (B,)`. The attacks always differentiate through the eager module;
    a compiled or ONNX backend is fed the same per-image draws the eager module would use."""

    def __init__(self, known: Defended, fresh: Defended, backend: str, batch_size: int):
        self.modules = {"known": known, "fresh": fresh}
        self.runner = None
        if backend != "eager":
            self.runner = make_runner(known.with_dtype(torch.float32), backend, batch_size, dtype=known.dtype)

    def __call__(self, x: torch.Tensor, keys: Sequence[int], draws: str = "known") -> torch.Tensor:
        defended = self.modules[draws]
        with torch.no_grad():
            if self.runner is None:
                return defended(x, keys=keys).argmax(1)
            if self.runner.warmup is not None:  # a compiled bucket for this chunk size, compiled once
                self.runner.warmup(min(len(x), self.runner.batch_size))
            return self.runner(x, defended.draws(x, keys)).argmax(1)


def jobs_of(defenses: Sequence[str], eps_list: Sequence[float], suite: Suite,
            n_classes: int) -> list[tuple[str | None, float, str]]:
    """The (defense label or None, eps, attack) jobs run on every batch, in order; None = the non-adaptive
    PGD-10 on the undefended classifier, kept for reference."""
    jobs = []
    for eps in eps_list:
        jobs.append((None, eps, "paper-pgd"))
        for label in defenses:
            for attack in suite.attacks:
                if suite.applies(attack, split_spec(label)[0], n_classes):
                    jobs.append((label, eps, attack))
    return jobs


def defended_pair(clf, label: str, seed: int, dtype: torch.dtype) -> tuple[Defended, Defended]:
    """A defense label's module with the attacker's (known) draws and the one with fresh draws."""
    name, preset = split_spec(label)
    return (defend(clf, name, preset=preset, seed=seed, dtype=dtype),
            defend(clf, name, preset=preset, seed=derive_seed(seed, "fresh-draws"), dtype=dtype))


def evaluate_batches(clf, defenses: Sequence[str], eps_list: Sequence[float], x_all: torch.Tensor,
                     y_all: torch.Tensor, batches: Sequence[tuple[int, int]], seed: int, suite: Suite,
                     progress: bool = True, on_batch: Callable[[dict], None] | None = None,
                     on_job: Callable[[str], None] | None = None, dtype: torch.dtype = torch.float32,
                     backend: str = "eager") -> dict:
    """Run the suite on the given batches (global (start, stop) index ranges; keys = dataset indices).

    Returns per-image results that merge across shards: {"correct": {(defense, eps, attack, draws): {index:
    bool}}, "curves": {(defense, eps, draws): {k: {index: bool}}}, "seconds": {(defense, eps, attack): [s, n]},
    "sanity": {defense: {index: bool}}, "defense_seconds": {defense: [s, n]}}.
    on_batch(part) gets each finished batch's own results (the same structure; `merge` of the parts is the
    return value); on_job(label) is called after each (batch, attack) job (a worker process reports its progress
    to the driver with it)."""
    n_classes = clf.num_classes
    modules, score = {}, {}
    largest = max(hi - lo for lo, hi in batches)
    for label in defenses:
        known, fresh = defended_pair(clf, label, seed, dtype)
        modules[label] = known
        score[label] = Scorer(known, fresh, backend, largest)

    def put(key, idx, vals):
        out["correct"].setdefault(key, {}).update({int(i): bool(v) for i, v in zip(idx, vals)})

    def tick(key, seconds, n, cpu):
        for field, value in (("seconds", seconds), ("cpu_seconds", cpu)):
            acc = out[field].setdefault(key, [0.0, 0])
            acc[0] += value
            acc[1] += n

    jobs = jobs_of(defenses, eps_list, suite, n_classes)
    parts = []
    with tqdm(total=len(batches) * len(jobs), desc="adaptive eval", disable=not progress) as bar:
        for lo, hi in batches:
            out = {"correct": {}, "curves": {}, "seconds": {}, "cpu_seconds": {}, "sanity": {}, "defense_seconds": {}}
            x, y = x_all[lo:hi], y_all[lo:hi]
            keys = list(range(lo, hi))
            # clean rows (and the defense's own time per image, on the scoring backend)
            for label in defenses:
                for draws in ("known", "fresh"):
                    t, pred = timed_call(lambda: score[label](x, keys, draws))
                    for eps in eps_list:
                        put((label, eps, "none", draws), keys, (pred == y).tolist())
                    if draws == "known":
                        out["defense_seconds"][label] = [t, len(keys)]
            for label, eps, attack in jobs:
                job = f"{attack} {label or 'clf'} eps={eps * 255:g}/255"
                bar.set_postfix_str(job)
                cpu = time.process_time()
                if label is None:
                    gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, f"paper:{lo}"))
                    t, adv = timed_call(lambda: paper_attack(clf, x, y, "pgd", eps=eps, alpha=1 / 255, steps=10,
                                                             generator=gen))
                    tick(("clf", eps, "paper-pgd"), t, len(keys), time.process_time() - cpu)
                    for other in defenses:
                        put((other, eps, "paper-pgd", None), keys, (score[other](adv, keys) == y).tolist())
                else:
                    t, (adv, info) = timed_call(lambda: attack_batch(attack, modules[label], x, y, keys, eps, suite,
                                                                     seed, lo))
                    tick((label, eps, attack), t, len(keys), time.process_time() - cpu)
                    for draws in ("known", "fresh"):
                        put((label, eps, attack, draws), keys, (score[label](adv, keys, draws) == y).tolist())
                    if attack == "pgd":
                        for k, fooled in info["fooled_at"].items():
                            out["curves"].setdefault((label, eps, "known"), {}).setdefault(k, {}).update(
                                {i: not bool(f) for i, f in zip(keys, fooled.tolist())})
                            pred = score[label]((x + info["deltas"][k]).clamp(0, 1), keys, "fresh")
                            out["curves"].setdefault((label, eps, "fresh"), {}).setdefault(k, {}).update(
                                {i: bool(v) for i, v in zip(keys, (pred == y).tolist())})
                bar.update(1)
                if on_job is not None:
                    on_job(job)
            # sanity: PGD-20 at 16/255 through each defense (known draws) on the first suite.sanity_images images
            if suite.sanity_images and lo < suite.sanity_images:
                m = min(hi, suite.sanity_images) - lo
                for label in defenses:
                    xs, ys, ks = x[:m], y[:m], keys[:m]
                    gen = torch.Generator(device=x.device).manual_seed(derive_seed(seed, f"sanity:{lo}"))
                    adv, _ = sign_pgd(ce_objective(KnownDraws(modules[label], xs, ks, suite.sanity_eps), ys), xs, ys,
                                      suite.sanity_eps, suite.sanity_steps,
                                      madry_step(suite.sanity_eps, suite.sanity_steps), generator=gen, keep_best=True)
                    out["sanity"].setdefault(label, {}).update(
                        {i: bool(v) for i, v in zip(ks, (score[label](adv, ks) == ys).tolist())})
            parts.append(out)
            if on_batch is not None:
                on_batch(out)
    return merge(parts)


# every step and query budget of the calibration runs that time the suite before the work (`estimate_cost`)
CALIBRATION = dict(pgd_steps=2, apgd_steps=2, eot_steps=2, bpda_steps=2, transfer_steps=2, queries=2, fab_steps=2)


def estimate_cost(clf, defenses: Sequence[str], eps_list: Sequence[float], x: torch.Tensor, y: torch.Tensor,
                  suite: Suite, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """{(defense label or "clf", eps, attack): (wall, CPU) seconds per image} of the full suite, from each job run
    on the images x with every budget cut to 2 steps (CALIBRATION) and scaled by its full budget: a few percent of
    the work, done before it starts. An upper bound where the real batches are larger than x."""
    small = dataclasses.replace(suite, **CALIBRATION)
    modules = {label: defend(clf, *split_spec(label), seed=seed, dtype=dtype) for label in defenses}  # known draws
    keys = list(range(len(y)))
    with torch.no_grad():
        clf(x)  # the first call's one-time costs are no attack's
    out = {}
    for label, eps, attack in jobs_of(defenses, eps_list, suite, clf.num_classes):
        cpu = time.process_time()
        if label is None:
            gen = torch.Generator(device=x.device).manual_seed(seed)
            t, _ = timed_call(lambda: paper_attack(clf, x, y, "pgd", eps=eps, alpha=1 / 255, steps=2, generator=gen))
            scale = 10 / 2
        else:
            t, _ = timed_call(lambda: attack_batch(attack, modules[label], x, y, keys, eps, small, seed, 0))
            scale = suite.steps_of(attack) / small.steps_of(attack)
        out[(label or "clf", eps, "paper-pgd" if label is None else attack)] = (
            t * scale / len(y), (time.process_time() - cpu) * scale / len(y))
    return out


def images_of(raw: dict) -> list[int]:
    """The image indices that (merged) results of evaluate_batches cover."""
    return sorted(next(iter(raw["correct"].values()), {}))


def merge(parts: Sequence[dict]) -> dict:
    """Merge evaluate_batches outputs of disjoint shards."""
    out = {"correct": {}, "curves": {}, "seconds": {}, "cpu_seconds": {}, "sanity": {}, "defense_seconds": {}}
    for p in parts:
        for key, d in p["correct"].items():
            out["correct"].setdefault(key, {}).update(d)
        for key, ks in p["curves"].items():
            for k, d in ks.items():
                out["curves"].setdefault(key, {}).setdefault(k, {}).update(d)
        for field in ("seconds", "cpu_seconds", "defense_seconds"):
            for key, (s, n) in p.get(field, {}).items():
                acc = out[field].setdefault(key, [0.0, 0])
                acc[0] += s
                acc[1] += n
        for key, d in p["sanity"].items():
            out["sanity"].setdefault(key, {}).update(d)
    return out


def plan_batches(n: int, batch_size: int, probe: int = 8) -> list[tuple[int, int]]:
    """Global (start, stop) batches: a small probe batch first (the cost estimate times every attack on it before
    the bulk of the work), then `batch_size` batches. Shards take whole batches, so a batch computes the same in
    one process and on any Ray worker."""
    first = min(probe, batch_size, n)
    return ([(0, first)] if first else []) + [(i, min(i + batch_size, n)) for i in range(first, n, batch_size)]


def accuracy_of(d: dict) -> tuple[float, int]:
    n = len(d)
    return (sum(d.values()) / n if n else float("nan")), n


def build_rows(raw: dict, defenses: Sequence[str], eps_list: Sequence[float], suite: Suite,
               backend: str = "eager", dtype: torch.dtype = torch.float32) -> list[dict]:
    """Per (defense, eps, attack, draws) rows with accuracy and standard error, plus the worst case per draws."""
    rows = []
    steps = {"none": 0, "paper-pgd": 10, **{a: suite.steps_of(a) for a in ADAPTIVE_ATTACKS}}
    for label in defenses:
        name, preset = split_spec(label)
        dsec = raw["defense_seconds"].get(label, [0.0, 1])
        for eps in eps_list:
            def cpu_of(key):
                c = raw.get("cpu_seconds", {}).get(key)
                return c and c[0] / c[1]

            def row(attack, draws, protocol, d, sec=None, n_steps=None, cpu=None):
                p, n = accuracy_of(d)
                return {"defense": name, "preset": preset, "backend": backend, "dtype": dtype_name(dtype),
                        "protocol": protocol, "draws": draws,
                        "attack": attack, "eps": eps, "steps": n_steps if n_steps is not None else steps.get(attack),
                        "accuracy": p,
                        "stderr": stderr(p, n), "n": n, "s_per_image": dsec[0] / max(dsec[1], 1),
                        "attack_s_per_image": sec, "attack_cpu_s_per_image": cpu}
            paper = raw["correct"].get((label, eps, "paper-pgd", None))
            if paper is not None:
                sec = raw["seconds"].get(("clf", eps, "paper-pgd"))
                rows.append(row("pgd", None, "paper", paper, sec and sec[0] / sec[1], n_steps=10,
                                cpu=cpu_of(("clf", eps, "paper-pgd"))))
            for draws in ("known", "fresh"):
                clean = raw["correct"][(label, eps, "none", draws)]
                rows.append({**row("none", draws, "adaptive", clean), "eps": 0.0})
                survived = dict(clean)
                for attack in suite.attacks:
                    d = raw["correct"].get((label, eps, attack, draws))
                    if d is None:
                        continue
                    sec = raw["seconds"].get((label, eps, attack))
                    rows.append(row(attack, draws, "adaptive", d, sec and sec[0] / sec[1],
                                    cpu=cpu_of((label, eps, attack))))
                    survived = {i: survived[i] and d[i] for i in survived}
                rows.append(row("worst", draws, "adaptive", survived))
    # one clean row per (defense, draws): drop duplicates made per eps
    seen, unique = set(), []
    for r in rows:
        key = (r["defense"], r["preset"], r["protocol"], r["draws"], r["attack"], r["eps"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def on_backbone(backbone: str, spec: str) -> str:
    """The column of test-time defense `spec` run on fine-tuned model `backbone`: ('fare', 'none') -> 'fare',
    ('fare', 'ttc') -> 'fare+ttc', ('fare', 'scc-latency') -> 'fare+scc-latency'."""
    return backbone if spec == "none" else f"{backbone}+{spec}"


def name_on_backbone(report: dict, backbone: str) -> dict:
    """An adaptive report whose defenses ran on fine-tuned model `backbone`, named as its columns were asked for
    ('fare', 'fare+ttc'): every row (with `backbone` and `test_time_defense`, the defense that ran), PGD curve
    and sanity entry. Call it before `sanity_flags`, which names each line by these specs."""
    for r in report.get("results", []):
        r["backbone"], r["test_time_defense"] = backbone, r["defense"]
        r["defense"] = on_backbone(backbone, r["defense"])
    for entry in (*report.get("steps_curves", []), *report.get("sanity_16", [])):
        entry["backbone"], entry["test_time_defense"] = backbone, entry["spec"]
        entry["defense"], entry["spec"] = on_backbone(backbone, entry["defense"]), on_backbone(backbone, entry["spec"])
    return report


def sanity_flags(report: dict, raw: dict | None = None) -> list[str]:
    """AutoAttack-style checks, one line each ("ok: ..." or "FLAG: ...")."""
    flags = []
    rows = [r for r in report["results"] if r["protocol"] == "adaptive"]
    label = lambda r: spec_of(r["defense"], r["preset"])
    # accuracy non-increasing in eps (worst case, per draws)
    by = {}
    for r in rows:
        if r["attack"] == "worst":
            by.setdefault((label(r), r["draws"]), []).append(r)
    bad = []
    for (lab, draws), rs in by.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        for a, b in zip(rs, rs[1:]):
            if b["accuracy"] > a["accuracy"] + 2 * max(a["stderr"], b["stderr"], 1e-9):
                bad.append(f"{lab} ({draws}) {a['accuracy']:.1%} at {a['eps'] * 255:g}/255 -> {b['accuracy']:.1%} "
                           f"at {b['eps'] * 255:g}/255")
    if len({r["eps"] for r in rows if r["attack"] == "worst"}) > 1:
        flags.append(("FLAG: accuracy rises with eps: " + "; ".join(bad)) if bad else
                     "ok: worst-case accuracy is non-increasing in eps")
    # accuracy non-increasing in steps (PGD trajectory, fresh draws; known is monotone by construction)
    bad = []
    for c in report.get("steps_curves", []):
        accs = c["accuracy"]
        for (k1, a), (k2, b) in zip(zip(c["steps"], accs), zip(c["steps"][1:], accs[1:])):
            if b > a + 2 * max(stderr(a, c["n"]), stderr(b, c["n"]), 1e-9):
                bad.append(f"{c['spec']} eps={c['eps'] * 255:g}/255 ({c['draws']}) {a:.1%} after {k1} -> "
                           f"{b:.1%} after {k2} steps")
    if report.get("steps_curves"):
        flags.append(("FLAG: accuracy rises with PGD steps: " + "; ".join(bad)) if bad else
                     "ok: PGD accuracy is non-increasing in steps (known and fresh draws)")
    # about 0% at 16/255
    for c in report.get("sanity_16", []):
        if c["accuracy"] > 0.10:
            flags.append(f"FLAG: {c['spec']} keeps {c['accuracy']:.1%} under exact PGD-{c['steps']} at "
                         f"{c['eps'] * 255:g}/255 on {c['n']} images (expected about 0%): the gradient may be masked")
        else:
            flags.append(f"ok: {c['spec']} {c['accuracy']:.1%} under exact PGD-{c['steps']} at "
                         f"{c['eps'] * 255:g}/255 ({c['n']} images)")
    # black box beating white box
    for (lab, eps, draws), rs in _group(rows, lambda r: (label(r), r["eps"], r["draws"])).items():
        sq = next((r for r in rs if r["attack"] == "square"), None)
        wb = [r for r in rs if r["attack"] in WHITE_BOX]
        if sq is None or not wb:
            continue
        best = min(wb, key=lambda r: r["accuracy"])
        if sq["accuracy"] < best["accuracy"] - 2 * max(sq["stderr"], best["stderr"], 1e-9):
            flags.append(f"FLAG: Square ({sq['accuracy']:.1%}) beats every white-box attack (best {best['attack']} "
                         f"{best['accuracy']:.1%}) on {lab} at {eps * 255:g}/255 ({draws} draws): gradient masking")
    if not any("Square" in f for f in flags) and any(r["attack"] == "square" for r in rows):
        flags.append("ok: no black-box (Square) result beats the white-box attacks")
    return flags


WHITE_BOX = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "eot-pgd", "bpda-pgd")


def _group(rows, key):
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def curves_of(raw: dict) -> list[dict]:
    out = []
    for (label, eps, draws), ks in sorted(raw["curves"].items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        steps = sorted(ks)
        accs = [accuracy_of(ks[k])[0] for k in steps]
        out.append({"defense": split_spec(label)[0], "spec": label, "eps": eps, "draws": draws, "attack": "pgd",
                    "steps": steps, "accuracy": accs, "n": accuracy_of(ks[steps[0]])[1] if steps else 0})
    return out
