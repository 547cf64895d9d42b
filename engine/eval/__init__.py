"""The evaluation application: robust accuracy of defenses under attack, in two threat models.

    paper.py     the paper's (TTC) protocol: attacks on the undefended classifier, then each defense
    adaptive.py  the adaptive protocol's driver: attacks through the defense, known and fresh draws, worst case
    suite.py     the adaptive suite and its per-batch evaluation, rows and sanity flags
    sharding.py  the adaptive batches over local worker processes or Ray tasks
    report.py    tables, Markdown and plots, written to --out
    options.py   attack names per protocol, attack radii, standard errors

`scc eval` (scc.cli.evaluate) is the one command line into both protocols.
"""
