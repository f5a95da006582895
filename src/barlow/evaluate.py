"""The maths of judging a frozen encoder: features, weighted kNN, linear probe, paper protocol.

No config and no dataset names here (``assessment.py`` is the glue that builds the data of a
run and calls these):

* ``extract_features`` runs the encoder over a loader once (eval mode, no gradients).
* ``knn_accuracy`` is the weighted kNN classifier of Wu et al. (2018), used by InstDisc, DINO and
  solo-learn to follow pretraining cheaply.
* ``linear_probe`` fits an ℓ2-regularised multinomial logistic regression on precomputed features.
* ``linear_eval`` is the Barlow Twins linear-evaluation protocol (Zbontar et al., 2021, §4.1 and
  ``evaluate.py`` of facebookresearch/barlowtwins): a linear head on a frozen backbone, trained
  with augmentation.

The backbone is never trained here: it runs in ``eval()`` mode under ``torch.no_grad()``, so its
``state_dict`` (BatchNorm running statistics included) is bitwise unchanged afterwards, and every
submodule gets its own previous training mode back.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from barlow import cpu_share
from barlow.logbook import console
from barlow.optim import scaled_lr, set_learning_rate, warmup_cosine
from barlow.rundir import atomic_write_text

T = TypeVar("T")

PLAIN_PROGRESS_EVERY_S = 30.0  # without a terminal, one progress line at most this often


@dataclass(frozen=True)
class Features:
    """Encoder features ``h`` (N, D), float32 on the CPU, and their class labels (N,) int64."""

    features: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise ValueError(
                f"features must be (N, D), got shape {tuple(self.features.shape)}; "
                "flatten them with .flatten(1)"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.features):
            raise ValueError(
                f"labels must be (N,) = ({len(self.features)},) to match the features, "
                f"got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


# ---------------------------------------------------------------------------------------------
# Features


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    preprocess: Callable[[Tensor], Tensor] | None = None,
    progress: bool | str = False,
) -> Features:
    """Features ``h = encoder(preprocess(x))`` of every batch, in the loader's order.

    ``loader`` yields ``(images, labels)``: uint8 images need ``preprocess`` (uint8 batch →
    normalised float batch, run on ``device`` over the whole batch); float images may go in as
    they are. The encoder must already be on ``device``; it runs in ``eval()`` mode and gets its
    modes back afterwards. ``progress``: ``False``, ``True``, or a description for the bar.
    """
    device = torch.device(device)
    _check_module_device(encoder, device)
    description = _description(progress, "features")
    features: list[Tensor] = []
    labels: list[Tensor] = []
    # no_grad rather than inference_mode: inference tensors cannot be inputs to a later
    # autograd graph, and the linear probe trains a head on exactly these features.
    with _eval_mode(encoder):
        for images, y in _progress(loader, description):
            cpu_share.tick()
            h = encoder(_prepare(images, device, preprocess))
            features.append(h.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y).long().cpu())
    if not features:
        raise ValueError("the loader yielded no batches; check the dataset is not empty")
    return Features(torch.cat(features), torch.cat(labels))


def _prepare(
    images: Tensor, device: torch.device, preprocess: Callable[[Tensor], Tensor] | None
) -> Tensor:
    x = images.to(device, non_blocking=True)
    if preprocess is not None:
        x = preprocess(x)
    if not x.is_floating_point():
        raise ValueError(
            f"the encoder needs float images, got {x.dtype}; pass preprocess= to turn the "
            "uint8 batch into a normalised float batch"
        )
    return x


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` for the block; then each submodule gets back its own previous mode
    (``module.train(previous)`` would flatten deliberately mixed modes, e.g. a frozen BN)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_module_device(module: nn.Module, device: torch.device) -> None:
    tensor: Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    if tensor is not None and not _same_device(tensor.device, device):
        raise ValueError(
            f"the encoder is on {tensor.device} but device={device}; move it with "
            f"encoder.to({str(device)!r}) or pass device={str(tensor.device)!r}"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":  # "cuda" means the current CUDA device
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return True


def _default_device(device: torch.device | str | None) -> torch.device:
    # On a GPU a 1.28M × 2048 bank is a matter of seconds; on a CPU, hours.
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _description(progress: bool | str, default: str) -> str | None:
    if isinstance(progress, str):
        return progress or None
    return default if progress else None


def _progress(iterable: Iterable[T], description: str | None) -> Iterator[T]:
    """A tqdm bar on a terminal; without one (CI, batch-job logs) a plain line at most every
    ``PLAIN_PROGRESS_EVERY_S`` seconds and one at the end, instead of carriage-return redraws."""
    if description is None:
        yield from iterable
        return
    total = len(iterable) if isinstance(iterable, Sized) else None
    if sys.stderr.isatty():
        yield from tqdm(
            iterable,
            desc=description,
            total=total,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )
        return
    of_total = f"/{total}" if total is not None else ""
    start = last = time.perf_counter()
    count = 0
    for count, item in enumerate(iterable, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= PLAIN_PROGRESS_EVERY_S:
            console(f"{description}: {count}{of_total} batches ({now - start:.0f} s)")
            last = now
    console(f"{description}: {count} batches in {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------
# Weighted kNN


def knn_predict(
    train: Features,
    test: Features,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """Weighted kNN class predictions (N_test,) int64 on the CPU (Wu et al., 2018).

    With ℓ2-normalised features, ``s_ij = ĥ_i · ĥ_j``; the k most similar train points
    ``N_k(i)`` of test point i vote for their class with weight ``exp(s_ij / T)``::

        score_i(c) = Σ_{j ∈ N_k(i), y_j = c} exp(s_ij / T),    ŷ_i = argmax_c score_i(c)

    ``k`` above the train size uses the whole bank. Ties are deterministic: among train points
    of equal similarity at the k-th place the lower index is a neighbour, and equal class scores
    go to the lower class index. The bank (N_train × D) is moved to ``device`` once (default: the
    GPU when there is one); test rows go ``chunk_size`` at a time, so memory beyond the bank is
    ``chunk_size × N_train`` similarities, never N_test × N_train.
    """
    num_classes = _check_knn_arguments(train, test, k, temperature, num_classes, chunk_size)
    device = _default_device(device)
    bank = F.normalize(train.features.to(device, torch.float32), dim=1)
    bank_labels = train.labels.to(device)
    k = min(k, len(train))
    predictions = []
    for start in range(0, len(test), chunk_size):
        cpu_share.tick()
        queries = test.features[start : start + chunk_size].to(device, torch.float32)
        similarity = F.normalize(queries, dim=1) @ bank.T  # (chunk, N_train)
        top_similarity, top_index = top_k_lowest_index_on_ties(similarity, k)
        # Shifting by the row maximum rescales a row's votes by one factor (same argmax) and
        # keeps exp finite for small temperatures (exp(1 / 0.01) overflows float32).
        weights = torch.exp((top_similarity - top_similarity[:, :1]) / temperature)
        scores = torch.zeros(len(queries), num_classes, device=device)
        scores.scatter_add_(1, bank_labels[top_index], weights)
        predictions.append(scores.argmax(dim=1))  # argmax returns the first (lowest) maximum
    return torch.cat(predictions).cpu()


def knn_accuracy(
    train: Features,
    test: Features,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN classifier (see ``knn_predict``); DINO and
    solo-learn report it with k = 20 or 200 and T = 0.07–0.1."""
    predicted = knn_predict(
        train,
        test,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        device=device,
    )
    return (predicted == test.labels.cpu()).double().mean().item()


def top_k_lowest_index_on_ties(similarity: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row, the k largest values (descending) and their columns; where values tie at the
    k-th place the lowest columns win. ``torch.topk`` alone leaves that choice to the kernel,
    which differs between devices, so duplicated train images could vote differently."""
    if k >= similarity.shape[1]:  # the whole bank: no cut, nothing to break
        return similarity.topk(k, dim=1)
    # One more than needed: a tie across the cut shows as equal k-th and (k+1)-th values,
    # which costs O(k) per row instead of another pass over all N_train similarities.
    values, indices = similarity.topk(k + 1, dim=1)
    ambiguous = values[:, k] == values[:, k - 1]
    values, indices = values[:, :k], indices[:, :k]
    kth = values[:, -1:]
    for row in ambiguous.nonzero().flatten().tolist():  # rare: only rows with a tie at the cut
        above = (similarity[row] > kth[row]).nonzero().flatten()
        tied = (similarity[row] == kth[row]).nonzero().flatten()[: k - len(above)]
        chosen = torch.cat([above, tied])
        # stable: equal values keep ascending column order
        order = similarity[row, chosen].sort(descending=True, stable=True).indices
        values[row], indices[row] = similarity[row, chosen[order]], chosen[order]
    return values, indices


def _check_knn_arguments(
    train: Features,
    test: Features,
    k: int,
    temperature: float,
    num_classes: int | None,
    chunk_size: int,
) -> int:
    """Validate the kNN inputs; returns the number of classes."""
    _check_feature_sets(train, test)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _num_classes(train, test, num_classes)


def _check_feature_sets(train: Features, test: Features) -> None:
    for name, part in (("train", train), ("test", test)):
        if len(part) == 0:
            raise ValueError(f"the {name} features are empty; evaluate on a non-empty split")
        if not torch.isfinite(part.features).all():
            raise ValueError(
                f"the {name} features contain NaN or Inf; the encoder has diverged or was "
                "given unnormalised input"
            )
    if train.dim != test.dim:
        raise ValueError(
            f"feature dimension mismatch: train D={train.dim}, test D={test.dim}; extract "
            "both with the same encoder"
        )


def _num_classes(train: Features, test: Features, num_classes: int | None) -> int:
    smallest = min(int(train.labels.min()), int(test.labels.min()))
    largest = max(int(train.labels.max()), int(test.labels.max()))
    if smallest < 0:
        raise ValueError(f"labels must be >= 0, got {smallest}")
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(
            f"label {largest} does not fit num_classes={num_classes}; pass num_classes >= "
            f"{largest + 1}"
        )
    return num_classes


# ---------------------------------------------------------------------------------------------
# Linear probe on precomputed features


def linear_probe(
    train: Features,
    test: Features,
    *,
    epochs: int = 100,
    weight_decay: float = 1e-3,
    num_classes: int | None = None,
    chunk_size: int = 65536,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Multinomial logistic regression on frozen features; returns train/test accuracy.

    Features are standardised with the train mean and (biased) std (constant features are only
    centred, like sklearn's StandardScaler), then ``W, b`` minimise::

        (1/N) Σ_i CE(W x_i + b, y_i) + (weight_decay / 2) ‖W‖²_F

    by full-batch L-BFGS (strong-Wolfe line search) from zero, at most ``epochs`` iterations
    (≈ one pass over the features each), ``chunk_size`` rows at a time to bound memory. ``seed``
    is accepted so callers can pass their run's seed; the result does not depend on it.
    ``device`` defaults to the GPU when there is one.
    """
    # Why L-BFGS and not minibatch AdamW/SGD: the objective is convex, so L-BFGS lands on its one
    # optimum (what sklearn's LogisticRegression finds), deterministically and with no learning
    # rate to tune per feature scale. Measured on 60 000 × 512 Fashion-MNIST features (2 CPU
    # cores): 100 iterations 85.5 % in 6–11 s; AdamW + cosine 85.3 % in 3–5 s at a tuned lr,
    # 0.3 points less at another; sklearn 85.0 % in 73 s. Similar speed, nothing to tune.
    del seed  # zero initialisation + full batch: nothing random
    _check_feature_sets(train, test)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    num_classes = _num_classes(train, test, num_classes)
    device = _default_device(device)
    x_train, x_test = _standardise(
        train.features.to(device, torch.float32), test.features.to(device, torch.float32)
    )
    y_train, y_test = train.labels.to(device), test.labels.to(device)

    head = nn.Linear(train.dim, num_classes, device=device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(
        head.parameters(),
        lr=1.0,
        max_iter=epochs,
        history_size=10,
        tolerance_grad=1e-7,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        cpu_share.tick()
        optimizer.zero_grad()
        total = torch.zeros((), device=device)
        for start in range(0, len(x_train), chunk_size):
            logits = head(x_train[start : start + chunk_size])
            loss = F.cross_entropy(logits, y_train[start : start + chunk_size], reduction="sum")
            (loss / len(x_train)).backward()  # gradients add up over chunks to the full batch
            total += loss.detach() / len(x_train)
        penalty = 0.5 * weight_decay * head.weight.square().sum()  # the bias is not penalised
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(objective)
    train_loss, train_acc = _loss_and_accuracy(head, x_train, y_train, chunk_size)
    _, test_acc = _loss_and_accuracy(head, x_test, y_test, chunk_size)
    return {"train_acc": train_acc, "test_acc": test_acc, "train_loss": train_loss}


def _standardise(x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, correction=0)
    # A constant train feature would be divided by ~0 and blow up on the test set.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return (x_train - mean) / std, (x_test - mean) / std


@torch.no_grad()
def _loss_and_accuracy(
    head: nn.Module, x: Tensor, y: Tensor, chunk_size: int
) -> tuple[float, float]:
    """Mean cross-entropy (without the penalty) and top-1 accuracy of ``head`` on (x, y)."""
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for start in range(0, len(x), chunk_size):
        logits, target = head(x[start : start + chunk_size]), y[start : start + chunk_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum")
        correct += (logits.argmax(dim=1) == target).sum()
    return loss_sum.item() / len(x), correct.item() / len(x)


# ---------------------------------------------------------------------------------------------
# The paper's linear evaluation


def linear_eval(
    encoder: nn.Module,
    train_loader: Iterable[tuple[Tensor, Tensor]],
    test_loader: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    feature_dim: int,
    device: torch.device,
    train_transform: Callable[[Tensor], Tensor],
    test_preprocess: Callable[[Tensor], Tensor],
    epochs: int = 100,
    lr: float = 0.3,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
    progress: bool = False,
) -> dict[str, float]:
    """Linear evaluation with a frozen backbone (Barlow Twins §4.1, official ``evaluate.py``).

    A linear head ``Wh + b`` (W ~ N(0, 0.01²), b = 0) on the backbone features ``h`` (B,
    ``feature_dim``) is trained with cross-entropy by SGD (``momentum``, ``weight_decay``) for
    ``epochs`` passes over ``train_loader``; each uint8 batch is augmented on ``device`` by
    ``train_transform`` (e.g. random resized crop + flip + normalise). The learning rate follows a
    cosine from ``lr × B/256`` to 0, set once per epoch as the official code's
    ``CosineAnnealingLR``: ``lr`` is per 256 images (the paper: 0.3 at batch 256), and B is the
    size of the first training batch. The backbone runs in ``eval()`` mode under no_grad, so its
    ``state_dict`` is bitwise unchanged. Top-1 (and top-5 when there are ≥ 5 classes) accuracy
    on ``test_loader`` batches passed through ``test_preprocess``; ``train_loss`` is the mean
    loss of the last epoch. ``train_loader`` is walked once per epoch, so it must be re-iterable
    (a DataLoader or a list, not a generator).
    """
    device = torch.device(device)
    _check_linear_eval_arguments(
        train_loader, num_classes, feature_dim, epochs, lr, weight_decay, momentum
    )
    _check_module_device(encoder, device)
    head = _linear_head(feature_dim, num_classes, device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=0.0, momentum=momentum, weight_decay=weight_decay
    )

    def features(images: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        with torch.no_grad():
            h = encoder(_prepare(images, device, transform)).flatten(1)
        if h.shape[1] != feature_dim:
            raise ValueError(
                f"the encoder gives {h.shape[1]} features but feature_dim={feature_dim}; pass "
                f"feature_dim={h.shape[1]} (the backbone's num_features)"
            )
        return h

    batch_size = 0  # the nominal batch, from the first batch seen
    train_loss = math.nan
    with _eval_mode(encoder):
        for epoch in range(epochs):
            loss_sum, seen = torch.zeros((), device=device), 0
            description = f"linear eval {epoch + 1}/{epochs}" if progress else None
            for images, labels in _progress(train_loader, description):
                cpu_share.tick()
                batch_size = batch_size or len(images)
                base_lr = scaled_lr(lr, batch_size)
                set_learning_rate(
                    optimizer,
                    warmup_cosine(
                        epoch, total_steps=epochs, warmup_steps=0, base_lr=base_lr, final_lr_ratio=0
                    ),
                )
                y = _labels_on(labels, device, num_classes)
                loss = F.cross_entropy(head(features(images, train_transform)), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(y)
                seen += len(y)
            if seen == 0:
                raise ValueError("train_loader yielded no batches; check the training split")
            train_loss = loss_sum.item() / seen
            if progress:
                console(f"linear eval epoch {epoch + 1}/{epochs}: loss {train_loss:.4f}")
        result = _top_k_accuracy(head, test_loader, features, test_preprocess, device, num_classes)
    return {**result, "train_loss": train_loss}


def _linear_head(feature_dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    """The official evaluation's head: W ~ N(0, 0.01²), b = 0."""
    head = nn.Linear(feature_dim, num_classes, device=device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def _check_linear_eval_arguments(
    train_loader: Iterable[Any],
    num_classes: int,
    feature_dim: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    momentum: float,
) -> None:
    checks = [
        (num_classes >= 2, f"num_classes must be >= 2, got {num_classes}"),
        (feature_dim >= 1, f"feature_dim must be >= 1, got {feature_dim}"),
        (epochs >= 1, f"epochs must be >= 1, got {epochs}"),
        (lr > 0 and math.isfinite(lr), f"lr must be a finite number > 0, got {lr!r}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum!r}"),
        (
            epochs == 1 or not isinstance(train_loader, Iterator),
            "train_loader is a one-shot iterator (e.g. a generator) but linear_eval walks it "
            f"once per epoch ({epochs}); pass a DataLoader, a list of batches, or an object "
            "whose __iter__ starts a fresh pass",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _labels_on(labels: Tensor, device: torch.device, num_classes: int) -> Tensor:
    y = torch.as_tensor(labels).long()
    # checked before the device: an out-of-range label is a device-side assert on CUDA
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]; "
            "check num_classes"
        )
    return y.to(device, non_blocking=True)


def classifier_accuracy(
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    preprocess: Callable[[Tensor], Tensor],
    device: torch.device,
    num_classes: int,
) -> dict[str, float]:
    """Top-1 (and top-5 with ≥ 5 classes) of ``head(backbone(preprocess(images)))`` over
    (uint8 images, labels) ``batches``; both modules in eval mode, without gradients."""

    def features(images: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        return backbone(_prepare(images, device, transform)).flatten(1)

    with _eval_mode(backbone), _eval_mode(head):
        return _top_k_accuracy(head, batches, features, preprocess, device, num_classes)


@torch.no_grad()
def _top_k_accuracy(
    head: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    features: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor],
    preprocess: Callable[[Tensor], Tensor],
    device: torch.device,
    num_classes: int,
) -> dict[str, float]:
    ks = (1, 5) if num_classes >= 5 else (1,)
    correct = torch.zeros(len(ks), device=device)
    seen = 0
    for images, labels in loader:
        y = _labels_on(labels, device, num_classes)
        ranked = head(features(images, preprocess)).topk(ks[-1], dim=1).indices  # (B, 5)
        hits = ranked == y[:, None]
        correct += torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])
        seen += len(y)
    if seen == 0:
        raise ValueError("test_loader yielded no batches; check the test split")
    return {f"top{k}": c / seen for k, c in zip(ks, correct.tolist(), strict=True)}


# ---------------------------------------------------------------------------------------------
# metrics.json


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """Merge ``metrics`` into the JSON object at ``path`` (created if missing), atomically.

    Top-level keys of ``metrics`` replace those in the file (a re-run of ``knn`` replaces the
    old ``knn`` entry whole); other keys are kept. Tensors and numpy scalars become numbers,
    NaN/Inf become strings, so the file stays valid JSON. Written atomically
    (``rundir.atomic_write``): a reader never sees half a file.
    """
    path = Path(path)
    merged = {**_read_metrics(path), **_jsonable(dict(metrics))}
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); move it aside so a fresh one can be written"
        ) from exc
    if not isinstance(existing, dict):
        raise ValueError(f"{path} holds a JSON {type(existing).__name__}, not an object")
    return existing


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy arrays/scalars
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf literals
    return value
