"""A top-1 MoE of small CNNs routed by a linear function of the sum of image patches (Chen et al. 2022).

The image model of Chen, Deng, Wu, Gu & Li 2022 ("Towards Understanding Mixture of Experts in Deep
Learning", CIFAR-10-Rotate experiment; official code ``cifar10-rotate/moe.py``),
scaled down to small grey images:

  * router  ``h(x) = Σ_p W x^(p) + P·b`` (B, E): a linear map of the **sum of the P non-overlapping
    s×s patches** x^(p) (= ``Conv2d(I, E, s, stride=s)`` summed over its P output positions, with a
    bias, as in the official code), zero-initialised;
  * ``π(x) = softmax(h(x) + r)``, ``r ~ U[0,1)^E`` drawn fresh at every *training* forward (the official
    rotate router adds the noise only ``if self.training``; ``noise_in_eval=True`` keeps it at test
    time, as the official *synthetic* code does);
  * top-1: ``m(x) = argmax_m π_m(x)``, ``f(x) = π_{m(x)}(x) · f_{m(x)}(x)`` — the gate scales the chosen
    expert's class logits, which is how the task loss reaches the router (``gate="logit"`` uses the
    chosen noisy logit ``h_m + r_m`` instead, the synthetic code's gate, cf. ``models/chen2022.py``);
  * balance loss ``L_bal = E · Σ_m f_m P_m`` (f_m: share of the batch routed to m, P_m = mean_x π_m(x);
    the official ``E² · mean_m(f_m P_m)``, same value), returned weighted by ``w_balance`` (0.01).

Experts are trained with the official "normalised GD" (:func:`normalize_expert_gradients_`, then a
plain momentum-SGD step); the router with SGD.

Legend: B batch (images), I input channels, U × X image height × width (square), D = I·s·s (one flat patch,
the router's input features), E experts, Y classes (labels), H hidden units; s is the patch side, w the CNN
width, and P (= (U/s)² patches) and f_m P_m are the paper's symbols in its formulas (see the package legend).
The public arguments keep their historical name ``x_BCSS``: a (B, I, U, X) batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit import losses as L
from moekit.dispatch import Assignments, LocalDispatcher, ReferenceDispatcher, expert_counts
from moekit.experts import ModuleExperts
from moekit.routing.base import Router
from moekit.routing.plans import TokenChoicePlan
from moekit.types import MoEOutput, detach_metrics
from moekit._validation import positive_int as _positive_int

GATES = ("softmax", "logit")


def _check_images(x: object, channels: int, size: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"x: expected shape (B, {channels}, {size}, {size}), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    return x


@torch.no_grad()
def default_init_(module: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """PyTorch's default init of every Conv2d / Linear in ``module``, drawn from ``generator``:
    weight and bias ~ U(−1/√fan_in, 1/√fan_in) (what ``kaiming_uniform_(a=√5)`` gives). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / math.sqrt(m.weight[0].numel())   # fan_in = in_channels · kernel area
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)
    return module


class SmallCNN(nn.Module):
    """The expert and the single-model baseline: a two-conv CNN for small images.

    ``x → ReLU(conv3×3(I→w)) → ReLU(conv3×3(w→2w)) → maxpool 2 → flatten → ReLU(linear(2w·(U/2)²→H))
    → linear(H→Y)``. Returns class logits (B, Y). No batch norm, so an image's logits do not depend
    on which other images share its batch (an MoE expert sees only the images routed to it).
    ``generator`` draws the default init (:func:`default_init_`) reproducibly.
    """

    def __init__(self, num_classes: int, *, image_size: int = 8, in_channels: int = 1, width: int = 16,
                 hidden: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        for name, v in (("num_classes", num_classes), ("image_size", image_size), ("in_channels", in_channels),
                        ("width", width), ("hidden", hidden)):
            _positive_int(name, v)
        if image_size % 2:
            raise ValueError(f"image_size: must be even (one 2×2 max-pool), got {image_size}")
        self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (image_size // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        if generator is not None:
            default_init_(self, generator)

    def forward(self, x_BCSS: Tensor) -> Tensor:
        _check_images(x_BCSS, self.in_channels, self.image_size)
        h = F.relu(self.conv1(x_BCSS))                 # (B, w, U, X)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)     # (B, 2w, U/2, X/2)
        h_BH = F.relu(self.fc1(h.flatten(1)))          # (B, H)
        return self.fc2(h_BH)                          # (B, Y) class logits


def patch_sum(x_BCSS: Tensor, patch_size: int) -> Tensor:
    """``Σ_p x^(p)`` over the (U/s)² non-overlapping s×s patches, flattened in (I, s, s) order: (B, D)."""
    _positive_int("patch_size", patch_size)
    if not isinstance(x_BCSS, Tensor) or x_BCSS.dim() != 4 or x_BCSS.shape[2] != x_BCSS.shape[3]:
        raise ValueError("x_BCSS: expected a (B, I, U, X) tensor with U = X")
    B, I, U, _ = x_BCSS.shape
    if U % patch_size:
        raise ValueError(f"patch_size: must divide the image side {U}, got {patch_size}")
    n = U // patch_size
    # (B, I, n, s, n, s): axes 2 and 4 index the patch position, 3 and 5 the pixel inside the patch
    return x_BCSS.reshape(B, I, n, patch_size, n, patch_size).sum(dim=(2, 4)).reshape(B, -1)


class PatchRouter(Router):
    """Chen et al.'s router: ``h(x) = Σ_p W x^(p) + P·b`` (B, E), plus U[0,1) noise in training.

    A core :class:`~moekit.routing.Router` (token-choice, top-1) whose tokens are images: it takes
    images (B, I, U, X) or the same images flattened to rows (B, I·U·X). Equals
    ``Conv2d(I, E, s, stride=s)(x)`` summed over its P output positions (``weight`` is that conv's
    kernel flattened to (E, D)). Zero-initialised, so at the start the routing is decided by the noise
    alone (uniform over experts). Its decision has ``expert_ids``/``weights`` (B, 1), clean ``logits``
    (B, E), ``noisy_logits`` (B, E; None when no noise was drawn) and ``probs`` = π = softmax of the
    logits that decided the routing. The gate (``weights``) is π_{m(x)} (``gate="softmax"``) or the
    deciding logit itself (``gate="logit"``). Its aux loss is ``w_switch · E·Σ_m f_m P_m`` with P
    from π (the official balance loss).
    """

    default_weights = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 0.0, "w_z": 0.0}
    linear_gate = False                    # its own (E, D) patch weight replaces the core (E, D) gate

    def __init__(self, num_experts: int, *, image_size: int = 8, patch_size: int = 4, in_channels: int = 1,
                 gate: str = "softmax", noise_in_eval: bool = False, bias: bool = True, w_switch: float = 0.0):
        _positive_int("num_experts", num_experts)
        _positive_int("image_size", image_size)
        _positive_int("patch_size", patch_size)
        _positive_int("in_channels", in_channels)
        if image_size % patch_size:
            raise ValueError(f"patch_size: must divide image_size={image_size}, got {patch_size}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        if not isinstance(noise_in_eval, bool):
            raise TypeError(f"noise_in_eval: expected a bool, got {type(noise_in_eval).__name__}")
        super().__init__(in_channels * image_size * image_size, num_experts, 1, zero_init=True, w_switch=w_switch)
        self.image_size, self.patch_size = image_size, patch_size
        self.in_channels, self.gate_kind, self.noise_in_eval = in_channels, gate, noise_in_eval
        self.num_patches = (image_size // patch_size) ** 2
        self.weight = nn.Parameter(torch.zeros(num_experts, in_channels * patch_size * patch_size))  # (E, D)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None                          # (E,)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, image_size={self.image_size}, patch_size={self.patch_size}, "
                f"gate={self.gate_kind!r}, noise_in_eval={self.noise_in_eval}, bias={self.bias is not None}")

    def _images(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.shape[-1] == self.dim:
            return x.reshape(-1, self.in_channels, self.image_size, self.image_size)
        return _check_images(x, self.in_channels, self.image_size)

    def logits(self, x: Tensor) -> Tensor:
        """Clean router logits ``h(x)`` (B, E) of images (B, I, U, X) or flat rows (B, I·U·X)."""
        h_BE = patch_sum(self._images(x), self.patch_size) @ self.weight.t()
        if self.bias is not None:
            h_BE = h_BE + self.num_patches * self.bias   # the conv bias is added at each of the P positions
        return self.assert_finite(h_BE)

    def forward(self, x: Tensor, mask_T: Tensor | None = None, **kwargs) -> TokenChoicePlan:
        if x.dim() == 4:
            x = self._images(x).reshape(x.shape[0], -1)
        return super().forward(x, mask_T, **kwargs)

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> TokenChoicePlan:
        clean_BE = self.logits(x_TD)
        noisy_BE = None
        if self.training or self.noise_in_eval:
            # fresh r ~ U[0,1)^E per image and forward pass (exploration; breaks the zero-init tie)
            r_BE = torch.rand(clean_BE.shape, generator=generator, dtype=clean_BE.dtype)
            noisy_BE = clean_BE + r_BE.to(clean_BE.device)
        deciding_BE = clean_BE if noisy_BE is None else noisy_BE
        pi_BE = torch.softmax(deciding_BE, dim=-1)
        ids_B1 = deciding_BE.argmax(dim=-1, keepdim=True)           # = argmax of π (softmax is monotone)
        source_BE = pi_BE if self.gate_kind == "softmax" else deciding_BE
        gate_B1 = source_BE.gather(-1, ids_B1)
        return TokenChoicePlan(expert_ids=ids_B1, weights=gate_B1, logits=clean_BE, probs=pi_BE,
                               noisy_logits=noisy_BE, priority=pi_BE.detach().max(-1).values)


class _FlatImageExpert(nn.Module):
    """Runs an image expert on flat rows: (R, I·U·X) -> images (R, I, U, X) -> the expert's output."""

    def __init__(self, expert: nn.Module, in_channels: int, image_size: int):
        super().__init__()
        self.expert, self.shape = expert, (in_channels, image_size, image_size)

    def forward(self, x_RD: Tensor) -> Tensor:
        return self.expert(x_RD.reshape(-1, *self.shape))


class PatchMoE(nn.Module):
    """Top-1 MoE of :class:`SmallCNN` experts with a :class:`PatchRouter` (Chen et al. 2022, §7).

    ``f(x) = π_{m(x)}(x) · f_{m(x)}(x)``, ``m(x) = argmax_m π_m(x)``, ``π = softmax(h(x) + r)``,
    ``r ~ U[0,1)^E`` in training only (unless ``noise_in_eval``). Built on the core pieces: the router
    is a core :class:`~moekit.routing.Router` (its statistics give the balance loss), images are
    dispatched to their expert by the :class:`~moekit.dispatch.LocalDispatcher` (each expert runs once
    on its contiguous block of images, :class:`~moekit.experts.ModuleExperts`) and combined back;
    :meth:`forward_reference` runs every expert on every image through the dense reference dispatcher
    (the tests compare the two).

    ``forward(x, generator=None) -> MoEOutput(logits_BY, aux_loss = w_balance·E·Σ_m f_m P_m, metrics)``;
    metrics: ``balance_loss`` (unweighted), ``tokens_per_expert`` (E,), ``router_entropy`` (mean entropy
    of π), ``gate_mean``, ``expert_ids`` (B,). ``generator`` draws the routing noise.
    ``init_generator`` draws the experts' default init reproducibly.
    """

    def __init__(self, num_classes: int, num_experts: int = 4, *, image_size: int = 8, in_channels: int = 1,
                 patch_size: int = 4, width: int = 16, hidden: int = 64, gate: str = "softmax",
                 w_balance: float = 0.01, noise_in_eval: bool = False, router_bias: bool = True,
                 init_generator: torch.Generator | None = None):
        super().__init__()
        _positive_int("num_classes", num_classes)
        _positive_int("num_experts", num_experts)
        if not isinstance(w_balance, (int, float)) or isinstance(w_balance, bool) or not w_balance >= 0:
            raise ValueError(f"w_balance: must be a non-negative number, got {w_balance!r}")
        self.num_classes, self.num_experts = num_classes, num_experts
        self.image_size, self.in_channels = image_size, in_channels
        self.w_balance = float(w_balance)
        self.router = PatchRouter(num_experts, image_size=image_size, patch_size=patch_size,
                                  in_channels=in_channels, gate=gate, noise_in_eval=noise_in_eval, bias=router_bias)
        self.experts = nn.ModuleList(
            SmallCNN(num_classes, image_size=image_size, in_channels=in_channels, width=width, hidden=hidden,
                     generator=init_generator)
            for _ in range(num_experts))

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.experts.parameters())

    def router_parameters(self) -> list[nn.Parameter]:
        return list(self.router.parameters())

    @torch.no_grad()
    def assign(self, x_BCSS: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The expert each image is routed to (B,) long, under the current train/eval mode."""
        return self.router(x_BCSS, generator=generator).expert_ids[:, 0]

    def _check_batch(self, x_BIUX: Tensor) -> None:
        _check_images(x_BIUX, self.in_channels, self.image_size)
        if x_BIUX.shape[0] == 0:
            raise ValueError("x: expected at least one image (the balance loss of an empty batch is undefined)")

    def _run(self, x_BIUX: Tensor, generator: torch.Generator | None, dispatcher) -> MoEOutput:
        self._check_batch(x_BIUX)
        x_flat = x_BIUX.reshape(x_BIUX.shape[0], -1)
        d = self.router(x_flat, generator=generator)                    # router (+ statistics, balance loss)
        a = Assignments.from_grid(d.expert_ids, d.weights, self.num_experts)
        rows, counts, state = dispatcher.dispatch(x_flat, a)             # images grouped by expert
        bank = ModuleExperts([_FlatImageExpert(e, self.in_channels, self.image_size) for e in self.experts],
                             x_flat.shape[-1])                   # a view of the experts, not new parameters
        out = dispatcher.compute(bank, rows, counts, state)            # each expert on its block
        y_BY = dispatcher.combine(out, state)                          # π_{m(x)} · f_{m(x)}(x)
        ids_B = d.expert_ids[:, 0]
        p_BE = d.probs
        bal = L.switch_loss_from_stats(d.stats)     # E·Σ_m f_m P_m from the router's statistics (also for E=1)
        metrics = {
            "balance_loss": bal,
            "tokens_per_expert": expert_counts(ids_B, self.num_experts).float(),
            "router_entropy": -(p_BE * p_BE.clamp_min(1e-12).log()).sum(-1).mean(),
            "gate_mean": d.weights.mean(),
            "expert_ids": ids_B,
        }
        return MoEOutput(y_BY, self.w_balance * bal, detach_metrics(metrics), d.stats)

    def forward(self, x_BCSS: Tensor, generator: torch.Generator | None = None) -> MoEOutput:
        return self._run(x_BCSS, generator, LocalDispatcher())

    def forward_reference(self, x_BCSS: Tensor, generator: torch.Generator | None = None) -> MoEOutput:
        """Slow, obviously right: every expert on every image, ``y = Σ_m 1[m = m(x)] π_m(x) f_m(x)``."""
        return self._run(x_BCSS, generator, ReferenceDispatcher())


@torch.no_grad()
def normalize_expert_gradients_(experts: nn.ModuleList | list[nn.Module]) -> Tensor:
    """Chen et al.'s normalised GD, in place: ``g_e ← g_e / Σ_t ‖g_{e,t}‖₂`` for each expert e, where t
    runs over that expert's parameter tensors with a gradient. Experts with no (or an all-zero)
    gradient are left alone. Returns the per-expert normalisers Σ_t ‖g_{e,t}‖ (E,) in float32.
    Follow with a plain (momentum, weight-decay) SGD step, as the official ``NormalizedGD`` does."""
    norms = []
    for expert in experts:
        grads = [p.grad for p in expert.parameters() if p.grad is not None]
        total = torch.stack([g.norm() for g in grads]).sum() if grads else torch.zeros(())
        if total > 0:
            for g in grads:
                g.div_(total)
        norms.append(total.float().cpu())
    return torch.stack(norms)
