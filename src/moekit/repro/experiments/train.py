"""The one training loop and seeding helper every experiment uses.

* :func:`seed_generator` / :func:`seeded_global` — all randomness of a run comes from ``(seed, stream)``:
  seed = the run's seed (0..runs-1), stream = which random quantity (initialisation, batch order, routing
  noise, ...), mapped to the torch seed ``10_000 · stream + seed``.
* :func:`fit` — epochs of (mini-)batches: zero grads → loss → [early stop] → backward (of the sum, when the
  loss is one value per run of a stacked model) → ``before_update`` (e.g. gradient normalisation) →
  optimiser steps → schedule. Optimisers, learning-rate schedule and early stopping are parameters.
* Schedules: :func:`cosine`, :func:`warmup_cosine` (multipliers of the initial learning rate per step)
  and :class:`OneCycle` (torch's one-cycle policy, learning rate and momentum).
* Per-run optimisers for models stacked over runs (a leading run axis on every parameter), which stop
  runs individually: :class:`RunSGD`, :class:`RunNormalizedGD`, :class:`RunAdam`; per-run stopping rule
  :class:`EarlyStop`.

Legend: T examples, J recorded steps (epochs; = steps for full-batch training); runs (seeds trained side by
side) are counted in words (see the package legend). The public names with a run axis keep their historical
suffix R (one value per run): ``EarlyStop.best_R``/``active_R``, ``RunAdam.step_R`` and the ``loss_R`` and
``active_R`` arguments.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

SEED_STRIDE = 10_000


# ---------------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------------

def seed_value(seed: int, stream: int = 0) -> int:
    """The torch seed of random stream ``stream`` of run ``seed``: ``10_000 · stream + seed``."""
    if not 0 <= seed < SEED_STRIDE:
        raise ValueError(f"seed: expected 0 <= seed < {SEED_STRIDE}, got {seed}")
    if stream < 0:
        raise ValueError(f"stream: expected >= 0, got {stream}")
    return SEED_STRIDE * stream + seed


def seed_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for stream ``stream`` of run ``seed`` (see :func:`seed_value`)."""
    return torch.Generator().manual_seed(seed_value(seed, stream))


@contextlib.contextmanager
def seeded_global(seed: int, stream: int = 0) -> Iterator[None]:
    """Seed torch's global generator for code that draws from it (default layer initialisation, noisy
    routers) and restore the caller's global state on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_value(seed, stream))
        yield


# ---------------------------------------------------------------------------------------------------
# learning-rate schedules: multipliers of each parameter group's initial learning rate at step t of T
# ---------------------------------------------------------------------------------------------------

Schedule = Callable[[int, int], float]


def constant(t: int, total: int) -> float:
    """lr_t = lr."""
    return 1.0


def cosine(t: int, total: int) -> float:
    """lr_t = lr · (1 + cos(π t / T)) / 2: from lr to 0 over the T steps of the run."""
    return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def warmup_cosine(warmup_fraction: float) -> Schedule:
    """Linear warm-up over the first ``max(1, T·warmup_fraction)`` steps times the cosine decay."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction: expected a value in [0, 1), got {warmup_fraction}")

    def factor(t: int, total: int) -> float:
        warmup = max(1, int(total * warmup_fraction))
        return min(1.0, (t + 1) / warmup) * cosine(t, total)
    return factor


@dataclass(frozen=True)
class OneCycle:
    """torch's one-cycle policy (``OneCycleLR``: cosine warm-up from lr/25 to lr over ``pct_start`` of
    the steps, cosine decay to lr/25e4, momentum/β₁ cycled 0.95 → 0.85 → 0.95)."""
    pct_start: float = 0.3


# ---------------------------------------------------------------------------------------------------
# early stopping and per-run optimisers (models stacked over runs)
# ---------------------------------------------------------------------------------------------------

class EarlyStop:
    """A per-run stopping rule checked at each step, before the update, with loss ℓ_t:
    if ℓ_t ≤ best: best ← ℓ_t (keep going); otherwise stop when ℓ_t > best + ``tol`` (the loss has risen)
    or ℓ_t ≤ ``floor`` (the loss floor is reached), but only after step ``after``."""

    def __init__(self, runs: int, tol: float = 0.02, floor: float = -math.inf, after: int = 0):
        self.best_R = torch.full((runs,), math.inf)
        self.active_R = torch.ones(runs, dtype=torch.bool)
        self.tol, self.floor, self.after = tol, floor, after

    def update(self, step: int, loss_R: Tensor) -> Tensor:
        """The runs still training after this step's check."""
        loss_R = loss_R.detach().float().reshape(-1)
        improved = loss_R <= self.best_R
        stop = ~improved & ((loss_R > self.best_R + self.tol) | (loss_R <= self.floor)) & (step > self.after)
        self.best_R = torch.where(improved & self.active_R, loss_R, self.best_R)
        self.active_R = self.active_R & ~stop
        return self.active_R


def _run_mask(active_R: Tensor | None, p: Tensor) -> Tensor | None:
    return None if active_R is None else active_R.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))


class _RunOptimizer:
    def __init__(self, params: Iterable[Tensor], lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError("params: expected at least one parameter")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr}")
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class RunSGD(_RunOptimizer):
    """Plain SGD θ ← θ − lr · g on parameters with a leading run axis; inactive runs unchanged."""

    @torch.no_grad()
    def step(self, active_R: Tensor | None = None) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            mask = _run_mask(active_R, p)
            p.sub_(self.lr * (p.grad if mask is None else p.grad * mask))


class RunNormalizedGD(_RunOptimizer):
    """Normalised GD (Chen et al. 2022's official ``NormalizedGD``): for each group e — the first
    ``group_dims`` axes of every parameter, e.g. (run, expert) — divide its gradient by the sum of its
    per-tensor gradient norms and take a plain step,

        g_e ← g_e / Σ_t ‖g_{e,t}‖₂   (skipped when that sum is 0),   θ_e ← θ_e − lr · g_e.

    Runs with ``active_R[r] == False`` are left unchanged."""

    def __init__(self, params: Iterable[Tensor], lr: float, group_dims: int = 2):
        super().__init__(params, lr)
        self.group_dims = group_dims

    @torch.no_grad()
    def step(self, active_R: Tensor | None = None) -> None:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise ValueError("params: every parameter needs a .grad before a normalised-GD step")
        gd = self.group_dims
        lead = self.params[0].shape[:gd]
        norm_group = sum(g.reshape(*lead, -1).norm(dim=-1) for g in grads)  # Σ over tensors of ‖g‖
        # a group that got no examples has g = 0 and is not moved (the official code skips the division)
        scale_group = torch.where(norm_group > 0, 1.0 / norm_group.clamp_min(1e-30), torch.zeros_like(norm_group))
        if active_R is not None:
            scale_group = scale_group * active_R.to(scale_group.dtype).view(-1, *([1] * (gd - 1)))
        for p, g in zip(self.params, grads):
            p.sub_(self.lr * g * scale_group.view(*lead, *([1] * (p.dim() - gd))))


class RunAdam(_RunOptimizer):
    """Adam with L2 weight decay folded into the gradient (as ``torch.optim.Adam(weight_decay=…)``) for
    parameters with a leading run axis; each run keeps its own step count so stopped runs stay frozen:

        g ← g + λθ,  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · m̂ / (√v̂ + ε),
        m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ).
    """

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, lr)
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        self.weight_decay, self.betas, self.eps = weight_decay, betas, eps
        num_runs = self.params[0].shape[0]
        self.step_R = torch.zeros(num_runs, dtype=torch.float64)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, active_R: Tensor | None = None) -> None:
        num_runs = self.step_R.shape[0]
        active_R = torch.ones(num_runs, dtype=torch.bool) if active_R is None else active_R.bool()
        self.step_R += active_R.double()
        b1, b2 = self.betas
        bc1_R = (1 - b1 ** self.step_R.clamp_min(1)).float()
        bc2_R = (1 - b2 ** self.step_R.clamp_min(1)).float()
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            keep = active_R.view(shape)
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            m.copy_(torch.where(keep, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(keep, b2 * v + (1 - b2) * g * g, v))
            denom = (v.sqrt() / bc2_R.sqrt().view(shape)) + self.eps
            update = (self.lr / bc1_R).view(shape) * m / denom
            p.sub_(torch.where(keep, update, torch.zeros_like(update)))


# ---------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------

@dataclass
class TrainLog:
    """What :func:`fit` recorded.

    ``losses``: mean training loss of each epoch, ``(J,)`` or ``(runs, J)`` for a loss per run; NaN for the
    epochs after a run stopped early. ``steps``: optimiser steps taken, ``(runs,)`` or ``(1,)``.
    ``stopped_at``: the epoch at which each run stopped early, -1 if it ran to the end."""
    losses: Tensor
    steps: Tensor
    stopped_at: Tensor

    @property
    def per_run(self) -> bool:
        return self.losses.dim() == 2


def _batches(n: int | None, batch_size: int | None, sample: str,
             generator: torch.Generator | None) -> list[Tensor | None]:
    if n is None or batch_size is None or batch_size >= n:
        return [None]
    if sample == "replacement":
        return [torch.randint(n, (batch_size,), generator=generator)]
    perm = torch.randperm(n, generator=generator)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def fit(loss_fn: Callable[[Tensor | None], Tensor], optimizers: Sequence[Any], *, epochs: int,
        n: int | None = None, batch_size: int | None = None, generator: torch.Generator | None = None,
        sample: str = "permutation", schedule: Schedule | OneCycle | None = None,
        early_stop: EarlyStop | None = None, before_update: Callable[[], None] | None = None,
        after_epoch: Callable[[int], None] | None = None, model: torch.nn.Module | None = None,
        track: Callable[[Iterable[int], int, str], Iterable[int]] | None = None,
        description: str = "training") -> TrainLog:
    """Train for ``epochs`` epochs and return the :class:`TrainLog`.

    ``loss_fn(idx)`` returns the loss of the batch ``idx`` (indices into the ``n`` training examples;
    ``None`` = the full batch): a scalar, or one loss per run ``(runs,)`` for models stacked over runs
    (the gradient of their sum is each run's own). It is the one place ``task_loss + aux_loss`` is
    formed. Batches: ``batch_size=None`` (or ≥ ``n``) trains full-batch, one step per epoch;
    ``sample="permutation"`` walks a fresh permutation of the ``n`` examples per epoch (drawn from
    ``generator``), ``sample="replacement"`` draws one batch of ``batch_size`` with replacement per epoch.

    ``optimizers``: torch optimisers (or the per-run ones above); ``schedule`` multiplies each parameter
    group's initial learning rate at step t of T (:func:`cosine`, :func:`warmup_cosine`, or
    :class:`OneCycle`); ``early_stop`` checks each step's loss before the update and then the optimisers
    are called as ``step(active_R)`` (per-run optimisers); ``before_update()`` runs between backward and
    the optimiser steps; ``after_epoch(epoch)`` after every epoch (evaluation, logging); ``model`` is put
    in train mode at the start of every epoch.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs: expected a positive int, got {epochs!r}")
    if sample not in ("permutation", "replacement"):
        raise ValueError(f"sample: expected 'permutation' or 'replacement', got {sample!r}")
    full = n is None or batch_size is None or batch_size >= n
    steps_per_epoch = 1 if full or sample == "replacement" else math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    schedulers: list[Any] = []
    if isinstance(schedule, OneCycle):
        schedulers = [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                          total_steps=total_steps, pct_start=schedule.pct_start)
                      for opt in optimizers]
    elif schedule is not None and schedule is not constant:
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda t: schedule(t, total_steps))
                      for opt in optimizers]

    losses: list[Tensor] = []
    active_R: Tensor | None = None if early_stop is None else early_stop.active_R.clone()
    steps_R: Tensor | None = None
    stopped_R: Tensor | None = None
    step = 0
    per_run = early_stop is not None
    epoch_iter: Iterable[int] = range(epochs) if track is None else track(range(epochs), epochs, description)
    for epoch in epoch_iter:
        if active_R is not None and not bool(active_R.any()):   # every run stopped: NaN from here on
            losses.append(torch.full_like(losses[-1], math.nan))
            continue
        if model is not None:
            model.train()
        total: Tensor | None = None
        count = 0
        for idx in _batches(n, batch_size, sample, generator):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss = loss_fn(idx)
            loss_R = loss.detach().float().reshape(-1)
            per_run = per_run or loss.dim() > 0
            if steps_R is None:
                steps_R = torch.zeros(loss_R.numel(), dtype=torch.long)
                stopped_R = torch.full((loss_R.numel(),), -1, dtype=torch.long)
            size = n if idx is None and n is not None else (1 if idx is None else idx.numel())
            if active_R is not None:        # runs stopped earlier keep NaN; the check precedes the update
                loss_R = torch.where(active_R, loss_R, torch.full_like(loss_R, math.nan))
                was = active_R
                active_R = early_stop.update(step, loss)
                stopped_R = torch.where(was & ~active_R, torch.full_like(stopped_R, epoch), stopped_R)
            total = loss_R * size if total is None else total + loss_R * size
            count += size
            if active_R is not None and not bool(active_R.any()):
                break
            loss.sum().backward() if loss.dim() > 0 else loss.backward()
            if before_update is not None:
                before_update()
            for opt in optimizers:
                opt.step(active_R) if active_R is not None else opt.step()
            for sched in schedulers:
                sched.step()
            steps_R += 1 if active_R is None else active_R.long()
            step += 1
        losses.append(total / count)
        if after_epoch is not None:
            after_epoch(epoch)
    stacked = torch.stack(losses, dim=-1)          # (runs, J)
    return TrainLog(stacked if per_run else stacked[0], steps_R, stopped_R)


__all__ = ["EarlyStop", "OneCycle", "RunAdam", "RunNormalizedGD", "RunSGD", "SEED_STRIDE", "Schedule", "TrainLog",
           "constant", "cosine", "fit", "seed_generator", "seed_value", "seeded_global", "warmup_cosine"]
