"""The algorithm layer's attacks: what the evaluation protocols (scc.eval) run against classifiers and defenses.

    pgd_cw.py      PGD and CW as in the TTC protocol (sign steps on CE / margin, uniform random start)
    autoattack.py  AutoAttack's components: APGD-CE / APGD-DLR and Square
    adaptive.py    attacks through a defense: known draws on any sub-batch, EOT, BPDA, the shared PGD loop

    from scc.attacks import pgd
    adv = pgd(clf, x, y, eps=4/255, alpha=1/255)      # PGD-10 on the undefended classifier
"""
from .autoattack import apgd, square
from .pgd_cw import attack, cw, pgd

__all__ = ["apgd", "attack", "cw", "pgd", "square"]
