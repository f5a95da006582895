"""The online linear classifier: a linear probe trained beside pretraining, as solo-learn and
lightly run one, to watch the representation's linear accuracy epoch by epoch.

At each training step a forward hook on the backbone keeps the features h = f(x₁) of the first
view (the features the method's own forward computes; no second forward), detached, so the
probe's loss never reaches the encoder. The head is BatchNorm1d(affine=False) followed by a
zero-initialised Linear (standardised features make one learning rate fit any backbone; zero
initialisation draws nothing from the random streams a bitwise resume restores), trained with
its own SGD (momentum 0.9, constant ``eval.online_linear_lr``) on the cross-entropy
ℓ = −log softmax(W·BN(h) + b)_y.

Distributed: every rank gathers the global batch's features and labels (B × F floats, one
all-gather per step) and takes the same step on it, so the head is the one a single process
would train on the same global batch, with no gradient synchronisation and no rank drift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from barlow import data, distributed
from barlow.evaluate import Features


class OnlineLinearProbe:
    """A linear classifier on the detached features of the training views (see the module)."""

    def __init__(
        self, num_features: int, num_classes: int, *, lr: float, device: torch.device
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"the online linear classifier needs >= 2 classes, got {num_classes}")
        # skip_init: nn.Linear's own initialisation would draw from the global generator, and a
        # resumed run builds the probe after restoring it (the steps after would shift)
        linear = nn.utils.skip_init(nn.Linear, num_features, num_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(num_features, affine=False), linear).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=0.9)
        self.device = device
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.seen = torch.zeros((), dtype=torch.long, device=device)
        self.armed = False
        self.captured: Tensor | None = None
        self.handle: RemovableHandle | None = None

    def attach(self, backbone: nn.Module) -> None:
        """Keep the output of ``backbone``'s first call after each :meth:`arm`."""

        def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.armed:
                self.captured, self.armed = output.detach(), False

        self.handle = backbone.register_forward_hook(keep)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def arm(self) -> None:
        """The next backbone call is a training step's first view: keep its features."""
        self.armed, self.captured = True, None

    def discard(self) -> None:
        """Forget this step's features (a skipped step trains nothing)."""
        self.armed, self.captured = False, None

    def update(self, labels: Tensor) -> None:
        """One SGD step of the head on the kept features of this step's images, ``labels``."""
        features, self.captured = self.captured, None
        if features is None:
            raise RuntimeError(
                "the online linear classifier got no features: the method's forward did not call "
                "its backbone; set eval.online_linear=false for this method"
            )
        features = features.flatten(1)[: len(labels)].float()  # views concatenated: view 1 first
        features = distributed.all_gather_no_grad(features)
        labels = distributed.all_gather_no_grad(labels.to(self.device, non_blocking=True))
        self.head.train()
        with torch.enable_grad():
            logits = self.head(features)
            loss = nn.functional.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)

    def train_accuracy(self) -> float:
        """Top-1 on the training views since the last call (the epoch's), then reset; one
        host sync."""
        accuracy = float(self.correct) / max(int(self.seen), 1)
        self.correct.zero_()
        self.seen.zero_()
        return accuracy

    @torch.no_grad()
    def test_accuracy(self, test: Features, batch_size: int = 4096) -> float:
        """Top-1 of the head on precomputed (clean, eval-mode) features of the test split."""
        self.head.eval()
        correct = 0
        for start in range(0, len(test), batch_size):
            h = test.features[start : start + batch_size].to(self.device)
            y = test.labels[start : start + batch_size].to(self.device)
            correct += int((self.head(h).argmax(1) == y).sum())
        self.head.train()
        return correct / max(len(test), 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "correct": int(self.correct),
            "seen": int(self.seen),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.head.load_state_dict(saved["head"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.correct.fill_(int(saved["correct"]))
        self.seen.fill_(int(saved["seen"]))


def build_online_probe(
    cfg: Any, backbone: nn.Module, dataset: Any, device: torch.device
) -> OnlineLinearProbe | None:
    """The online classifier of a pretraining run, attached to ``backbone``; None when switched
    off (``eval.online_linear``) or when the training images carry no labels."""
    if not cfg.eval.online_linear or dataset is None or not data.labelled(dataset):
        return None
    info = data.dataset_info(cfg.data.dataset)
    num_classes = info.num_classes or len(getattr(dataset, "classes", []))
    num_features = getattr(backbone, "num_features", None)
    if num_classes < 2 or not isinstance(num_features, int):
        return None
    lr = cfg.eval.online_linear_lr
    probe = OnlineLinearProbe(num_features, num_classes, lr=lr, device=device)
    probe.attach(backbone)
    return probe
