"""The algorithm layer's attacks: what the evaluation protocols (scc.eval) run against classifiers and defenses.

    pgd_cw.py      PGD and CW as in the TTC protocol (sign steps on CE / margin, uniform random start)
    apgd.py        APGD-CE, APGD-DLR and APGD-T (targeted DLR), the step-size-free PGD of AutoAttack
    fab.py         FAB-T, the targeted minimal-distance boundary attack of AutoAttack
    square.py      Square, AutoAttack's score-based black-box attack
    autoattack.py  AutoAttack's standard sequence (APGD-CE, APGD-T, FAB-T, Square) and TTC's subset, each component
                   on the images still correct
    adaptive.py    attacks through a defense: known draws on any sub-batch, EOT, BPDA, the shared PGD loop

All are our own L_inf implementations (checked against torchattacks on identical inputs: tests/test_attacks_aa.py,
benchmarks/results/attacks-vs-torchattacks.json); none needs an optional dependency.

    from scc.attacks import pgd, run_sequence, STANDARD
    adv = pgd(clf, x, y, eps=4/255, alpha=1/255)                        # PGD-10 on the undefended classifier
    adv, log = run_sequence(clf, x, y, eps=4/255, components=STANDARD)  # standard AutoAttack
"""
from .apgd import apgd, apgd_targeted
from .autoattack import COMPONENTS, STANDARD, TTC_SUBSET, Settings, run_component, run_sequence
from .fab import fab_targeted
from .pgd_cw import attack, cw, pgd
from .square import square

__all__ = ["COMPONENTS", "STANDARD", "TTC_SUBSET", "Settings", "apgd", "apgd_targeted", "attack", "cw",
           "fab_targeted", "pgd", "run_component", "run_sequence", "square"]
