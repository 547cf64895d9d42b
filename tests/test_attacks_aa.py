"""Our AutoAttack components (scc.attacks: APGD-CE/DLR/T, FAB-T, Square, the sequences) on their own terms, and against
torchattacks on identical inputs when it is installed (pip install torchattacks==3.5.1; no extra of scc: it pins
requests~=2.25.1). The full-size comparison is
benchmarks/attacks_vs_torchattacks.py (benchmarks/results/attacks-vs-torchattacks.json)."""
import math

import pytest
import torch

import scc
from scc.attacks import (STANDARD, TTC_SUBSET, Settings, apgd, apgd_targeted, fab_targeted, run_component,
                         run_sequence, square)
from scc.attacks.adaptive import KnownDraws
from scc.attacks.apgd import apgd_run, checkpoints, dlr_loss, dlr_targeted_loss
from scc.attacks.fab import project_linf_plane
from scc.attacks.square import p_selection

EPS = 4 / 255


@pytest.fixture(scope="module")
def batch(digits):
    return digits[0][:24], digits[1][:24]


def correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def in_threat_model(adv, x, eps=EPS):
    return (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_checkpoints_follow_the_paper_schedule():
    """w_j: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, Sec. 3.2)."""
    p, prev, expected = 0.22, 0.0, []
    while p <= 1:
        expected.append(math.ceil(round(p * 100, 6)) - 1)  # 0-based iteration after which the check runs
        prev, p = p, p + max(p - prev - 0.03, 0.06)
    assert checkpoints(100) == expected == [21, 40, 56, 69, 79, 86, 92, 98]
    assert checkpoints(10) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_dlr_losses_are_shift_and_scale_invariant():
    z = torch.randn(8, 10)
    y, t = torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    assert torch.allclose(dlr_loss(3 * z + 5, y), dlr_loss(z, y), atol=1e-5)
    assert torch.allclose(dlr_targeted_loss(3 * z + 5, y, t), dlr_targeted_loss(z, y, t), atol=1e-5)
    top = z.argmax(1)  # DLR of a correct prediction is negative, of a wrong one positive
    assert (dlr_loss(z, top) < 0).all() and (dlr_loss(z, (top + 1) % 10) > 0).all()


def test_apgd_step_size_halves_only_at_checkpoints(tiny, batch):
    x, y = batch
    run = apgd_run(tiny, x, y, EPS, "ce", steps=30, generator=torch.Generator().manual_seed(0))
    assert len(run.step_sizes) == len(checkpoints(30))
    levels = torch.stack(run.step_sizes) / (2 * EPS)
    assert torch.allclose(levels, 2.0 ** torch.round(torch.log2(levels)))  # 2 eps / 2^k
    assert (levels[1:] <= levels[:-1]).all() and (levels < 1).any()
    assert in_threat_model(run.adv, x) and in_threat_model(run.x_best, x)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"])
def test_components_break_images_inside_the_threat_model(tiny, batch, name):
    x, y = batch
    small = Settings(apgd_steps=10, apgd_targets=3, fab_steps=10, fab_targets=3, square_queries=40)
    adv = run_component(name, tiny, x, y, EPS, small, seed=0)
    assert in_threat_model(adv, x)
    still = correct(tiny, adv, y)
    kept = (adv == x).flatten(1).all(1)
    assert (still <= kept).all(), "an image the attack did not break must come back clean"
    if name != "square":  # Square with 40 queries barely moves the tiny model
        assert still.float().mean() < correct(tiny, x, y).float().mean() - 0.2


def test_sequences_attack_only_what_is_still_correct(tiny, batch):
    x, y = batch
    small = Settings(apgd_steps=10, apgd_targets=2, fab_steps=5, fab_targets=2, square_queries=20)
    adv, log = run_sequence(tiny, x, y, EPS, STANDARD, small, seed=0)
    counts = [log["clean"]] + [log[c] for c in STANDARD]
    assert counts == sorted(counts, reverse=True) and log["n"] == len(y)
    still = correct(tiny, adv, y)
    assert int(still.sum()) == log["square"]
    assert ((adv == x).flatten(1).all(1) >= still).all()
    ce_only = apgd(tiny, x, y, EPS, "ce", steps=10, seed=0)
    assert int(still.sum()) <= int(correct(tiny, ce_only, y).sum())  # the sequence starts with the same APGD-CE
    _, ttc_log = run_sequence(tiny, x, y, EPS, TTC_SUBSET, small, seed=0)
    assert list(ttc_log) == ["n", "clean", "apgd-ce", "apgd-dlr"]


def test_targeted_losses_are_skipped_on_two_classes(tiny, batch):
    x, y = batch
    two = scc.load("scc-tiny-digits", labels=["zero", "one"])
    keep = y < 2
    _, log = run_sequence(two, x[keep], y[keep], EPS, ("apgd-dlr", "apgd-t", "fab-t"),
                          Settings(apgd_steps=3, fab_steps=3), seed=0)
    assert "needs >= 3 classes" in log["apgd-dlr"] and "needs >= 4 classes" in log["apgd-t"]
    assert isinstance(log["fab-t"], int)


def test_linf_plane_projection_is_minimal_and_in_the_box():
    """Against a linear program: min t s.t. |d_i| <= t, <w, p + d> = b, 0 <= p + d <= 1."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    gen = torch.Generator().manual_seed(0)
    n, D = 40, 6
    p = torch.rand(n, D, generator=gen, dtype=torch.float64)
    w = torch.randn(n, D, generator=gen, dtype=torch.float64)
    b = (w * p).sum(1) + torch.randn(n, generator=gen, dtype=torch.float64) * 0.6
    d = project_linf_plane(p, w, b)
    assert (p + d).min() >= -1e-9 and (p + d).max() <= 1 + 1e-9
    reached = ((w * (p + d)).sum(1) - b).abs() < 1e-7
    for i in range(n):
        cost = [0.0] * D + [1.0]  # variables d_1..d_D, t
        a_ub = [[1.0 if j == k else 0.0 for j in range(D)] + [-1.0] for k in range(D)]
        a_ub += [[-1.0 if j == k else 0.0 for j in range(D)] + [-1.0] for k in range(D)]
        bounds = [(-float(p[i, k]), 1 - float(p[i, k])) for k in range(D)] + [(0, None)]
        res = linprog(cost, A_ub=a_ub, b_ub=[0.0] * (2 * D), A_eq=[w[i].tolist() + [0.0]],
                      b_eq=[float(b[i] - (w[i] * p[i]).sum())], bounds=bounds)
        assert res.success == bool(reached[i]), f"row {i}: LP feasible {res.success}, projection reached the plane"
        if res.success:
            assert abs(d[i].abs().max().item() - res.x[-1]) < 1e-6
        else:  # out of reach: the box corner in the plane's direction
            corner = torch.where(w[i] * torch.sign((w[i] * p[i]).sum() - b[i]) < 0, 1 - p[i], -p[i])
            assert torch.allclose(d[i], corner)


def test_fab_counts_only_images_within_eps(tiny, batch):
    """FAB moves an image only to break it within eps: at 8/255 it breaks most digits, at 1/255 (closer than its
    adversarial images) fewer, and every image it did not break comes back unchanged."""
    x, y = batch
    clean = correct(tiny, x, y)
    tight = fab_targeted(tiny, x, y, 1 / 255, steps=10, targets=2, seed=0)
    loose = fab_targeted(tiny, x, y, 8 / 255, steps=10, targets=2, seed=0)
    for adv, eps in ((tight, 1 / 255), (loose, 8 / 255)):
        assert in_threat_model(adv, x, eps)
        moved = (adv != x).flatten(1).any(1)
        broken = clean & ~correct(tiny, adv, y)
        assert torch.equal(moved, broken), f"eps {eps * 255:g}/255: moved {moved.tolist()}, broken {broken.tolist()}"
    assert (clean & ~correct(tiny, loose, y)).float().mean() >= 0.5 * clean.float().mean()
    assert correct(tiny, loose, y).sum() < correct(tiny, tight, y).sum()


def test_square_schedule():
    assert [p_selection(i, 0.8, 5000, False) for i in (0, 10, 11, 51, 201, 501, 1001, 2001, 4001, 6001, 8001)] == \
        [0.8, 0.8, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125, 0.0015625]
    assert p_selection(100, 0.8, 1000, True) == p_selection(1000, 0.8, 10000, False) == 0.05


def test_components_run_on_known_draws_modules(tiny, batch):
    """APGD/FAB/Square call the model on sub-batches; KnownDraws maps each row back to its image's draws."""
    x, y = batch[0][:6], batch[1][:6]
    defended = scc.defend(tiny, "ttc", seed=0)
    known = KnownDraws(defended, x, list(range(6)), EPS)
    nearest = KnownDraws(defended, x, list(range(6)), EPS, draws=known.draws, match="nearest")  # FAB leaves the ball
    for adv in (apgd_targeted(known, x, y, EPS, steps=2, targets=2, seed=0),
                fab_targeted(nearest, x, y, EPS, steps=2, targets=2, seed=0),
                square(known, x, y, EPS, queries=3, seed=0)):
        assert in_threat_model(adv, x)
    assert known.calls > 10 and nearest.calls > 4
    with pytest.raises(scc.SccError, match="within eps"):
        fab_targeted(known, x, y, EPS, steps=2, targets=2, seed=0)


# ----------------------------------------------------------------------------------------------------------
# Against torchattacks on identical inputs (skipped without it)
# ----------------------------------------------------------------------------------------------------------
def same_images(a, b, tol=1e-6):
    return ((a - b).flatten(1).abs().amax(1) <= tol).float().mean().item()


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_equals_torchattacks(tiny, batch, loss):
    """Same start, losses, momentum and step-size schedule: the same best losses and images (the start differs in
    the last bit: the official eps * (u / ||u||) against torchattacks' eps * u / ||u||)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    ref = torchattacks.APGD(tiny, norm="Linf", eps=EPS, steps=25, n_restarts=2, loss=loss, seed=3)
    run = apgd_run(tiny, x, y, EPS, loss, steps=25, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    x_best, _, loss_best, _ = ref.attack_single_run(x, y)
    assert torch.allclose(run.loss_best, loss_best, rtol=0, atol=1e-6) and same_images(run.x_best, x_best) == 1.0
    assert same_images(apgd(tiny, x, y, EPS, loss, steps=25, restarts=2, seed=3), ref(x, y)) == 1.0


def test_apgd_t_and_square_match_torchattacks(tiny, batch):
    """APGD-T: equal up to the rounding of the targeted DLR denominator (the official form (z3 + z4) / 2 vs
    torchattacks' z3 / 2 + z4 / 2); Square (both schedules): equal."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    ours = apgd_targeted(tiny, x, y, EPS, steps=20, targets=3, seed=1)
    theirs = torchattacks.APGDT(tiny, norm="Linf", eps=EPS, steps=20, n_restarts=1, n_classes=4, seed=1)(x, y)
    assert correct(tiny, ours, y).sum() == correct(tiny, theirs, y).sum() and same_images(ours, theirs) >= 0.8
    for rescale in (True, False):
        ours = square(tiny, x, y, EPS, queries=60, seed=2, rescale_schedule=rescale)
        theirs = torchattacks.Square(tiny, norm="Linf", eps=EPS, n_queries=60, seed=2, resc_schedule=rescale)(x, y)
        assert same_images(ours, theirs) == 1.0


def test_fab_t_matches_torchattacks(tiny, batch):
    """FAB-T: robust accuracy within one standard error (the projection agrees to ~1e-7, which the iteration can
    amplify into a different, equally valid boundary point)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    ours = correct(tiny, fab_targeted(tiny, x, y, EPS, steps=10, targets=3, seed=0), y).float().mean().item()
    ref = torchattacks.FAB(tiny, norm="Linf", eps=EPS, steps=10, n_restarts=1, multi_targeted=True, n_classes=4,
                           seed=0)
    theirs = correct(tiny, ref(x, y), y).float().mean().item()
    se = math.sqrt(max(theirs * (1 - theirs), 1e-4) / len(y))
    assert abs(ours - theirs) <= se, f"FAB-T ours {ours:.3f} vs torchattacks {theirs:.3f} (se {se:.3f})"
