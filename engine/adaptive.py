"""Robustness under an adaptive attacker (issue 9): attacks that see the defense, scored with the attacker's draws
and with fresh ones, the per-image worst case, sanity flags, and the report (JSON, Markdown, PNG).

    report = scc.adaptive.evaluate(model="scc-tiny-digits", dataset="digits",
                                   defenses=["none", "ttc", "scc"], eps_list=[4 / 255], n_images=100, seed=0)
    scc.adaptive.write_report(report, "out/")        # report.json, report.md, acc_vs_eps.png, acc_vs_steps.png

Threat models (the `protocol` and `draws` fields of every row):
  paper     non-adaptive: adversarial images made on the undefended classifier (scc.evaluate.run); the attack
            never sees the defense, so these numbers are not a robustness claim.
  adaptive  the attack runs through the `Defended` module (white box: exact gradients through the defense's own
            gradient steps, or black box: Square), scored
              known  with the draws the attacker used: the defense's seed and the images' keys (the worst case,
                     a leaked seed; for attacks that do not use the draws, EOT and Square's fresh queries, the
                     defense's own seed);
              fresh  with a new seed at evaluation (a secret the attacker never saw; with a fixed --seed it is
                     derived from it so that runs and shards are reproducible).
  worst     per image, per draws: robust only if it is correct on the clean image and survived every attack.

The adaptive suite (ADAPTIVE_ATTACKS; every step size is 2.5 eps / steps, Madry et al.):
  pgd                 PGD-50 on the summed cross-entropy, exact gradients through the defense with known draws;
                      per image it keeps the iterate that fooled the attacker's view (else the highest loss).
  apgd-ce, apgd-dlr   torchattacks' APGD (100 iterations, 1 restart) on the known-draws module. APGD calls the
                      model on sub-batches (x[ind]), so `KnownDraws` maps every row back to its image by matching
                      it against the batch's clean images (L_inf distance <= eps + 1e-6 to exactly one of them);
                      this keeps the library's implementation unchanged.
  eot-pgd             EOT-PGD, 20 steps, each step's gradient averaged over k = 8 fresh draws (an attacker who
                      does not know the draws); final iterate.
  bpda-pgd            BPDA-PGD, 50 steps: logits = classifier(x + stopgrad(Delta(x))) with the gradient of the
                      [0,1] clamp kept (zero where x + Delta sits on the box boundary); Delta with known draws.
  transfer-nocorrect  SCC only: exact PGD-50 on the same defense with `semantic=False` (Stages 1-2 off: the
                      warm-up counterattack and the view-averaged prediction stay, the corrective steps go;
                      `steps=0` gives the same logits but still pays for Stage 1's forward), transferred.
  square              torchattacks.Square (L_inf, margin loss, --queries, default 1000) on the known-draws
                      module: a black-box check for gradient masking.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .draws import image_seed
from .models import SccError
from .views import project, sign_step

ADAPTIVE_ATTACKS = ("pgd", "apgd-ce", "apgd-dlr", "eot-pgd", "bpda-pgd", "transfer-nocorrect", "square")
PAPER_ATTACKS = ("pgd", "cw", "apgd-ce", "apgd-dlr", "pgd100")
ATTACK_NAMES = ("pgd", "cw", "apgd-ce", "apgd-dlr", "pgd100", "eot-pgd", "bpda-pgd", "transfer-nocorrect",
                "square", "worst")
from .evaluate import NON_ADAPTIVE_WARNING  # noqa: E402  (re-exported: the one warning line)


# ----------------------------------------------------------------------------------------------------------
# Known draws: each row of any (sub-)batch gets its own image's draws
# ----------------------------------------------------------------------------------------------------------
class KnownDraws(nn.Module):
    """The defended module with the draws of a batch of clean images x0 (B, 3, H, W) with `keys` fixed: every call
    on adversarial images (any subset, any order, each within eps of one x0 row) uses that row's draws.

    Rows are matched by L_inf distance: a row belongs to the clean image within eps + 1e-6 of it; none or several
    such images is an error (SccError) rather than a silent wrong guess. `calls` counts forward calls."""

    def __init__(self, defended: nn.Module, x0: torch.Tensor, keys: Sequence[Hashable], eps: float,
                 draws: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.defended = defended
        self.x0 = x0.detach()
        self.keys = list(keys)
        self.eps = float(eps)
        self.draws = defended.draws(x0, self.keys) if draws is None else draws
        self.calls = 0
        self.last_rows: torch.Tensor | None = None

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """Index (n,) into x0 of each row of x (n, 3, H, W)."""
        a, b = x.detach().flatten(1), self.x0.flatten(1)
        dist = torch.stack([(row[None] - b).abs().amax(1) for row in a]) if len(a) else a.new_zeros((0, len(b)))
        hit = dist <= self.eps + 1e-6
        count = hit.sum(1)
        if bool((count != 1).any()):
            bad = (count != 1).nonzero().flatten().tolist()[:5]
            raise SccError(f"KnownDraws: rows {bad} are within eps={self.eps:.5f} of {count[bad].tolist()} clean "
                           "images (need exactly one): cannot tell which image's draws to use")
        return hit.float().argmax(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows_of(x)
        self.calls += 1
        self.last_rows = rows
        return self.defended(x, draws={k: v[rows] for k, v in self.draws.items()})


# ----------------------------------------------------------------------------------------------------------
# The sign-gradient PGD loop every white-box attack here shares
# ----------------------------------------------------------------------------------------------------------
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def start_of(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    """The uniform random start of scc.attacks.attack (same draws from the same generator)."""
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    return project(eps * start, x, eps)


def sign_pgd(objective: Objective, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
             alpha: float | None = None, generator: torch.Generator | None = None, keep_best: bool = False,
             checkpoints: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
    """L_inf PGD with a uniform random start: delta <- Pi(delta + alpha sign(grad sum_b loss_b)).

    objective(x_adv) -> (per-image loss (B,), logits (B, C) of the attacker's view or None); the gradient is the
    autograd gradient of the summed loss. keep_best: per image, return the iterate that fooled the attacker's
    view (first such), else the one with the highest loss; `info["fooled_at"]` then holds, per checkpoint k,
    the images fooled within the first k evaluated iterates, and `info["deltas"]` the kept delta at k.
    Without keep_best the final iterate is returned."""
    alpha = 2.5 * eps / steps if alpha is None else alpha
    delta = start_of(x, eps, generator)
    best, best_score = delta.clone(), torch.full((x.shape[0],), -math.inf, device=x.device, dtype=torch.float64)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    info: dict = {"fooled_at": {}, "deltas": {}}

    def track(d, loss, logits, k):
        nonlocal best, best_score, fooled
        if not keep_best or logits is None:
            return
        wrong = logits.argmax(1) != y
        score = loss.detach().double() + 1e6 * wrong.double()
        better = (score > best_score) & ~fooled  # a fooled image keeps its first fooling iterate
        best = torch.where(better.view(-1, 1, 1, 1), d.detach(), best)
        best_score = torch.where(better, score, best_score)
        fooled = fooled | wrong
        if k in checkpoints:
            info["fooled_at"][k] = fooled.clone()
            info["deltas"][k] = best.clone()

    for k in range(steps):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss, logits = objective(x + d)
            grad, = torch.autograd.grad(loss.sum(), d)
        track(d, loss, logits, k)
        delta = sign_step(delta.detach(), grad, x, alpha, eps)
    if keep_best:
        with torch.no_grad():
            loss, logits = objective(x + delta)
        track(delta, loss, logits, steps)
        return (x + best).detach(), info
    return (x + delta).detach(), info


def ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    def objective(xa):
        logits = model(xa)
        return F.cross_entropy(logits, y, reduction="none"), logits
    return objective


def eot_objective(defended: nn.Module, y: torch.Tensor, k: int,
                  draws_for: Callable[[torch.Tensor], dict]) -> Objective:
    """Mean cross-entropy over k draws per image: the k copies go through the defense in one batch (B*k rows,
    copy-major); draws_for(x_rep) gives that batch's draws (fresh random draws for an attacker who does not
    know them). With k = 1 and the known draws this is the exact objective."""
    def objective(xa):
        B = xa.shape[0]
        rep = xa.repeat(k, 1, 1, 1)
        logits = defended(rep, draws=draws_for(rep))
        loss = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, B).mean(0)
        return loss, (logits if k == 1 else None)
    return objective


def bpda_objective(defended: nn.Module, y: torch.Tensor, draws: dict | None, keys: Sequence[Hashable] | None = None,
                   clamp_grad: bool = True) -> Objective:
    """BPDA with the corrective perturbation Delta(x) held constant: logits = classifier(x + stopgrad(Delta(x))).

    clamp_grad=True keeps the derivative of the [0,1] box clamp: d(x + Delta)/dx = 0 where x + Delta sits on
    the box boundary (the defense's projection pinned it there), 1 elsewhere. clamp_grad=False is identity BPDA
    (the gradient passes everywhere), which under-reports what exact gradients find."""
    def objective(xa):
        with torch.no_grad():
            pert = defended.perturbation(xa.detach(), draws=draws, keys=keys)
        z = (xa.detach() + pert).clamp(0, 1)
        free = ((z > 0) & (z < 1)).to(xa.dtype) if clamp_grad else torch.ones_like(z)
        logits = defended.classifier(z + (xa - xa.detach()) * free)
        return F.cross_entropy(logits, y, reduction="none"), logits
    return objective


# ----------------------------------------------------------------------------------------------------------
# The suite
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Suite:
    """Attack budgets of the adaptive protocol (the CLI's flags set these)."""
    attacks: tuple[str, ...] = ADAPTIVE_ATTACKS
    pgd_steps: int = 50
    apgd_steps: int = 100
    eot_steps: int = 20
    eot_k: int = 8
    bpda_steps: int = 50
    transfer_steps: int = 50
    queries: int = 1000
    checkpoints: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100)
    sanity_images: int = 32  # PGD-20 at 16/255 through each defense on the first N images (0: off)
    sanity_eps: float = 16 / 255
    sanity_steps: int = 20

    def steps_of(self, attack: str) -> int:
        return {"pgd": self.pgd_steps, "apgd-ce": self.apgd_steps, "apgd-dlr": self.apgd_steps,
                "eot-pgd": self.eot_steps, "bpda-pgd": self.bpda_steps, "transfer-nocorrect": self.transfer_steps,
                "square": self.queries}[attack]

    def applies(self, attack: str, defense: str, n_classes: int) -> bool:
        """Whether `attack` runs against `defense` (a name: none, ttc, scc, ...) on an n_classes task."""
        if attack == "transfer-nocorrect":
            return defense == "scc"
        if attack == "apgd-dlr":
            return n_classes >= 3
        return True


def derived_seed(seed: int, what: str) -> int:
    """A 63-bit seed for one purpose (an attack's random start on one batch, the fresh draws, ...)."""
    return image_seed(seed, what)


def attack_batch(attack: str, defended, x: torch.Tensor, y: torch.Tensor, keys: Sequence[int], eps: float,
                 suite: Suite, seed: int, batch_id: int) -> tuple[torch.Tensor, dict]:
    """Adversarial images for one batch (x, y, global keys) by `attack` on the defended module `defended` (whose
    seed the attacker knows for 'known-draws' attacks). `batch_id` (the batch's first global index) seeds the
    attack's own randomness, so a batch computes the same in one process or in any Ray shard."""
    gen = torch.Generator(device=x.device).manual_seed(derived_seed(seed, f"{attack}:start:{batch_id}"))
    known = KnownDraws(defended, x, keys, eps)
    info: dict = {}
    if attack == "pgd":
        adv, info = sign_pgd(ce_objective(known, y), x, y, eps, suite.pgd_steps, generator=gen, keep_best=True,
                             checkpoints=[c for c in suite.checkpoints if c <= suite.pgd_steps])
    elif attack in ("apgd-ce", "apgd-dlr"):
        import torchattacks

        atk = torchattacks.APGD(known, norm="Linf", eps=eps, steps=suite.apgd_steps, n_restarts=1,
                                loss=attack.split("-")[1], seed=derived_seed(seed, f"{attack}:{batch_id}") % 2**31)
        adv = atk(x, y)
    elif attack == "eot-pgd":
        draw_gen = torch.Generator().manual_seed(derived_seed(seed, f"eot:draws:{batch_id}"))
        draws_for = lambda rep: {k: v.to(rep.device) for k, v in
                                 defended.spec.draws(rep.cpu(), defended.config, draw_gen).items()}
        adv, info = sign_pgd(eot_objective(defended, y, suite.eot_k, draws_for), x, y, eps, suite.eot_steps,
                             generator=gen)
    elif attack == "bpda-pgd":
        adv, info = sign_pgd(bpda_objective(defended, y, known.draws), x, y, eps, suite.bpda_steps, generator=gen)
    elif attack == "transfer-nocorrect":
        from .defenses import Defended

        surrogate = Defended(defended.classifier, defended.defense,
                             dataclasses.replace(defended.config, semantic=False), seed=defended.seed,
                             preset=defended.preset)
        surrogate._secret = defended._secret  # the same draws (a leaked seed)
        sknown = KnownDraws(surrogate, x, keys, eps, draws=known.draws)
        adv, info = sign_pgd(ce_objective(sknown, y), x, y, eps, suite.transfer_steps, generator=gen)
    elif attack == "square":
        import torchattacks

        atk = torchattacks.Square(known, norm="Linf", eps=eps, n_queries=suite.queries, n_restarts=1,
                                  seed=derived_seed(seed, f"square:{batch_id}") % 2**31, loss="margin")
        adv = atk(x, y)
    else:
        raise SccError(f"unknown adaptive attack {attack!r}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)  # never trust a library's projection
    return adv.detach(), info


def predict(defended, x: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return defended(x, keys=keys).argmax(1)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: batches -> per-image correctness -> rows
# ----------------------------------------------------------------------------------------------------------
def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def jobs_of(defenses: Sequence[str], eps_list: Sequence[float], suite: Suite,
            n_classes: int) -> list[tuple[str | None, float, str]]:
    """The (defense spec or None, eps, attack) jobs run on every batch, in order; None = the non-adaptive
    PGD-10 on the undefended classifier, kept for reference."""
    from .defenses import split_defense_name

    jobs = []
    for eps in eps_list:
        jobs.append((None, eps, "paper-pgd"))
        for spec in defenses:
            for attack in suite.attacks:
                if suite.applies(attack, split_defense_name(spec)[0], n_classes):
                    jobs.append((spec, eps, attack))
    return jobs


def evaluate_batches(clf, defenses: Sequence[str], eps_list: Sequence[float], x_all: torch.Tensor,
                     y_all: torch.Tensor, batches: Sequence[tuple[int, int]], seed: int, suite: Suite,
                     progress: bool = True, on_first: Callable[[dict], None] | None = None,
                     on_job: Callable[[str], None] | None = None) -> dict:
    """Run the suite on the given batches (global (start, stop) index ranges; keys = dataset indices).

    Returns per-image results that merge across shards: {"correct": {(defense, eps, attack, draws): {index:
    bool}}, "curves": {(defense, eps, draws): {k: {index: bool}}}, "seconds": {(defense, eps, attack): [s, n]},
    "sanity": {defense: {index: bool}}, "defense_seconds": {defense: [s, n]}}.
    on_first(estimates) is called once after the first batch of every attack has run (cost estimate); on_job(label)
    after each (batch, attack) job (a worker process reports its progress to the driver with it)."""
    from .attacks import attack as paper_attack
    from .defenses import defend, split_defense_name
    from .timing import timed_call

    n_classes = clf.num_classes
    out = {"correct": {}, "curves": {}, "seconds": {}, "cpu_seconds": {}, "sanity": {}, "defense_seconds": {}}
    put = lambda key, idx, vals: out["correct"].setdefault(key, {}).update(
        {int(i): bool(v) for i, v in zip(idx, vals)})
    defended_all = {}
    for spec in defenses:
        name, preset = split_defense_name(spec)
        known_d = defend(clf, name, preset=preset, seed=seed)
        fresh_d = defend(clf, name, preset=preset, seed=derived_seed(seed, "fresh-draws"))
        defended_all[spec] = (known_d, fresh_d)

    def tick(key, seconds, n, cpu):
        s = out["seconds"].setdefault(key, [0.0, 0])
        s[0] += seconds
        s[1] += n
        c = out["cpu_seconds"].setdefault(key, [0.0, 0])
        c[0] += cpu
        c[1] += n

    jobs = jobs_of(defenses, eps_list, suite, n_classes)
    first_done = False
    order = [(b, j) for b in range(len(batches)) for j in jobs]
    bar = tqdm(total=len(order), desc="adaptive eval", disable=not progress)
    for b, (lo, hi) in enumerate(batches):
        x, y = x_all[lo:hi], y_all[lo:hi]
        keys = list(range(lo, hi))
        idx = keys
        # clean rows (and the defense's own time per image)
        for spec in defenses:
            known_d, fresh_d = defended_all[spec]
            for draws, d in (("known", known_d), ("fresh", fresh_d)):
                t, pred = timed_call(lambda: predict(d, x, keys))
                for eps in eps_list:
                    put((spec, eps, "none", draws), idx, (pred == y).tolist())
                if draws == "known":
                    s = out["defense_seconds"].setdefault(spec, [0.0, 0])
                    s[0] += t
                    s[1] += len(keys)
        for spec, eps, attack in jobs:
            label = f"{attack} {spec or 'clf'} eps={eps * 255:g}/255"
            bar.set_postfix_str(label)
            if spec is None:
                gen = torch.Generator(device=x.device).manual_seed(derived_seed(seed, f"paper:{lo}"))
                cpu = time.process_time()
                t, adv = timed_call(lambda: paper_attack(clf, x, y, "pgd", eps=eps, alpha=1 / 255, steps=10,
                                                         generator=gen))
                tick(("clf", eps, "paper-pgd"), t, len(keys), time.process_time() - cpu)
                for s2 in defenses:
                    put((s2, eps, "paper-pgd", None), idx, (predict(defended_all[s2][0], adv, keys) == y).tolist())
            else:
                known_d, fresh_d = defended_all[spec]
                cpu = time.process_time()
                t, (adv, info) = timed_call(lambda: attack_batch(attack, known_d, x, y, keys, eps, suite, seed, lo))
                tick((spec, eps, attack), t, len(keys), time.process_time() - cpu)
                put((spec, eps, attack, "known"), idx, (predict(known_d, adv, keys) == y).tolist())
                put((spec, eps, attack, "fresh"), idx, (predict(fresh_d, adv, keys) == y).tolist())
                if attack == "pgd":
                    for k, fooled in info["fooled_at"].items():
                        out["curves"].setdefault((spec, eps, "known"), {}).setdefault(k, {}).update(
                            {i: not bool(f) for i, f in zip(idx, fooled.tolist())})
                        pred = predict(fresh_d, (x + info["deltas"][k]).clamp(0, 1), keys)
                        out["curves"].setdefault((spec, eps, "fresh"), {}).setdefault(k, {}).update(
                            {i: bool(v) for i, v in zip(idx, (pred == y).tolist())})
            bar.update(1)
            if on_job is not None:
                on_job(label)
        # sanity: PGD-20 at 16/255 through each defense (known draws) on the first suite.sanity_images images
        if suite.sanity_images and lo < suite.sanity_images:
            m = min(hi, suite.sanity_images) - lo
            for spec in defenses:
                known_d = defended_all[spec][0]
                xs, ys, ks = x[:m], y[:m], keys[:m]
                gen = torch.Generator(device=x.device).manual_seed(derived_seed(seed, f"sanity:{lo}"))
                adv, _ = sign_pgd(ce_objective(KnownDraws(known_d, xs, ks, suite.sanity_eps), ys), xs, ys,
                                  suite.sanity_eps, suite.sanity_steps, generator=gen, keep_best=True)
                out["sanity"].setdefault(spec, {}).update(
                    {i: bool(v) for i, v in zip(ks, (predict(known_d, adv, ks) == ys).tolist())})
        if not first_done and on_first is not None:
            first_done = True
            on_first({key: (s / n, out["cpu_seconds"][key][0] / n) for key, (s, n) in out["seconds"].items()})
    bar.close()
    return out


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


def _acc(d: dict) -> tuple[float, int]:
    n = len(d)
    return (sum(d.values()) / n if n else float("nan")), n


def build_rows(raw: dict, defenses: Sequence[str], eps_list: Sequence[float], suite: Suite) -> list[dict]:
    """Per (defense, eps, attack, draws) rows with accuracy and standard error, plus the worst case per draws."""
    from .defenses import split_defense_name

    rows = []
    steps = {"none": 0, "paper-pgd": 10, **{a: suite.steps_of(a) for a in ADAPTIVE_ATTACKS}}
    for spec in defenses:
        name, preset = split_defense_name(spec)
        dsec = raw["defense_seconds"].get(spec, [0.0, 1])
        for eps in eps_list:
            def cpu_of(key):
                c = raw.get("cpu_seconds", {}).get(key)
                return c and c[0] / c[1]

            def row(attack, draws, protocol, d, sec=None, n_steps=None, cpu=None):
                p, n = _acc(d)
                return {"defense": name, "preset": preset, "backend": "eager", "protocol": protocol, "draws": draws,
                        "attack": attack, "eps": eps, "steps": n_steps if n_steps is not None else steps.get(attack),
                        "accuracy": p,
                        "stderr": stderr(p, n), "n": n, "seconds_per_image": dsec[0] / max(dsec[1], 1),
                        "attack_seconds_per_image": sec, "attack_cpu_seconds_per_image": cpu}
            paper = raw["correct"].get((spec, eps, "paper-pgd", None))
            if paper is not None:
                sec = raw["seconds"].get(("clf", eps, "paper-pgd"))
                rows.append(row("pgd", None, "paper", paper, sec and sec[0] / sec[1], n_steps=10,
                                cpu=cpu_of(("clf", eps, "paper-pgd"))))
            for draws in ("known", "fresh"):
                clean = raw["correct"][(spec, eps, "none", draws)]
                rows.append({**row("none", draws, "adaptive", clean), "eps": 0.0})
                survived = dict(clean)
                for attack in suite.attacks:
                    d = raw["correct"].get((spec, eps, attack, draws))
                    if d is None:
                        continue
                    sec = raw["seconds"].get((spec, eps, attack))
                    rows.append(row(attack, draws, "adaptive", d, sec and sec[0] / sec[1],
                                    cpu=cpu_of((spec, eps, attack))))
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


def sanity_flags(report: dict, raw: dict | None = None) -> list[str]:
    """AutoAttack-style checks, one line each ("ok: ..." or "FLAG: ...")."""
    flags = []
    rows = [r for r in report["results"] if r["protocol"] == "adaptive"]
    label = lambda r: r["defense"] + ("" if r["preset"] == "paper" else f"-{r['preset']}")
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
                bad.append(f"{c['defense']} eps={c['eps'] * 255:g}/255 ({c['draws']}) {a:.1%} after {k1} -> "
                           f"{b:.1%} after {k2} steps")
    if report.get("steps_curves"):
        flags.append(("FLAG: accuracy rises with PGD steps: " + "; ".join(bad)) if bad else
                     "ok: PGD accuracy is non-increasing in steps (known and fresh draws)")
    # about 0% at 16/255
    for c in report.get("sanity_16", []):
        if c["accuracy"] > 0.10:
            flags.append(f"FLAG: {c['defense']} keeps {c['accuracy']:.1%} under exact PGD-{c['steps']} at "
                         f"{c['eps'] * 255:g}/255 on {c['n']} images (expected about 0%): the gradient may be masked")
        else:
            flags.append(f"ok: {c['defense']} {c['accuracy']:.1%} under exact PGD-{c['steps']} at "
                         f"{c['eps'] * 255:g}/255 ({c['n']} images)")
    # black box beating white box
    for (lab, eps, draws), rs in _group(rows, lambda r: (label(r), r["eps"], r["draws"])).items():
        sq = next((r for r in rs if r["attack"] == "square"), None)
        wb = [r for r in rs if r["attack"] in ("pgd", "apgd-ce", "apgd-dlr", "eot-pgd", "bpda-pgd")]
        if sq is None or not wb:
            continue
        best = min(wb, key=lambda r: r["accuracy"])
        if sq["accuracy"] < best["accuracy"] - 2 * max(sq["stderr"], best["stderr"], 1e-9):
            flags.append(f"FLAG: Square ({sq['accuracy']:.1%}) beats every white-box attack (best {best['attack']} "
                         f"{best['accuracy']:.1%}) on {lab} at {eps * 255:g}/255 ({draws} draws): gradient masking")
    if not any("Square" in f for f in flags) and any(r["attack"] == "square" for r in rows):
        flags.append("ok: no black-box (Square) result beats the white-box attacks")
    return flags


def _group(rows, key):
    out = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def curves_of(raw: dict) -> list[dict]:
    out = []
    for (spec, eps, draws), ks in sorted(raw["curves"].items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        steps = sorted(ks)
        accs = [_acc(ks[k])[0] for k in steps]
        out.append({"defense": spec, "eps": eps, "draws": draws, "attack": "pgd", "steps": steps, "accuracy": accs,
                    "n": _acc(ks[steps[0]])[1] if steps else 0})
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def evaluate(model: str = "scc-tiny-digits", pretrained: str | None = None, dataset: str = "digits",
             defenses: Sequence[str] = ("none", "ttc", "scc"), eps_list: Sequence[float] = (4 / 255,),
             n_images: int | None = None, batch_size: int = 64, device: str = "cpu", seed: int = 0,
             suite: Suite | None = None, progress: bool = True, templates: Sequence[str] | None = None,
             ray_address: str | None = None, log: Callable[[str], None] = print, workers: int = 1,
             threads: int | None = None) -> dict:
    """The adaptive protocol end to end; returns the JSON-ready report (see the module docstring)."""
    from .data import classifier_for, load_dataset
    from .env import hardware, versions
    from .models import image_size_of

    suite = suite or Suite()
    unknown = [a for a in suite.attacks if a not in ADAPTIVE_ATTACKS]
    if unknown:
        raise SccError(f"unknown adaptive attack(s) {unknown}; choose from {', '.join(ADAPTIVE_ATTACKS)}")
    data = load_dataset(dataset, image_size_of(model), n_images)
    clf = classifier_for(data, model, pretrained, templates, device)
    x_all, y_all = data.images.to(device), data.targets.to(device)
    if workers < 1:
        raise SccError(f"workers must be a positive number of processes, got {workers!r}")
    if workers > 1 and not ray_address:  # batches small enough that every worker gets several: the pool balances
        batch_size = max(1, min(batch_size, math.ceil(len(y_all) / (2 * workers))))
    batches = plan_batches(len(y_all), batch_size)
    started = time.perf_counter()

    def estimate(per_image: dict) -> None:
        n = len(y_all)
        lines = [f"estimated cost (timed on a first batch of {batches[0][1] - batches[0][0]} images, extrapolated to "
                 f"{n}; an upper bound: larger batches cost less per image):"]
        total = 0.0
        for (spec, eps, attack), (spi, cpu) in sorted(per_image.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"  {attack:<19} {spec:<12} eps={eps * 255:g}/255  {spi:8.3f} s/image ({cpu:.3f} CPU s)"
                         f"  ~{spi * n:7.0f} s")
            total += spi * n
        if workers > 1 and not ray_address:
            lines.append(f"  total ~{total / 60:.1f} min of attack time in one process; ~{total / 60 / workers:.1f} "
                         f"min of wall time over {workers} worker processes ({threads or 1} thread(s) each)")
        else:
            lines.append(f"  total ~{total / 60:.1f} min of attack time on {torch.get_num_threads()} thread(s)"
                         + (" (split over the Ray workers)" if ray_address else ""))
        log("\n".join(lines))

    # what a worker process or Ray task needs to rebuild the classifier and images (loaded above: fail fast here)
    load_kw = dict(model=model, pretrained=pretrained, dataset=dataset, n_images=n_images, templates=templates,
                   device=device)
    if ray_address:
        raw = _run_ray(ray_address, load_kw, defenses, eps_list, batches, seed, suite, progress, estimate)
    elif workers > 1:
        n_jobs = len(jobs_of(defenses, eps_list, suite, clf.num_classes))
        raw = _run_local(workers, load_kw, defenses, eps_list, batches, seed, suite, progress, estimate, n_jobs,
                         threads or 1)
    else:
        raw = evaluate_batches(clf, defenses, eps_list, x_all, y_all, batches, seed, suite, progress, estimate)
    report = {"protocol": "adaptive", "model": model, "pretrained": pretrained, "dataset": data.name,
              "n_images": len(y_all), "device": str(device), "seed": seed,
              "fresh_seed": "derived from seed (blake2b of seed and 'fresh-draws'); never seen by the attacker",
              "threads": (threads or 1) if workers > 1 and not ray_address else torch.get_num_threads(),
              "hardware": hardware(device), "versions": _versions(versions),
              "batch_size": batch_size, "ray": ray_address, "workers": 1 if ray_address else workers,
              "wall_seconds": time.perf_counter() - started,
              "suite": dataclasses.asdict(suite),
              "results": build_rows(raw, defenses, eps_list, suite), "steps_curves": curves_of(raw),
              "sanity_16": [{"defense": s, "eps": suite.sanity_eps, "steps": suite.sanity_steps,
                             "accuracy": _acc(d)[0], "n": _acc(d)[1]} for s, d in raw["sanity"].items()]}
    report["sanity"] = sanity_flags(report)
    return report


def _versions(versions) -> dict:
    v = versions()
    import importlib.metadata as md

    for pkg in ("torchattacks", "ray", "matplotlib"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


# ----------------------------------------------------------------------------------------------------------
# Ray: whole batches per task, so every batch is computed exactly as in one process
# ----------------------------------------------------------------------------------------------------------
def _shard_task(load_kw: dict, defenses, eps_list, batches, seed, suite_dict, threads: int = 1,
                ticks=None) -> dict:
    """One worker's share (Ray task or local process): whole batches, computed exactly as in one process.
    `ticks`: a queue that gets one label per finished (batch, attack) job (local workers' progress bar)."""
    torch.set_num_threads(threads)
    from .data import classifier_for, load_dataset
    from .models import image_size_of

    templates = load_kw["templates"]
    data = load_dataset(load_kw["dataset"], image_size_of(load_kw["model"]), load_kw["n_images"])
    clf = classifier_for(data, load_kw["model"], load_kw["pretrained"], templates, load_kw["device"])
    x_all, y_all = data.images.to(load_kw["device"]), data.targets.to(load_kw["device"])
    suite = Suite(**{**suite_dict, "attacks": tuple(suite_dict["attacks"]),
                     "checkpoints": tuple(suite_dict["checkpoints"])})
    n = sum(hi - lo for lo, hi in batches)

    def estimate(per_image: dict) -> None:  # printed by the worker (Ray forwards it to the driver)
        if ticks is not None:  # a local worker: the driver prints one estimate for the whole run
            return
        total = sum(v for v, _ in per_image.values()) * n
        print(f"shard of {n} images ({len(batches)} batches): estimated ~{total / 60:.1f} min; wall (CPU) seconds "
              "per image: " + ", ".join(f"{a} {s} {e * 255:g}/255: {v:.2f} ({c:.2f})"
                                        for (s, e, a), (v, c) in sorted(per_image.items())), flush=True)

    raw = evaluate_batches(clf, defenses, eps_list, x_all, y_all, batches, seed, suite, progress=False,
                           on_first=estimate, on_job=None if ticks is None else ticks.put)
    return _freeze(raw)


def default_workers(device: str) -> int:
    """Local worker processes for `--workers auto`: one per usable CPU core on the CPU (one torch thread each;
    two threads in one process were measured no faster than one on this suite's small batches), one on a GPU."""
    if str(device).startswith("cuda"):
        return 1
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _run_local(workers: int, load_kw: dict, defenses, eps_list, batches, seed, suite: Suite, progress,
               estimate, n_jobs: int, threads: int = 1) -> dict:
    """Batches over `workers` local processes (spawned, `threads` torch threads each), one task per batch so the
    pool balances itself; the first batch to finish (the small probe batch) makes the run's estimate."""
    import multiprocessing
    import threading
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    manager = ctx.Manager()
    ticks = manager.Queue()
    bar = tqdm(total=len(batches) * n_jobs, desc=f"adaptive eval ({workers} workers)", disable=not progress)
    stop = threading.Event()

    def drain():
        import queue

        while not stop.is_set():
            try:
                label = ticks.get(timeout=0.2)
            except queue.Empty:
                continue
            bar.set_postfix_str(label)
            bar.update(1)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    parts, estimated = [], False
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            args = (load_kw, list(defenses), list(eps_list))
            suite_dict = dataclasses.asdict(suite)
            pending = {pool.submit(_shard_task, *args, [b], seed, suite_dict, threads, ticks): b for b in batches}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    lo, hi = pending.pop(fut)
                    part = fut.result()
                    parts.append(part)
                    if not estimated:
                        estimated = True
                        estimate({key: (sec / n, part["cpu_seconds"][key][0] / n)
                                  for key, (sec, n) in part["seconds"].items()})
    finally:
        stop.set()
        reader.join()
        bar.close()
        manager.shutdown()
    return merge(parts)


def _freeze(raw: dict) -> dict:
    """Tuple keys survive Ray's pickling as they are; tensors never reach here. (Kept as a hook.)"""
    return raw


def _run_ray(address: str, load_kw: dict, defenses, eps_list, batches, seed, suite: Suite, progress, estimate):
    try:
        import ray
    except ImportError:
        raise SccError("--ray needs Ray: pip install 'scc-defense[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        # Ray starts its workers at niceness 15 by default: on a shared machine they then crawl behind every other
        # job while the driver waits. The workers are the evaluation here, so run them at the normal priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        if address == "auto" and not os.environ.get("RAY_ADDRESS"):
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    try:
        slots = int(ray.available_resources().get("GPU", 0)) if load_kw["device"].startswith("cuda") else 0
        slots = slots or max(1, int(ray.available_resources().get("CPU", 1)))
        # sanity batches (the first images) are spread like the others; shards = round-robin whole batches
        shards = [batches[i::slots] for i in range(min(slots, len(batches)))]
        resources = {"num_gpus": 1} if load_kw["device"].startswith("cuda") else {"num_cpus": 1}
        task = ray.remote(**resources)(_shard_task)
        futures = [task.remote(load_kw, list(defenses), list(eps_list), shard, seed, dataclasses.asdict(suite))
                   for shard in shards]
        parts = []
        with tqdm(total=len(futures), desc=f"ray shards ({len(futures)} tasks)", disable=not progress) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                parts.append(ray.get(done[0]))
                bar.update(1)
        return merge(parts)
    finally:
        if started_here:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------------------
# Report: table, Markdown, plots
# ----------------------------------------------------------------------------------------------------------
def _label(r: dict) -> str:
    return r["defense"] + ("" if r["preset"] == "paper" else f"-{r['preset']}")


def _col_name(r: dict) -> str:
    if r["attack"] == "none":
        return "clean"
    steps = f"-{r['steps']}" if r.get("steps") and r["attack"] not in ("worst", "square") else ""
    base = {"square": f"square-{r.get('steps')}q"}.get(r["attack"], r["attack"] + steps)
    return ("paper " if r["protocol"] == "paper" else "") + base


def table_cells(report: dict) -> tuple[list[str], dict[str, dict[str, str]], list[float]]:
    """Columns and rows of the adaptive table: cell = 'known / fresh' accuracy (%), one block per eps."""
    eps_values = sorted({r["eps"] for r in report["results"] if r["attack"] != "none"})
    order = {a: i for i, a in enumerate(("none", "pgd", "cw", "pgd100", "apgd-ce", "apgd-dlr", "eot-pgd",
                                         "bpda-pgd", "transfer-nocorrect", "square", "worst"))}
    cols, rows = [], {}
    ranked = sorted(report["results"], key=lambda r: (r["eps"] if r["attack"] != "none" else -1,
                                                     r["protocol"] != "paper", order.get(r["attack"], 99)))
    for r in ranked:
        lab = _label(r)
        eps_tag = "" if r["attack"] == "none" else f" @{r['eps'] * 255:g}"
        col = _col_name(r) + (eps_tag if len(eps_values) > 1 else "")
        if col not in cols:
            cols.append(col)
        cell = rows.setdefault(lab, {}).setdefault(col, {})
        cell[r["draws"] or "paper"] = r
    text = {}
    for lab, cells in rows.items():
        text[lab] = {}
        for col, c in cells.items():
            if "paper" in c:
                text[lab][col] = f"{100 * c['paper']['accuracy']:.1f}"
            else:
                k, f = c.get("known"), c.get("fresh")
                text[lab][col] = " / ".join(f"{100 * v['accuracy']:.1f}" if v else "-" for v in (k, f))
    return cols, text, eps_values


def format_adaptive_table(report: dict) -> str:
    cols, text, eps_values = table_cells(report)
    width = max([14] + [len(c) + 2 for c in cols])
    head = f"{'defense':<14}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [f"accuracy %, known / fresh draws (paper: non-adaptive, one number); "
             f"n = {report['n_images']}, eps = {', '.join(f'{e * 255:g}/255' for e in eps_values)}", head,
             "-" * len(head)]
    for lab, cells in text.items():
        lines.append(f"{lab:<14}" + "".join(f"{cells.get(c, '-'):>{width}}" for c in cols))
    worst = [r for r in report["results"] if r["attack"] == "worst"]
    if worst:
        lines.append("worst case +- standard error: " + "; ".join(
            f"{_label(r)} {r['eps'] * 255:g}/255 {r['draws']} {100 * r['accuracy']:.1f}+-{100 * r['stderr']:.1f}"
            for r in worst))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    cols, text, eps_values = table_cells(report)
    out = [f"# Robust accuracy ({report['protocol']} protocol)", "",
           f"model `{report['model']}`, dataset `{report['dataset']}`, {report['n_images']} images, seed "
           f"{report['seed']}, {report.get('threads')} thread(s). Cells: accuracy % with known / fresh draws "
           "(paper rows: non-adaptive, one number).", "",
           "| defense | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lab, cells in text.items():
        out.append(f"| {lab} | " + " | ".join(cells.get(c, "-") for c in cols) + " |")
    costs = [r for r in report["results"] if r.get("attack_seconds_per_image") and r["draws"] != "fresh"]
    if costs:
        out += ["", "Attack cost, seconds per image: wall (CPU time of the process; on a shared machine the wall "
                "time includes waiting for the cores):", ""]
        out += [f"- {_label(r)} {_col_name(r)} @{r['eps'] * 255:g}/255: {r['attack_seconds_per_image']:.3f} "
                f"({(r.get('attack_cpu_seconds_per_image') or 0):.3f})" for r in costs]
    if report.get("sanity"):
        out += ["", "Sanity checks:", ""] + [f"- {f}" for f in report["sanity"]]
    if report.get("warning"):
        out += ["", f"**{report['warning']}**"]
    return "\n".join(out) + "\n"


def write_plots(report: dict, folder: Path) -> list[Path]:
    """acc_vs_eps.png (robust accuracy vs eps per defense and attack) and acc_vs_steps.png (PGD trajectory)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    rows = [r for r in report["results"] if r["attack"] != "none"]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(4 * max(1, len(labels)), 3.4), squeeze=False)
    for ax, lab in zip(axes[0], labels):
        series = {}
        for r in rows:
            if _label(r) == lab:
                series.setdefault((r["attack"], r["draws"] or r["protocol"]), []).append(r)
        for (attack, draws), rs in series.items():
            rs = sorted(rs, key=lambda r: r["eps"])
            style = "-" if draws in ("known", "paper") else "--"
            ax.errorbar([r["eps"] * 255 for r in rs], [100 * r["accuracy"] for r in rs],
                        yerr=[100 * r["stderr"] for r in rs], fmt="o" + style, ms=3, capsize=2,
                        label=f"{attack} ({draws})", lw=2.5 if attack == "worst" else 1)
        ax.set_title(lab)
        ax.set_xlabel("eps (/255)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-2, 102)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = folder / "acc_vs_eps.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    curves = report.get("steps_curves", [])
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for c in curves:
            ax.plot(c["steps"], [100 * a for a in c["accuracy"]], "o-" if c["draws"] == "known" else "o--", ms=3,
                    label=f"{c['defense']} {c['eps'] * 255:g}/255 ({c['draws']})")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("exact PGD steps")
        ax.set_ylabel("accuracy %")
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = folder / "acc_vs_steps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def check_writable(folder: str | Path) -> Path:
    """Create the output folder and prove it is writable now, before hours of attacks."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".scc-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise SccError(f"--out {folder}: not a writable folder ({err.strerror or err})") from None
    return folder


def write_report(report: dict, folder: str | Path, stem: str = "report") -> list[Path]:
    import json

    folder = check_writable(folder)
    paths = [folder / f"{stem}.json", folder / f"{stem}.md"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(format_markdown(report))
    return paths + write_plots(report, folder)


# ----------------------------------------------------------------------------------------------------------
# `scc eval --protocol adaptive | --out DIR | --ray ADDRESS`
# ----------------------------------------------------------------------------------------------------------
def cli_eval(args) -> int:
    """The eval subcommand for the adaptive protocol, and for the paper protocol when --out is given."""
    import json

    from .evaluate import format_table, parse_eps, run

    out = check_writable(args.out) if args.out else None  # fail now, not after the attacks
    if args.json and args.json != "-":
        check_writable(Path(args.json).resolve().parent)
    eps_list = [parse_eps(e) for e in args.eps.split(",")]
    templates = args.templates.split("|") if args.templates else None
    if args.protocol == "paper":
        if args.ray:
            raise SccError("--ray shards the adaptive protocol: add --protocol adaptive (the paper protocol runs "
                           "in one process)")
        attacks = [("none", 0.0)] if args.clean else []
        for name in args.attacks.split(","):
            name = name.strip().lower()
            if name in ("", "none"):
                continue
            for n in (("apgd-ce", "apgd-dlr") if name == "autoattack" else (name,)):
                attacks += [(n, e) for e in eps_list]
        report = run(args.model, args.pretrained, args.dataset, defenses=args.defenses.split(","), attacks=attacks,
                     n_images=args.images, batch_size=args.batch_size, device=args.device, seed=args.seed,
                     attack_steps=args.steps, progress=not args.quiet, templates=templates, backend=args.backend)
        text = format_table(report)
    else:
        if args.backend != "eager":
            raise SccError("the adaptive protocol differentiates through the eager defended module: drop --backend")
        attacks = ADAPTIVE_ATTACKS
        if args.adaptive_attacks:
            attacks = tuple(a.strip().lower() for a in args.adaptive_attacks.split(",") if a.strip())
        if args.queries < 1 or args.eot_samples < 1:
            raise SccError("--queries and --eot-samples must be positive")
        suite = Suite(attacks=attacks, queries=args.queries, eot_k=args.eot_samples,
                      sanity_images=(args.images or 10**9) if args.sanity else 32)
        threads = torch.get_num_threads() if args.threads is not None else 1
        if args.workers == "auto":
            workers = max(1, default_workers(args.device) // threads)
        else:
            try:
                workers = int(args.workers)
            except ValueError:
                workers = 0
            if workers < 1:
                raise SccError(f"--workers takes auto or a positive number of processes, got {args.workers!r}")
        report = evaluate(args.model, args.pretrained, args.dataset, defenses=args.defenses.split(","),
                          eps_list=eps_list, n_images=args.images, batch_size=args.batch_size, device=args.device,
                          seed=args.seed, suite=suite, progress=not args.quiet, templates=templates,
                          ray_address=args.ray, log=lambda line: print(line, file=sys.stderr), workers=workers,
                          threads=threads)
        text = format_adaptive_table(report) + "\n" + "\n".join(report["sanity"])
    if args.json == "-":
        print(json.dumps(report, indent=2))
    else:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        print(text)
        if report.get("warning"):
            print(report["warning"])
    if out is not None:
        written = write_report(report, out)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
