"""A ResNet-style image classifier trained with ``Trainer(strategy="rannc")``.

An ordinary LightningModule: a convolutional stem, stages of residual bottleneck blocks with
BatchNorm (each micro-batch normalises with its own statistics, as with gradient
accumulation), global pooling and a linear head, on synthetic images whose class decides a
pattern in them::

    python examples/resnet.py
    python examples/resnet.py strategy.pipeline_stages=2 model.depths=[2,2,2]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_rannc  # noqa: F401  (registers strategy="rannc")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIGS, read_config, train  # noqa: E402


class Bottleneck(nn.Module):
    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        inner = channels // 4
        self.body = nn.Sequential(
            nn.Conv2d(channels, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(),
            nn.Conv2d(inner, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.skip = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNet(L.LightningModule):
    def __init__(
        self,
        depths: list[int] | None = None,
        width: int = 32,
        classes: int = 10,
        image_size: int = 32,
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        depths = depths or [2, 2, 2]
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = [
            Bottleneck(width, stride=2 if i > 0 and j == 0 else 1) for i, d in enumerate(depths) for j in range(d)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        features = self.blocks(self.stem(images)).mean(dim=(2, 3))
        loss = F.cross_entropy(self.head(features), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class PatternImages(Dataset):
    """Noise plus a class-specific horizontal stripe: learnable in a few steps, free to make."""

    def __init__(self, size: int, image_size: int, classes: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (size,), generator=gen)
        self.images = torch.randn(size, 3, image_size, image_size, generator=gen) * 0.5
        rows = (self.labels * image_size) // classes
        self.images[torch.arange(size), :, rows, :] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _loader(model: ResNet, batch_size: int, size: int) -> DataLoader:
    data = PatternImages(size, model.hparams.image_size, model.hparams.classes)
    return DataLoader(data, batch_size=batch_size, shuffle=False, drop_last=True)


def main() -> None:
    train(read_config(__doc__, CONFIGS / "resnet_cpu.yaml"), ResNet, _loader)


if __name__ == "__main__":
    main()
