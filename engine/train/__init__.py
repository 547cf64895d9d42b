"""Training application: `scc train-tiny`, the recipes of the bundled tiny CLIP models (tiny.py); `scc finetune`,
CLIP-FT, TeCoA, PMG-AFT and FARE fine-tuning of a vision encoder (finetune.py); the cached robust testbed models
(robust.py)."""
