"""The reference anomaly model: a small dense autoencoder over a normalized window [B, L, C] (PyTorch).

Importing this module needs PyTorch; the rest of edge_models imports it only when it trains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer settings; with the same seed, threads and data the weights are bit-for-bit the same."""

    epochs: int = 25
    batch_size: int = 256
    learning_rate: float = 2e-3
    hidden: int = 128
    bottleneck: int = 16
    seed: int = 0
    threads: int = 2


class WindowAutoencoder(nn.Module):
    """Flatten the window, squeeze it through a small bottleneck, reconstruct it."""

    def __init__(self, window_length: int, channels: int, *, hidden: int, bottleneck: int) -> None:
        super().__init__()
        size = window_length * channels
        self.window_shape = (window_length, channels)
        self.encoder = nn.Sequential(
            nn.Flatten(1), nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck)
        )
        self.decoder = nn.Sequential(
            nn.Linear(bottleneck, hidden),
            nn.ReLU(),
            nn.Linear(hidden, size),
        )

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, L, C] of the normalized window [B, L, C]."""
        # reshape(-1, L, C) exports as one Reshape by a constant; nn.Unflatten adds a Shape/Slice/Concat chain.
        return self.decoder(self.encoder(window)).reshape(-1, *self.window_shape)


class AnomalyScorer(nn.Module):
    """What gets exported: window -> (score [B], channel_error [B, C]), so the gateway does no math."""

    def __init__(self, autoencoder: WindowAutoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared reconstruction error over the window, and per channel."""
        channel_error = (self.autoencoder(window) - window).pow(2).mean(dim=1)
        return channel_error.mean(dim=1), channel_error


def train_autoencoder(windows: np.ndarray, config: TrainConfig) -> tuple[AnomalyScorer, list[float]]:
    """Train on normalized [N, L, C] float32 windows with Adam; returns the scorer and per-epoch loss."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    _, length, channels = windows.shape
    model = WindowAutoencoder(length, channels, hidden=config.hidden, bottleneck=config.bottleneck)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    # Decay to a tenth by the last epoch: the fast start finds the structure, the slow end settles it.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=config.epochs, eta_min=config.learning_rate / 10
    )
    data = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    order = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for epoch in range(config.epochs):
        total = 0.0
        for idx in torch.randperm(len(data), generator=order).split(config.batch_size):
            batch = data[idx]
            loss = (model(batch) - batch).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        schedule.step()
        losses.append(total / len(data))
        logger.info(
            "epoch %d/%d loss %.5f (%.1f s)",
            epoch + 1,
            config.epochs,
            losses[-1],
            time.perf_counter() - started,
        )
    model.eval()
    return AnomalyScorer(model), losses


def torch_scores(scorer: AnomalyScorer, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score [N], channel_error [N, C]) computed by PyTorch, the reference for the ONNX check."""
    with torch.inference_mode():
        score, channel_error = scorer(torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)))
    return score.numpy(), channel_error.numpy()
