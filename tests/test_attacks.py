"""Our PGD/CW (TTC protocol) against torchattacks on the same model, eps and steps."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from scc.attacks import attack, pgd
from scc.attacks.adaptive import sign_pgd
from scc.perturbation import project, sign_step


@pytest.fixture(scope="module")
def subset(digits):
    return digits[0][:200], digits[1][:200]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_matches_torchattacks(tiny, subset):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = subset
    eps = 4 / 255
    ours = accuracy(tiny, pgd(tiny, x, y, eps=eps, alpha=1 / 255, steps=10, generator=torch.Generator().manual_seed(0)), y)
    torch.manual_seed(0)
    ref_attack = torchattacks.PGD(tiny, eps=eps, alpha=1 / 255, steps=10, random_start=True)
    theirs = accuracy(tiny, ref_attack(x, y), y)
    clean = accuracy(tiny, x, y)
    assert ours < clean - 0.3, "PGD-10 at 4/255 must hurt the tiny model"
    assert abs(ours - theirs) < 0.06, f"ours {ours:.3f} vs torchattacks {theirs:.3f}"


def test_attacks_respect_ball_and_box(tiny, subset):
    x, y = subset
    for name in ("pgd", "cw"):
        adv = attack(tiny, x, y, name, eps=2 / 255, steps=3)
        assert (adv - x).abs().max() <= 2 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_cw_lowers_accuracy(tiny, subset):
    x, y = subset
    assert accuracy(tiny, attack(tiny, x, y, "cw", eps=4 / 255), y) < accuracy(tiny, x, y) - 0.3


def test_torchattacks_can_attack_the_defended_module(tiny, subset):
    """The defended module keeps the [0,1] -> logits contract, so torchattacks runs on it unchanged."""
    torchattacks = pytest.importorskip("torchattacks")
    import scc

    x, y = subset[0][:4], subset[1][:4]
    d = scc.defend(tiny, "scc", preset="latency")
    adv = torchattacks.PGD(d, eps=1 / 255, alpha=1 / 255, steps=1)(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 1 / 255 + 1e-6


def reference_paper_loop(model, x, y, name, eps, alpha, steps, kappa, generator):
    """PGD/CW of the paper protocol written apart from sign_pgd: torch.func.grad of the batch-summed loss, uniform
    start from `generator`. Returns every iterate x + delta and every step's gradient."""
    def loss(d):
        logits = model(x + d)
        if name == "pgd":
            return F.cross_entropy(logits, y, reduction="sum")
        z_y = logits.gather(1, y[:, None])[:, 0]
        z_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        return -F.relu(z_y - z_other + kappa).sum()

    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    delta = project(eps * start, x, eps)
    grad_fn = torch.func.grad(loss)
    iterates, grads = [x + delta], []
    with torch.enable_grad():
        for _ in range(steps):
            grads.append(grad_fn(delta))
            delta = sign_step(delta, grads[-1], x, alpha, eps)
            iterates.append(x + delta)
    return iterates, grads


class Recorder(torch.nn.Module):
    """The model, recording every input it is called on and the gradient that reaches that input."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs, self.grads = model, [], []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        if x.requires_grad:
            x.register_hook(self.grads.append)
        return self.model(x)


@pytest.mark.parametrize("name", ["pgd", "cw"])
def test_paper_attack_equals_a_reference_loop_step_by_step(tiny, subset, name):
    """PGD and CW (which run sign_pgd) match a loop written apart from it at every step: same start from the same
    generator, same gradient of the summed loss, same iterates."""
    x, y = subset[0][:64], subset[1][:64]
    eps, alpha, steps = 4 / 255, 1 / 255, 6
    want, want_grads = reference_paper_loop(tiny, x, y, name, eps, alpha, steps, 50.0, torch.Generator().manual_seed(7))
    recorder = Recorder(tiny)
    adv = attack(recorder, x, y, name, eps=eps, alpha=alpha, steps=steps, generator=torch.Generator().manual_seed(7))
    got = [*recorder.inputs, adv]
    assert len(got) == len(want) == steps + 1 and len(recorder.grads) == steps
    for k, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max().item() <= 1e-6, f"iterate {k}"
    for k, (a, b) in enumerate(zip(recorder.grads, want_grads)):
        assert (a.sign() == b.sign()).float().mean().item() == 1.0, f"step {k}"
    assert not torch.equal(want[0], want[-1])  # the attack moved the images: the comparison covers real steps


def test_pgd_steps_by_eps_unless_told():
    """pgd/cw keep their documented default step alpha = eps; the loop itself has no default step."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    default = pgd(model, x, y, eps=2 / 255, steps=1, generator=torch.Generator().manual_seed(0))
    explicit = pgd(model, x, y, eps=2 / 255, alpha=2 / 255, steps=1, generator=torch.Generator().manual_seed(0))
    half = pgd(model, x, y, eps=2 / 255, alpha=1 / 255, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(default, explicit) and not torch.equal(default, half)
    assert inspect.signature(sign_pgd).parameters["alpha"].default is inspect.Parameter.empty
