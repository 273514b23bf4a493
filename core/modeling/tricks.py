"""The seeds' training techniques, each implemented once, pure and unit-tested.

Everything here works on plain ``torch`` modules and tensors (no config, no I/O) so that each
technique can be checked on a tiny model against a hand computation (``tests/test_tricks.py``);
``core.training.train`` wires them into the loop from the ``tricks`` config section.

Class order everywhere: E, S, C, I. "Targets" are class-probability rows ``(B, 4)`` (one-hot for
hard labels; soft for label smoothing, self-distillation, pseudo-labels and mixup), so every loss
here takes soft targets and reduces to the usual hard-label loss on one-hot rows.

Sources (one per technique, repeated in each docstring):
  EMA (Polyak & Juditsky 1992; the warm-up form of TensorFlow's ExponentialMovingAverage),
  FGM (Miyato, Dai & Goodfellow 2017, arXiv:1605.07725), PGD (Madry et al. 2018, arXiv:1706.06083),
  AWP (Wu, Xia & Wang 2020, arXiv:2004.05884), R-Drop (Liang et al. 2021, arXiv:2106.14448),
  Poly-1 (Leng et al. 2022, arXiv:2204.12511), focal loss (Lin et al. 2017, arXiv:1708.02002),
  label smoothing (Szegedy et al. 2016, arXiv:1512.00567), multi-sample dropout (Inoue 2019,
  arXiv:1905.09788), mixup (Zhang et al. 2018, arXiv:1710.09412; on hidden vectors: Verma et al.
  2019, arXiv:1806.05236), self-distillation (Furlanello et al. 2018, arXiv:1805.04770),
  pseudo-labels (Lee 2013), LLRD (Howard & Ruder 2018, arXiv:1801.06146; Sun et al. 2019,
  arXiv:1905.05583), gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear
  Memory Cost", arXiv:1604.06174; transformers' ``gradient_checkpointing_enable``), weighted layer
  pooling and multi-sample dropout (in core.modeling.model).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

N_CLASSES = 4


# ---- targets and losses ------------------------------------------------------------------------


def one_hot(labels: torch.Tensor | np.ndarray, n_classes: int = N_CLASSES) -> torch.Tensor:
    """Class indices (B,) int -> one-hot float32 rows (B, n_classes)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    return F.one_hot(labels, n_classes).float()


def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing: ``(1 - s) * q + s / C`` on target rows (B, C).

    Source: Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7 (arXiv:1512.00567).

    Raises:
        ConfigError: ``smoothing`` outside [0, 1).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"tricks.label_smoothing={smoothing}: expected 0 <= s < 1")
    if smoothing == 0.0:
        return targets
    return (1.0 - smoothing) * targets + smoothing / targets.shape[-1]


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    kind: str = "ce",
    *,
    label_smoothing: float = 0.0,
    class_weights: torch.Tensor | None = None,
    poly1_epsilon: float = 1.0,
    focal_gamma: float = 2.0,
) -> torch.Tensor:
    """Mean loss of logits (B, C) against target rows (B, C) (soft or one-hot), a scalar tensor.

    ``kind``:
      - ``"ce"``: cross-entropy ``-sum_c q_c log p_c``.
      - ``"poly1"``: Poly-1 = CE + epsilon * (1 - p_t), with ``p_t = sum_c q_c p_c`` (the
        target's probability; with smoothed labels as in the paper's sec. 4). Leng et al. 2022,
        "PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions", eq. 3
        (arXiv:2204.12511). The MultiTask Pre-Training seed's Table 4: Poly-1 beats CE, focal, GHM.
      - ``"focal"``: ``-sum_c q_c (1 - p_c)^gamma log p_c`` (= ``-(1 - p_t)^gamma log p_t`` for a
        hard label). Lin et al. 2017, "Focal Loss for Dense Object Detection", eq. 4
        (arXiv:1708.02002); gamma = 0 gives CE.

    Label smoothing (:func:`smooth_targets`) is applied to the targets first. Class weights (C,)
    weight each example by ``w_i = sum_c w_c q_c`` (``w_y`` for a hard label) and the mean is
    ``sum_i w_i l_i / sum_i w_i``: exactly ``F.cross_entropy(weight=w)`` on hard labels.

    Raises:
        ConfigError: unknown ``kind``, bad smoothing, class weights of the wrong length.
    """
    q = smooth_targets(targets.float(), label_smoothing)
    logp = F.log_softmax(logits.float(), dim=-1)
    if kind == "ce":
        per = -(q * logp).sum(-1)
    elif kind == "poly1":
        p_t = (q * logp.exp()).sum(-1)
        per = -(q * logp).sum(-1) + poly1_epsilon * (1.0 - p_t)
    elif kind == "focal":
        per = -(q * (1.0 - logp.exp()).pow(focal_gamma) * logp).sum(-1)
    else:
        raise ConfigError(f"tricks.loss={kind!r}: expected one of ce, poly1, focal")
    if class_weights is None:
        return per.mean()
    w = torch.as_tensor(class_weights, dtype=per.dtype, device=per.device)
    if w.shape != (logits.shape[-1],):
        raise ConfigError(
            f"tricks.class_weights: expected {logits.shape[-1]} weights (E, S, C, I), got {tuple(w.shape)}"
        )
    w_i = q @ w
    return (w_i * per).sum() / w_i.sum().clamp_min(1e-12)


def rdrop_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """R-Drop's symmetric KL between two dropout passes: ``(KL(p_a||p_b) + KL(p_b||p_a)) / 2``.

    Logits (B, C) -> scalar, the sum over classes averaged over the batch (nats). Symmetric in its
    arguments, zero for identical logits. The training loss is then
    ``(CE_a + CE_b) / 2 + alpha * rdrop_kl`` (the paper's eq. 3 up to a factor 2 on all terms).

    Source: Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", eq. 2-3
    (arXiv:2106.14448); the MultiTask Pre-Training seed's Table 5.
    """
    la = F.log_softmax(logits_a.float(), dim=-1)
    lb = F.log_softmax(logits_b.float(), dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    kl_ba = (lb.exp() * (lb - la)).sum(-1)
    return 0.5 * (kl_ab + kl_ba).mean()


def distill_targets(oof_probs: np.ndarray, labels: np.ndarray, weight: float = 0.3) -> np.ndarray:
    """Self-distillation soft labels: ``w * OOF + (1 - w) * one_hot(label)``, float32 (N, 4).

    Args:
        oof_probs: (N, 4) out-of-fold class probabilities of the first (teacher) k-fold pass.
        labels: (N,) class indices.
        weight: w, the share of the OOF prediction (0.3 in the KDD Cup 2022 Task-1 winner's recipe).

    Source: Furlanello et al. 2018, "Born Again Neural Networks" (arXiv:1805.04770); the Task-1
    winner's recipe (soft labels 0.3 * OOF + 0.7 * hard).

    Raises:
        ConfigError: weight outside [0, 1]; ValueError: shapes or NaN in the OOF rows.
    """
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"tricks.distill_weight={weight}: expected 0 <= w <= 1")
    oof_probs = np.asarray(oof_probs, dtype=np.float64)
    labels = np.asarray(labels)
    if oof_probs.shape != (len(labels), N_CLASSES) or np.isnan(oof_probs).any():
        raise ValueError(f"distill_targets: OOF probabilities {oof_probs.shape} with NaN or not (N={len(labels)}, 4)")
    hard = np.eye(N_CLASSES)[labels]
    return (weight * oof_probs + (1.0 - weight) * hard).astype(np.float32)


def select_pseudo_labels(probs: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Rows whose top class probability is ``>= threshold``: a bool mask (N,) over probs (N, 4).

    The selected rows are added to training with their probabilities as soft labels.
    Source: Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method"
    (ICML workshop); threshold 0.7 as in the KDD Cup 2022 Task-1 winner's recipe.

    Raises:
        ConfigError: threshold outside (0, 1].
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"tricks.pseudo_threshold={threshold}: expected 0 < t <= 1")
    probs = np.asarray(probs)
    return probs.max(axis=1) >= threshold


def mixup(
    pooled: torch.Tensor, targets: torch.Tensor, lam: float, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of pooled vectors (B, H) and their target rows (B, C) with a permutation (B,).

    ``x' = lam * x + (1 - lam) * x[perm]``, ``q' = lam * q + (1 - lam) * q[perm]``; draw ``lam``
    from Beta(alpha, alpha) with :func:`draw_mixup`. Sources: Zhang et al. 2018, "mixup: Beyond
    Empirical Risk Minimization" (arXiv:1710.09412); on hidden vectors: Verma et al. 2019,
    "Manifold Mixup" (arXiv:1806.05236).
    """
    return lam * pooled + (1.0 - lam) * pooled[perm], lam * targets + (1.0 - lam) * targets[perm]


def draw_mixup(batch_size: int, alpha: float, rng: np.random.Generator) -> tuple[float, torch.Tensor]:
    """``(lam ~ Beta(alpha, alpha), a random permutation (batch_size,) int64)`` from ``rng``.

    Raises:
        ConfigError: alpha <= 0.
    """
    if alpha <= 0:
        raise ConfigError(f"tricks.mixup_alpha={alpha}: expected > 0")
    return float(rng.beta(alpha, alpha)), torch.from_numpy(rng.permutation(batch_size))


# ---- weights: EMA -----------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    After each optimiser step ``update()`` sets ``shadow = d_t * shadow + (1 - d_t) * param`` with
    ``d_t = min(decay, (1 + t) / (10 + t))`` (t = number of updates so far, from 0; the warm-up
    of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so short CPU runs do not stay
    at the initial weights); ``warmup=False`` uses ``decay`` from the first step. Evaluation and
    checkpoints use the shadow weights: ``with ema.applied(model): ...`` swaps them in and puts
    the trained weights back exactly afterwards.

    Source: Polyak & Juditsky 1992, "Acceleration of Stochastic Approximation by Averaging";
    the MultiTask Pre-Training seed's Table 5 (EMA first).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"tricks.ema_decay={decay}: expected 0 < decay < 1")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {n: t.detach().clone() for n, t in model.state_dict().items() if t.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next ``update()`` uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for n, t in model.state_dict().items():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(t.detach().to(self.shadow[n].dtype), alpha=1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights merged into a full state dict shape (non-float buffers excluded)."""
        return dict(self.shadow)

    def applied(self, model: nn.Module):
        """Context manager: the model holds the EMA weights inside, its own weights after."""
        return _Swapped(model, self.shadow)


class _Swapped:
    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]):
        self.model, self.weights, self.backup = model, weights, None

    def __enter__(self):
        sd = self.model.state_dict()
        self.backup = {n: sd[n].detach().clone() for n in self.weights}
        self.model.load_state_dict(self.weights, strict=False)
        return self.model

    def __exit__(self, *exc):
        self.model.load_state_dict(self.backup, strict=False)
        self.backup = None


# ---- adversarial training ---------------------------------------------------------------------


def _params_matching(model: nn.Module, name_part: str) -> list[tuple[str, nn.Parameter]]:
    found = [(n, p) for n, p in model.named_parameters() if name_part in n]
    if not found:
        raise ConfigError(f"adversarial training: no parameter of the model matches {name_part!r}")
    return found


def embedding_param_name(model: nn.Module) -> str:
    """Name of the word-embedding matrix (V, H) of a transformers backbone inside ``model``."""
    for n, _ in model.named_parameters():
        if n.endswith("word_embeddings.weight") or n.endswith("embed_tokens.weight"):
            return n
    raise ConfigError("adversarial training: the model has no word_embeddings/embed_tokens matrix")


class _EmbeddingAttack:
    """Shared state of FGM and PGD: the attacked parameters and their saved copies."""

    params: list[tuple[str, nn.Parameter]]
    backup: dict[str, torch.Tensor]

    @torch.no_grad()
    def restore(self) -> None:
        """Put every attacked matrix back bit for bit and forget the saved copies."""
        for n, p in self.params:
            if n in self.backup:
                p.data.copy_(self.backup[n])
        self.backup = {}


class FGM(_EmbeddingAttack):
    """Fast Gradient Method on the word embeddings.

    ``attack()`` (after the clean backward) adds ``r = epsilon * g / ||g||_2`` to the embedding
    matrix (g its gradient; the norm over the whole matrix, so only the rows of the batch's tokens
    move), ``restore()`` puts the saved matrix back bit for bit. The adversarial loss's gradient
    is added to the clean one. Use :meth:`backward_adversarial`.

    Source: Miyato, Dai & Goodfellow 2017, "Adversarial Training Methods for Semi-Supervised Text
    Classification", eq. 5 (arXiv:1605.07725); the MultiTask seed's Table 5 and the Task-1 winner.
    """

    def __init__(self, model: nn.Module, epsilon: float = 1.0, param_name: str | None = None):
        self.model = model
        self.epsilon = epsilon
        self.params = _params_matching(model, param_name or embedding_param_name(model))
        self.backup: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def attack(self) -> float:
        """Perturb; returns the perturbation's norm (epsilon, or 0 when the gradient is 0)."""
        total = 0.0
        for n, p in self.params:
            if p.grad is None:
                continue
            self.backup[n] = p.data.clone()
            norm = torch.linalg.vector_norm(p.grad.float())
            if norm > 0 and torch.isfinite(norm):
                r = self.epsilon * p.grad / norm
                p.data.add_(r.to(p.dtype))
                total += float(torch.linalg.vector_norm(r.float())) ** 2
        return math.sqrt(total)

    def backward_adversarial(
        self, compute_loss: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """Attack, forward + backward the adversarial loss (gradients add up), restore; returns it."""
        self.attack()
        try:
            adv_loss = compute_loss()
            backward(adv_loss)
        finally:
            self.restore()
        return adv_loss.detach()


class PGD(_EmbeddingAttack):
    """Projected Gradient Descent on the word embeddings: K ascent steps inside an L2 ball.

    Each step adds ``alpha * g / ||g||`` and projects the total perturbation onto
    ``||r|| <= epsilon`` around the saved matrix; the clean gradients are kept aside during the
    K - 1 inner steps and the last adversarial gradient is added to them (the "FreeLB/PGD" recipe
    used in the Kaggle/KDD Cup code). ``restore()`` puts the matrix back exactly.

    Source: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks",
    eq. 2 (arXiv:1706.06083); on embeddings as in Zhu et al. 2020 (FreeLB, arXiv:1909.11764).
    """

    def __init__(
        self, model: nn.Module, epsilon: float = 1.0, alpha: float = 0.3, steps: int = 3, param_name: str | None = None
    ):
        if steps < 1:
            raise ConfigError(f"tricks.pgd_steps={steps}: expected >= 1")
        self.model, self.epsilon, self.alpha, self.steps = model, epsilon, alpha, steps
        self.params = _params_matching(model, param_name or embedding_param_name(model))
        self.backup: dict[str, torch.Tensor] = {}
        self.grad_backup: dict[str, torch.Tensor | None] = {}

    @torch.no_grad()
    def attack(self, first: bool) -> None:
        for n, p in self.params:
            if p.grad is None:
                continue
            if first:
                self.backup[n] = p.data.clone()
            norm = torch.linalg.vector_norm(p.grad.float())
            if norm > 0 and torch.isfinite(norm):
                p.data.add_((self.alpha * p.grad / norm).to(p.dtype))
                p.data.copy_(self.project(n, p.data))

    def project(self, name: str, data: torch.Tensor) -> torch.Tensor:
        """The matrix with its perturbation clipped to L2 norm epsilon."""
        r = data - self.backup[name]
        norm = torch.linalg.vector_norm(r.float())
        if norm > self.epsilon:
            r = r * (self.epsilon / norm)
        return self.backup[name] + r

    def backward_adversarial(
        self, compute_loss: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """K attacks; the clean grads plus the last adversarial loss's grads remain. Returns it."""
        grads = {
            n: (p.grad.detach().clone() if p.grad is not None else None)
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }
        adv_loss = torch.zeros(())
        try:
            for t in range(self.steps):
                self.attack(first=t == 0)
                if t < self.steps - 1:
                    self.model.zero_grad(set_to_none=False)
                else:  # the last step accumulates onto the clean gradients
                    for n, p in self.model.named_parameters():
                        if n in grads:
                            p.grad = grads[n]
                adv_loss = compute_loss()
                backward(adv_loss)
        finally:
            self.restore()
        return adv_loss.detach()


class AWP:
    """Adversarial Weight Perturbation of the weight matrices (names containing ``param_name``).

    One ascent step per ``adv_steps``: ``w += adv_lr * g / ||g|| * ||w||`` (per matrix), clipped
    element-wise to ``[w0 - adv_eps * |w0|, w0 + adv_eps * |w0|]`` around the saved weights ``w0``;
    the adversarial loss's gradient (taken at the perturbed weights) is added to the clean one and
    ``restore()`` puts ``w0`` back exactly. Parameters whose names start with one of
    ``skip_prefixes`` are never perturbed (core.training.train passes the side-feature tables, ``semantic.``). Starts only once ``active(epoch, loss)`` says so
    (after ``start_epoch`` epochs and/or once the running training loss is below ``start_loss``).

    Source: Wu, Xia & Wang 2020, "Adversarial Weight Perturbation Helps Robust Generalization",
    eq. 7-9 (arXiv:2004.05884); the Feedback Prize / KDD Cup 2022 Task-1 winner's implementation.
    """

    def __init__(
        self,
        model: nn.Module,
        adv_lr: float = 1.0,
        adv_eps: float = 0.01,
        adv_steps: int = 1,
        param_name: str = "weight",
        start_epoch: float = 0.0,
        start_loss: float | None = None,
        skip_prefixes: tuple[str, ...] = (),
    ):
        self.model, self.adv_lr, self.adv_eps, self.adv_steps = model, adv_lr, adv_eps, adv_steps
        self.skip_prefixes = tuple(skip_prefixes)
        self.param_name, self.start_epoch, self.start_loss = param_name, start_epoch, start_loss
        self.backup: dict[str, torch.Tensor] = {}
        self.bounds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.started = False

    def active(self, epoch: float, running_loss: float | None) -> bool:
        """True from the first call with ``epoch >= start_epoch`` and (if set) loss <= start_loss."""
        if not self.started:
            ok = epoch >= self.start_epoch
            if self.start_loss is not None:
                ok = ok and running_loss is not None and running_loss <= self.start_loss
            self.started = ok
        return self.started

    def _targets(self):
        for n, p in self.model.named_parameters():
            if (
                p.requires_grad
                and p.grad is not None
                and self.param_name in n
                and p.ndim >= 2
                and not n.startswith(self.skip_prefixes)
            ):
                yield n, p

    @torch.no_grad()
    def save(self) -> None:
        for n, p in self._targets():
            if n not in self.backup:
                self.backup[n] = p.data.clone()
                eps = self.adv_eps * p.data.abs()
                self.bounds[n] = (self.backup[n] - eps, self.backup[n] + eps)

    @torch.no_grad()
    def attack_step(self) -> None:
        for n, p in self._targets():
            if n not in self.backup:
                continue
            g_norm = torch.linalg.vector_norm(p.grad.float())
            w_norm = torch.linalg.vector_norm(p.data.float())
            if g_norm > 0 and torch.isfinite(g_norm):
                p.data.add_((self.adv_lr * p.grad / (g_norm + 1e-6) * (w_norm + 1e-6)).to(p.dtype))
                lo, hi = self.bounds[n]
                p.data.copy_(torch.minimum(torch.maximum(p.data, lo), hi))

    @torch.no_grad()
    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        for n, w0 in self.backup.items():
            params[n].data.copy_(w0)
        self.backup, self.bounds = {}, {}

    def backward_adversarial(
        self, compute_loss: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None]
    ) -> torch.Tensor:
        """Save, ``adv_steps`` x (perturb, forward, backward), restore; returns the last adv loss."""
        self.save()
        adv_loss = torch.zeros(())
        try:
            for _ in range(self.adv_steps):
                self.attack_step()
                adv_loss = compute_loss()
                backward(adv_loss)
        finally:
            self.restore()
        return adv_loss.detach()


# ---- optimiser parameter groups ----------------------------------------------------------------

_LAYER_RE = re.compile(r"\.(?:layer|layers|block|h)\.(\d+)\.")


def layer_index(name: str, n_layers: int) -> int:
    """Depth of a backbone parameter: 0 for embeddings, i + 1 for encoder layer i, n_layers + 1
    for anything above the encoder (pooler, final norm)."""
    m = _LAYER_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embed" in name:
        return 0
    return n_layers + 1


def param_groups(
    model: nn.Module,
    lr: float,
    head_lr: float,
    weight_decay: float,
    layer_decay: float = 1.0,
    n_layers: int | None = None,
) -> list[dict]:
    """AdamW parameter groups: backbone at ``lr`` (optionally layer-wise decayed), the rest at ``head_lr``.

    Layer-wise LR decay (LLRD): a backbone parameter at depth ``d`` (:func:`layer_index`; embeddings
    0, encoder layer i -> i + 1, above the encoder n_layers + 1) gets
    ``lr * layer_decay ** max(0, n_layers - d)``, so the top encoder layer (and anything above it)
    keeps ``lr``, each layer below is multiplied by ``layer_decay``, the embeddings get
    ``lr * layer_decay ** n_layers``. Biases and
    LayerNorm weights get no weight decay; parameters outside ``backbone.`` (head, layer-pooling
    weights) get ``head_lr`` and no weight decay. Frozen parameters are left out.

    Source: Howard & Ruder 2018, "Universal Language Model Fine-tuning" (discriminative
    fine-tuning, arXiv:1801.06146); Sun et al. 2019, "How to Fine-Tune BERT for Text
    Classification?", sec. 5.3 (arXiv:1905.05583).

    Raises:
        ConfigError: layer_decay outside (0, 1].
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"tricks.llrd_decay={layer_decay}: expected 0 < decay <= 1")
    if n_layers is None:
        n_layers = int(getattr(getattr(getattr(model, "backbone", None), "config", None), "num_hidden_layers", 0) or 0)
    groups: dict[tuple[bool, float, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not name.startswith("backbone."):
            key = (True, head_lr, 0.0)
        else:
            depth = layer_index(name, n_layers)
            g_lr = lr * layer_decay ** max(0, n_layers - depth) if layer_decay < 1.0 else lr
            wd = 0.0 if (p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name) else weight_decay
            key = (False, g_lr, wd)
        groups.setdefault(key, []).append(p)
    # order: backbone groups from the top layer's lr down, the head last (group 0's lr is the logged train/lr)
    order = sorted(groups, key=lambda k: (k[0], -k[1], -k[2]))
    return [{"params": groups[k], "lr": k[1], "weight_decay": k[2]} for k in order]


def parse_class_weights(weights: Iterable[float] | None) -> torch.Tensor | None:
    """``tricks.class_weights`` (E, S, C, I) -> a float32 tensor (4,), or None.

    Raises:
        ConfigError: not 4 values, or a negative / all-zero weight vector.
    """
    if weights is None:
        return None
    w = [float(x) for x in weights]
    if len(w) != N_CLASSES or min(w) < 0 or sum(w) <= 0:
        raise ConfigError(f"tricks.class_weights={w}: expected 4 non-negative weights (E, S, C, I), not all 0")
    return torch.tensor(w, dtype=torch.float32)
