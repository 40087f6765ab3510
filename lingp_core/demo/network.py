"""The demo's small CNN, its training on the source domain, and its predictions.

DigitCNN (3,658 parameters): conv 3×3 (1→8) · ReLU · max-pool 2 → conv 3×3 (8→16) · ReLU · max-pool 2 → Linear
(64→32) · ReLU → Linear (32→10). lingp exports the convolutions as dense Jacobian blocks and the two Linear layers
as factored blocks (layer inputs and output sensitivities), so the export exercises both kinds.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lingp_core._progress import progress_bar

__all__ = ["DigitCNN", "fine_tune", "penultimate_features", "predict_proba", "train_source"]


class DigitCNN(nn.Module):
    """Images (b, 1, 8, 8) → logits (b, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.hidden = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (b, 32): the input of the last layer."""
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_source(x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int = 40, lr: float = 1e-2,
                 batch_size: int = 64, progress: bool = False) -> DigitCNN:
    """A DigitCNN trained by Adam on cross-entropy with seeded initialisation and shuffling, in eval mode.

    Parameters
    ----------
    x : tensor (n, 1, 8, 8), float32, on the training device
    y : int64 tensor (n,), same device
    """
    torch.manual_seed(seed)
    model = DigitCNN().to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(seed)
    with progress_bar(epochs, enabled=progress, desc="source training", unit="epoch") as bar:
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=shuffle).to(x.device)
            for start in range(0, x.shape[0], batch_size):
                batch = order[start:start + batch_size]
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
            bar.update()
    return model.eval()


def fine_tune(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 50, lr: float = 1e-2) -> nn.Module:
    """A copy of ``model`` with every parameter fine-tuned by ``steps`` full-batch Adam steps on cross-entropy.

    A fixed number of steps is the early stopping: with one to ten labels per class there is nothing to hold out.
    """
    tuned = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(tuned(x), y).backward()
        optimizer.step()
    return tuned.eval()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Softmax of the logits in float64, as a host array (n, 10)."""
    return torch.softmax(model(x).double(), dim=1).cpu().numpy()


@torch.no_grad()
def penultimate_features(model: DigitCNN, x: torch.Tensor) -> np.ndarray:
    """The last layer's inputs as a float64 host array (n, 32)."""
    return model.features(x).double().cpu().numpy()

