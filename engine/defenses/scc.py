"""SCC: Self-Calibrated Consistency (Liu et al., ICML 2026), the spec's section 3.3 reconstruction.

    Stage 0  warm-up       Delta_w, tau = TTC counterattack(x_a)              (K_w steps, tau gate, beta weights)
    views    u_l(z)        = clip(flip/zoom_l(z) + sigma * n_l, 0, 1),  l = 1..L,  n_l drawn once per image
    Stage 1  prototype     c_i = normalize(f(u_i(x_a + Delta_w))),  q_i = softmax(s_p * c_i T^T)
                           qbar = mean_i q_i,  q_sh = qbar^(1/T) / sum qbar^(1/T),  t_soft = normalize(q_sh T)
                           y_hat = argmax qbar
    Stage 2  correction    delta = Delta_w; repeat S times:
                           c_l = normalize(f(u_l(x_a + delta)))                  (one batched forward of L views)
                           L_cm = mean_l <c_l, t_soft> - max_{k != y_hat} mean_l <c_l, T_k>
                           delta = Pi_eps(delta + alpha * sign(grad L_cm))
    Stage 3  prediction    z = mean_l s * normalize(f(u_l(x_a + delta))) T^T

Fusion (exact): with N = L views and delta starting at Delta_w, Stage 1's forward is Stage 2's first forward;
q, t_soft and y_hat are computed from its detached output inside the same gradient call.
Switches: `semantic=False` skips Stages 1-2 (predict with Stage 3 on x_w); `spatial=False` uses the identity
view alone in Stages 2-3 (Stage 1 keeps its N views); both off is TTC exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..draws import Draw
from ..errors import SccError
from ..grad import input_grad
from ..models import ZeroShotClassifier
from ..perturbation import sign_step
from .ttc import TTC_DRAWS, TTCConfig, counterattack
from .views import View, apply_views, embed_views, parse_views


@dataclass(frozen=True)
class SCCConfig:
    warmup: TTCConfig = field(default_factory=TTCConfig)  # [R] the full TTC procedure, K_w = warmup.steps
    views: tuple[str, ...] = ("id", "flip", "noise", "flip+noise")  # [R] L = 4: identity, flip, +noise
    proto_views: tuple[str, ...] | None = None  # [R] N views for Stage 1; None = the same as `views` (N = L)
    sigma: float = 0.01  # [R] Gaussian view noise std, [0,1] pixel scale
    sharpen: float = 0.5  # [R] sharpening temperature T < 1
    proto_scale: float | None = None  # [R] softmax scale of q_i; None = the model's logit scale
    eps: float = 4 / 255  # [R] corrective radius, l_inf, centred on x_a
    alpha: float = 1 / 255  # [R] corrective step
    steps: int = 3  # [R] S
    init: str = "warmup"  # [R] delta starts at Delta_w ("warmup") or at 0 ("zero")
    aggregate: str = "mean_cos"  # [R] "mean_cos": margin of view-averaged cosines; "mean_margin": mean of margins
    fuse: bool = True  # share Stage 1's forward with Stage 2's first step when that is exact
    semantic: bool = True  # ablation switch: Stages 1-2
    spatial: bool = True  # ablation switch: L views (else identity only) in Stages 2-3
    correct_clean: bool = True  # [R] inputs with tau >= tau_thres also go through Stages 1-3 (else TTC output)

    def __post_init__(self):  # frozen: normalise the fields in place with object.__setattr__
        if isinstance(self.warmup, dict):
            object.__setattr__(self, "warmup", TTCConfig(**self.warmup))
        object.__setattr__(self, "views", tuple(self.views.split(",")) if isinstance(self.views, str) else tuple(self.views))
        if isinstance(self.proto_views, str):
            object.__setattr__(self, "proto_views", tuple(self.proto_views.split(",")))
        parse_views(self.views)
        if self.proto_views is not None:
            parse_views(self.proto_views)
        if self.steps < 0:
            raise SccError(f"steps must be >= 0, got {self.steps}")
        if not 0 < self.sharpen <= 1:
            raise SccError(f"sharpening temperature must be in (0, 1], got {self.sharpen}")
        if self.init not in ("warmup", "zero"):
            raise SccError(f"init must be 'warmup' or 'zero', got {self.init!r}")
        if self.aggregate not in ("mean_cos", "mean_margin"):
            raise SccError(f"aggregate must be 'mean_cos' or 'mean_margin', got {self.aggregate!r}")

    # the views actually used, after the ablation switches
    def stage_views(self) -> tuple[View, ...]:
        return parse_views(self.views) if self.spatial else (View(),)

    def prototype_views(self) -> tuple[View, ...]:
        return parse_views(self.proto_views) if self.proto_views is not None else parse_views(self.views)

    def n_noise(self) -> int:
        return max(len(self.stage_views()), len(self.prototype_views()))


# the warm-up's random start (B, 3, H, W) ~ U(-1, 1), then the view noise (B, L, 3, H, W) ~ N(0, 1)
SCC_DRAWS = {**TTC_DRAWS, "noise": Draw("normal", shape=lambda cfg, image: (cfg.n_noise(), *image))}


def view_cosines(clf: ZeroShotClassifier, z: torch.Tensor, views, noise, sigma) -> torch.Tensor:
    """(B, L, C): cos(f(u_l(z)), T_k) for every view l and class k, from one batched forward."""
    c = F.normalize(embed_views(clf, z, views, noise, sigma), dim=-1)  # (B*L, D)
    return (c @ clf.text.t()).view(z.shape[0], len(views), -1)  # (B*L, C) -> (B, L, C)


def soft_prototype(cos: torch.Tensor, clf: ZeroShotClassifier, cfg: SCCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 from detached view cosines (B, N, C): t_soft (B, D), y_hat (B,)."""
    scale = clf.logit_scale if cfg.proto_scale is None else cfg.proto_scale
    qbar = torch.softmax(scale * cos.detach(), -1).mean(1)  # (B, C)
    q_sh = torch.softmax(torch.log(qbar.clamp_min(1e-30)) / cfg.sharpen, -1)  # qbar^(1/T), renormalised
    return F.normalize(q_sh @ clf.text, dim=-1), qbar.argmax(-1)


def margin(cos: torch.Tensor, t_soft_cos: torch.Tensor, y_hat: torch.Tensor, aggregate: str) -> torch.Tensor:
    """L_cm summed over the batch. cos (B, L, C), t_soft_cos (B, L), y_hat (B,)."""
    # (B, 1, C); a comparison rather than F.one_hot, whose value checks torch 2.11 cannot trace under compile
    hard = (y_hat[:, None] == torch.arange(cos.shape[-1], device=y_hat.device))[:, None, :]
    if aggregate == "mean_cos":
        neg = cos.mean(1).masked_fill(hard[:, 0], float("-inf")).amax(-1)  # (B,)
        return (t_soft_cos.mean(1) - neg).sum()
    neg = cos.masked_fill(hard, float("-inf")).amax(-1)  # (B, L)
    return (t_soft_cos - neg).mean(1).sum()


def scc(clf: ZeroShotClassifier, x: torch.Tensor, cfg: SCCConfig, start: torch.Tensor, noise: torch.Tensor,
        trace: list | None = None, record: dict | None = None) -> torch.Tensor:
    """Logits (B, C); `trace` collects each step's gradient sign, `record` the final perturbation (B, 3, H, W)
    (the one Stage 3 predicts from)."""
    views, pviews = cfg.stage_views(), cfg.prototype_views()
    record = {} if record is None else record

    # Stage 0: warm-up counterattack
    delta_w, tau = counterattack(clf, x, cfg.warmup, start, trace)

    def predict(delta):  # Stage 3: view-averaged logits
        if len(views) == 1 and views[0].is_identity:  # plain forward: both-off is TTC to the last op
            return clf.logits_from_embedding(clf.embed(x + delta))
        return clf.logit_scale * view_cosines(clf, x + delta, views, noise, cfg.sigma).mean(1)

    if not cfg.semantic:
        record["perturbation"] = delta_w
        return predict(delta_w)

    delta = delta_w if cfg.init == "warmup" else torch.zeros_like(delta_w)

    def view_embeddings(d):  # one batched forward of the L views of x + d
        c = F.normalize(clf.embed(apply_views(x + d, views, noise, cfg.sigma)), dim=-1)  # (B*L, D)
        c = c.view(x.shape[0], len(views), -1)  # (B, L, D)
        return c, c @ clf.text.t()  # (B, L, D), (B, L, C)

    def fused(d):  # Stage 1 + the first Stage 2 step on one forward
        c, cos = view_embeddings(d)
        t_soft, y_hat = soft_prototype(cos, clf, cfg)
        soft = (c * t_soft[:, None]).sum(-1)  # (B, L)
        return margin(cos, soft, y_hat, cfg.aggregate), (t_soft, y_hat)

    def step_loss(d, t_soft, y_hat):
        c, cos = view_embeddings(d)
        return margin(cos, (c * t_soft[:, None]).sum(-1), y_hat, cfg.aggregate)

    steps_left = cfg.steps
    can_fuse = cfg.fuse and cfg.init == "warmup" and pviews == views and cfg.steps > 0
    if can_fuse:
        g, (t_soft, y_hat) = input_grad(fused, has_aux=True)(delta)
        if trace is not None:
            trace.append(g.sign())
        delta = sign_step(delta, g, x, cfg.alpha, cfg.eps, clf.kernels)
        steps_left -= 1
    else:  # Stage 1 on its own forward
        with torch.no_grad():
            t_soft, y_hat = soft_prototype(view_cosines(clf, x + delta_w, pviews, noise, cfg.sigma), clf, cfg)
    grad_step = input_grad(step_loss)
    for _ in range(steps_left):
        g = grad_step(delta, t_soft, y_hat)
        if trace is not None:
            trace.append(g.sign())
        delta = sign_step(delta, g, x, cfg.alpha, cfg.eps, clf.kernels)

    record["perturbation"] = delta
    logits = predict(delta)
    if not cfg.correct_clean:  # inputs that look clean (tau >= thres) keep TTC's output
        ttc_logits = clf.logits_from_embedding(clf.embed(x + delta_w))
        corrected = tau < cfg.warmup.tau_thres
        logits = torch.where(corrected[:, None], logits, ttc_logits)
        record["perturbation"] = torch.where(corrected.view(-1, 1, 1, 1), delta, delta_w)
    return logits
