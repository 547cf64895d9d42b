"""R-TPT (spec section 2): draws/determinism, per-image reset, hand-computed selection and weights, AdamW,
the prompt learner against open_clip's encode_text, AugMix ops against PIL, pass counts, the bundled model."""
import math

import numpy as np
import pytest
import torch

import scc
from scc.passes import count_passes
from scc.defenses.rtpt import (AUGMIX_OPS, RTPTConfig, adamw_step, confident_views, crop_boxes, crop_flip, encode_prompts,
                      entropy, geometric_theta, intensity_op, make_views, prompt_parts, reliability_weights, resample,
                      rtpt_draws)


def _slice(draws, i):
    return {k: v[i: i + 1] for k, v in draws.items()}


def test_deterministic_under_a_seed(tiny, digits):
    x = digits[0][:2]
    a = scc.defend(tiny, "rtpt", seed=3)(x)
    b = scc.defend(tiny, "rtpt", seed=3)(x)
    c = scc.defend(tiny, "rtpt", seed=4)(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # other views, other weights


def test_draws_shapes_and_ranges(tiny, digits):
    cfg = RTPTConfig()
    d = rtpt_draws(digits[0][:2], cfg, torch.Generator().manual_seed(0))
    n = cfg.views - 1
    assert d["crop"].shape == (2, n, 10, 4) and d["flip"].shape == (2, n) and d["blend"].shape == (2, n)
    assert d["mix"].shape == (2, n, 3) and torch.allclose(d["mix"].sum(-1), torch.ones(2, n))
    assert d["depth"].min() >= 1 and d["depth"].max() <= 3
    assert d["ops"].min() >= 0 and d["ops"].max() <= 8
    assert d["levels"].min() >= 0.1 and d["levels"].max() <= 1.0
    assert set(d["signs"].unique().tolist()) == {-1.0, 1.0}


def test_prompt_and_optimizer_reset_per_image(tiny, digits):
    """Two images in one batch give exactly what each gives alone: nothing carries over between images."""
    defended = scc.defend(tiny, "rtpt", seed=0)
    x = digits[0][:2]
    draws = defended.draws(x)
    both = defended(x, draws)
    alone = torch.cat([defended(x[i: i + 1], _slice(draws, i)) for i in (1, 0)][::-1])
    assert torch.equal(both, alone)


def test_grad_mode_does_not_matter(tiny, digits):
    defended = scc.defend(tiny, "rtpt", seed=0)
    x = digits[0][:1]
    draws = defended.draws(x)
    with torch.no_grad():
        a = defended(x, draws)
    assert torch.equal(a, defended(x, draws))


def test_selection_hand_computed():
    logits = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 20.0, 0.0], [1.0, 0.0, 0.0]])
    h = entropy(logits)
    assert h[0].item() == pytest.approx(math.log(3))
    p = torch.tensor([math.exp(5), 1, 1]) / (math.exp(5) + 2)
    assert h[2].item() == pytest.approx(-(p * p.log()).sum().item())
    assert confident_views(logits, 0.4).tolist() == [3, 1]  # int(5 * 0.4) = 2 lowest entropies, ascending


@pytest.mark.parametrize("mask, scores", [
    # Sim rows: a=e1, b=e1 (duplicate), c=e2, d=(.5,.5,.5); top-2 mean per row after masking
    ("threshold", [0.25, 0.25, 0.25, 0.625]),  # Sim >= 1 masks the self-similarity AND the duplicate
    ("diagonal", [0.75, 0.75, 0.25, 0.5]),  # only the self-similarity
])
def test_reliability_weights_hand_computed(mask, scores):
    feats = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    w = reliability_weights(feats, topk=2, temperature=0.5, self_mask=mask)
    e = [math.exp(s / 0.5) for s in scores]
    assert w.tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-12)


def test_reliability_weights_all_masked_is_uniform_not_nan():
    feats = torch.tensor([[1.0, 0.0]] * 5)  # 5 identical views (a constant image): every Sim = 1 is masked
    w = reliability_weights(feats, topk=4, temperature=0.01, self_mask="threshold")
    assert torch.allclose(w, torch.full((5,), 0.2))


def test_diagonal_mask_is_continuous_threshold_is_not():
    """Two feature sets that differ in one view by one float32 ulp of scale, chosen so that the view's computed
    self-similarity is >= 1.0 in one and < 1.0 in the other: the official 'threshold' rule masks it in one only,
    so that view's weight jumps by a large factor; 'diagonal' masks it in both and its weights barely move."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)

    def self_sim(f):
        return (f @ f.t())[0, 0].item()  # as reliability_weights computes it

    scales = [1 + k * 2.0 ** -24 for k in range(-64, 65)]
    sims = [self_sim(torch.cat([feats[:1] * s, feats[1:]])) for s in scales]
    k = next(i for i in range(len(sims) - 1) if sims[i] < 1.0 <= sims[i + 1])  # the crossing
    below, above = (torch.cat([feats[:1] * scales[i], feats[1:]]) for i in (k, k + 1))
    assert abs(scales[k + 1] / scales[k] - 1) < 1e-7  # the two sets differ by ~6e-8 relative, in one row
    thr = [reliability_weights(f, 20, 0.01, "threshold") for f in (below, above)]
    diag = [reliability_weights(f, 20, 0.01, "diagonal") for f in (below, above)]
    # threshold: view 0 keeps its own similarity (~1) in its top-20 below the crossing, not above it
    assert thr[0][0] > 3 * thr[1][0], (thr[0][0].item(), thr[1][0].item())
    assert (diag[0] - diag[1]).abs().max() < 1e-4
    assert torch.allclose(thr[0].sum(), torch.tensor(1.0)) and torch.allclose(diag[0].sum(), torch.tensor(1.0))


def test_adamw_matches_torch_optim():
    cfg = RTPTConfig()
    g0 = torch.Generator().manual_seed(0)
    p0 = torch.randn(4, 8, generator=g0, dtype=torch.float64)
    grads = [torch.randn(4, 8, generator=g0, dtype=torch.float64) for _ in range(3)]
    ref = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([ref], lr=cfg.lr)  # torch defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        ref.grad = g.clone()
        opt.step()
        p, m, v = adamw_step(p, g, m, v, t, cfg)
        assert torch.allclose(p, ref.detach(), rtol=0, atol=1e-12)
    # the first step is p (1 - lr wd) - lr g / (|g| + eps): a sign step of size lr
    p1, _, _ = adamw_step(p0, grads[0], torch.zeros_like(p0), torch.zeros_like(p0), 1, cfg)
    want = p0 * (1 - 5e-3 * 0.01) - 5e-3 * grads[0] / (grads[0].abs() + 1e-8)
    assert torch.allclose(p1, want, atol=1e-12)


def test_prompt_learner_reproduces_encode_text(tiny):
    """Initial context = the token embeddings of 'a photo of a': same text features as open_clip's encode_text."""
    parts = prompt_parts(tiny, RTPTConfig())
    assert parts.ctx.shape == (4, tiny.clip.token_embedding.weight.shape[1])  # 4 context tokens
    tokens = tiny.tokenizer([f"a photo of a {label}." for label in tiny.labels])
    with torch.no_grad():
        assert torch.allclose(encode_prompts(tiny, parts, parts.ctx), tiny.clip.encode_text(tokens), atol=1e-6)
        # a shorter context only drops positions after <eot>: the causal mask makes the output identical
        short = prompt_parts(tiny, RTPTConfig(context_length=8))
        assert short.length == 8
        assert torch.allclose(encode_prompts(tiny, short, short.ctx), tiny.clip.encode_text(tokens), atol=1e-5)
    with pytest.raises(scc.SccError, match="context_length"):
        prompt_parts(tiny, RTPTConfig(context_length=5))


def test_one_step_hand_computed(tiny, digits):
    """The whole tuning step written the official way (torch.optim.AdamW on a Parameter, loss.backward())."""
    cfg = RTPTConfig()
    x = digits[0][:1]
    draws = rtpt_draws(x, cfg, torch.Generator().manual_seed(1))
    got = scc.defenses.rtpt.rtpt(tiny, x, cfg, **draws)[0]
    with torch.no_grad():
        views = make_views(x[0], cfg, *[draws[k][0] for k in ("crop", "flip", "mix", "blend", "depth", "ops",
                                                                "levels", "signs")])
        feats = torch.nn.functional.normalize(tiny.embed(views), dim=-1)
    parts = prompt_parts(tiny, cfg)
    ctx = torch.nn.Parameter(parts.ctx.clone())
    opt = torch.optim.AdamW([ctx], lr=5e-3)
    text = torch.nn.functional.normalize(encode_prompts(tiny, parts, ctx), dim=-1)
    out = tiny.logit_scale * feats @ text.t()
    ent = -(out.softmax(1) * out.log_softmax(1)).sum(1)
    idx = torch.argsort(ent)[: int(64 * 0.1)]
    loss = (-(out[idx].softmax(1) * out[idx].log_softmax(1)).sum(1)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        tuned = tiny.logit_scale * feats @ torch.nn.functional.normalize(encode_prompts(tiny, parts, ctx), dim=-1).t()
        sim = feats @ feats.t()
        sim[sim >= 1.0] = float("-inf")
        weight = torch.softmax(sim.topk(20, dim=-1).values.mean(-1) / 0.01, -1)
        want = weight @ tuned
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(ctx.detach(), parts.ctx)  # the step moved the context...
    assert torch.equal(prompt_parts(tiny, cfg).ctx, parts.ctx)  # ...but not the cached initial one


def test_pass_counts(tiny, digits):
    defended = scc.defend(tiny, "rtpt")
    with count_passes(tiny, 1) as c:
        defended(digits[0][:1])
    assert c.summary() == {"image_forwards": 64.0, "image_backwards": 0.0, "image_rounds": 1,
                           "text_forwards": 2, "text_backwards": 1}
    assert c.log == [("image", 64), ("text", 10), ("text", 10)]  # each text pass covers the C = 10 prompts
    with count_passes(tiny, 1) as c:
        scc.defend(tiny, "rtpt", steps=2, views=16, topk=5)(digits[0][:1])
    assert (c.image_forwards, c.text_forwards, c.text_backwards) == (16, 3, 2)


def test_views(tiny, digits):
    cfg = RTPTConfig()
    x = digits[0][:1]
    d = rtpt_draws(x, cfg, torch.Generator().manual_seed(0))
    views = make_views(x[0], cfg, *[d[k][0] for k in ("crop", "flip", "mix", "blend", "depth", "ops", "levels", "signs")])
    assert views.shape == (64, 3, 32, 32) and views.min() >= 0 and views.max() <= 1
    assert torch.equal(views[0], x[0])  # the original view
    assert (views[1:] - x).abs().flatten(1).amax(1).min() > 0  # every augmented view differs


def _torchvision_get_params(tries, height, width, scale, ratio):
    """RandomResizedCrop.get_params written out in Python, fed our uniforms instead of torch's global RNG."""
    area = height * width
    for ua, ur, ut, ul in tries:
        target = area * (scale[0] + ua * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + ur * (math.log(ratio[1]) - math.log(ratio[0])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(ut * (height - h + 1)), int(ul * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_static_views_are_the_same_views_and_traceable(tiny, digits):
    """static_views: every op on every (view, chain), no host sync: same views, and make_fx can trace R-TPT."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = digits[0][:1]
    cfg = RTPTConfig(views=16, topk=5, self_mask="diagonal")
    static = RTPTConfig(views=16, topk=5, self_mask="diagonal", static_views=True)
    draws = rtpt_draws(x, cfg, torch.Generator().manual_seed(0))
    keys = ("crop", "flip", "mix", "blend", "depth", "ops", "levels", "signs")
    grouped_views = make_views(x[0], cfg, *[draws[k][0] for k in keys])
    static_views = make_views(x[0], static, *[draws[k][0] for k in keys])
    assert torch.allclose(grouped_views, static_views, atol=1e-6)
    with torch.no_grad():
        graph = make_fx(lambda x, *v: scc.defenses.rtpt.rtpt(tiny, x, static, **dict(zip(keys, v))))(x, *[draws[k] for k in keys])
        assert torch.allclose(graph(x, *[draws[k] for k in keys]), scc.defenses.rtpt.rtpt(tiny, x, static, **draws), atol=1e-4)


@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.08, 1.0)), (224, 224, (0.08, 1.0)), (20, 40, (0.9, 1.0))])
def test_crop_boxes_follow_torchvision_rule(height, width, scale):
    u = torch.rand(400, 10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = crop_boxes(u, height, width, scale, (3 / 4, 4 / 3)).long().tolist()
    want = [list(_torchvision_get_params(t, height, width, scale, (3 / 4, 4 / 3))) for t in u.tolist()]
    assert got == want
    if scale[0] == 0.9:  # most tries fail on a 20x40 image: the centre-crop fallback is exercised
        assert [6, 0, 20, 27] in want or [0, 6, 20, 27] in want


def _pil_reference(img, name, level, sign):
    from PIL import Image, ImageOps

    S = img.size[0]
    affine = {"shear_x": (1, sign * level * 0.03, 0, 0, 1, 0), "shear_y": (1, 0, 0, sign * level * 0.03, 1, 0),
              "translate_x": (1, 0, sign * int(level * (S / 3) / 10), 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, sign * int(level * (S / 3) / 10))}
    if name == "rotate":
        return img.rotate(sign * int(level * 30 / 10), resample=Image.BILINEAR)
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name], resample=Image.BILINEAR)
    if name == "posterize":
        return ImageOps.posterize(img, 4 - int(level * 4 / 10))
    if name == "solarize":
        return ImageOps.solarize(img, 256 - int(level * 256 / 10))
    return getattr(ImageOps, name)(img)


@pytest.mark.parametrize("name", ["rotate", "shear_x", "shear_y", "translate_x", "translate_y", "posterize",
                                  "solarize", "autocontrast", "equalize"])
def test_augmix_ops_match_pil(name):
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255
    for level, sign in [(0.95, 1.0), (0.5, -1.0), (3.0, 1.0), (9.0, -1.0)]:
        ref = torch.from_numpy(np.array(_pil_reference(img, name, level, int(sign)))).permute(2, 0, 1).float() / 255
        lv, sg = torch.tensor([level]), torch.tensor([sign])
        if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
            out = resample(x, geometric_theta(torch.tensor([AUGMIX_OPS.index(name)]), lv, sg, 32))
        else:
            out = intensity_op(name, x, lv)
        assert (out[0] - ref).abs().max() <= 1 / 255 + 1e-6, (name, level, sign)


def test_crop_flip_matches_torchvision_inside():
    import torchvision.transforms.v2.functional as TF

    x = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0)), 9, 1)[0]
    for box, flip in [((0, 0, 32, 32), False), ((3, 5, 10, 14), True), ((10, 2, 20, 30), False)]:
        ours = crop_flip(x, torch.tensor([box]), torch.tensor([flip]), 32)[0]
        ref = TF.resized_crop(x, *box, [32, 32], antialias=True)
        ref = TF.horizontal_flip(ref) if flip else ref
        assert (ours - ref)[:, 2:-2, 2:-2].abs().max() < 1e-5  # the outer ring differs (no edge clamp per crop)


def test_config_errors():
    with pytest.raises(scc.SccError, match="topk"):
        RTPTConfig(views=16, topk=16)
    with pytest.raises(scc.SccError, match="selection_p"):
        RTPTConfig(views=8, selection_p=0.1)
    with pytest.raises(scc.SccError, match="self_mask"):
        RTPTConfig(self_mask="none")
    with pytest.raises(scc.SccError, match="no setting"):
        scc.defend(scc.load("scc-tiny-digits"), "rtpt", view=3)


def test_runs_on_the_bundled_model(tiny, digits):
    x, y = digits[0][:16], digits[1][:16]
    logits = scc.defend(tiny, "rtpt", seed=0)(x[:4])
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    # digits are not flip-invariant: without the flip R-TPT keeps the bundled model's accuracy
    acc = (scc.defend(tiny, "rtpt", seed=0, flip=False)(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.875, acc
