"""Training application: `scc train-tiny`, the recipes of the bundled tiny CLIP models (tiny.py)."""
