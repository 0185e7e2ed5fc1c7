"""Small LightningModules shared by the tests. Plain Lightning code: nothing knows about pipelines."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gpt import GPT, SyntheticTokens, make_dataloader

__all__ = [
    "GPT",
    "ScheduledGPT",
    "LoudHeadGPT",
    "MetaGPT",
    "ResCNN",
    "BatchNormCNN",
    "LoggingMLP",
    "EvalGPT",
    "EvalBatchNormCNN",
    "OutOfOrderEvalGPT",
    "MetricMLP",
    "StridedGPT",
    "ColumnMajor",
    "SyntheticTokens",
    "VaryingLength",
    "make_dataloader",
    "image_data",
    "table_data",
    "table_loader",
]


class ScheduledGPT(GPT):
    """The example GPT with SGD and an LR scheduler stepping every optimizer step.

    SGD, not Adam: Adam divides by the gradient's own magnitude, so parameters with near-zero
    gradients (rare tokens' embedding rows) turn float rounding into visible weight differences,
    and any change of summation order (micro-batches, replicas) shows in a 1e-5 comparison.
    """

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SteppingGPT(ScheduledGPT):
    """Sizes its schedule with ``trainer.estimated_stepping_batches``, which makes Lightning set
    up the training data while the optimizers are configured, inside the strategy's setup."""

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class MetaGPT(GPT):
    """The example GPT, able to initialise its own top-level parameter after meta-device creation."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_emb, std=0.02)


class LoudHeadGPT(GPT):
    """Its own output layer sees inputs 500x larger: under fp16 loss scaling only that layer's
    weight gradient overflows, on the last pipeline stage alone."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = nn.Linear(self.hparams.dim, self.hparams.vocab_size, bias=False)
        nn.init.normal_(self.out.weight, std=1e-5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens) + self.pos_emb[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln_f(x) * 500)


class FusedLoudHeadGPT(LoudHeadGPT):
    """With a fused AdamW, which unscales inside its own step: Lightning then never calls the
    scaler's ``unscale_``, where the ranks agree on overflows."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01, fused=True)


class VaryingLength:
    """Collate that cuts each batch to a sequence length cycling through 16, 12, 8, 12."""

    lengths = (16, 12, 8, 12)

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = self.lengths[self.calls % len(self.lengths)]
        self.calls += 1
        return {k: torch.stack([r[k][:length] for r in rows]) for k in rows[0]}


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class ResCNN(L.LightningModule):
    """A small ResNet-style CNN; batches are ``(images, labels)`` tuples."""

    def __init__(self, channels: int = 8, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class NormResidualBlock(ResidualBlock):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.norm(self.conv1(x)))))


class BatchNormCNN(ResCNN):
    """ResCNN with BatchNorm: running statistics are buffers updated in every training step."""

    def __init__(self, channels: int = 8, blocks: int = 3, classes: int = 10) -> None:
        super().__init__(channels, blocks, classes)
        self.blocks = nn.Sequential(*[NormResidualBlock(channels) for _ in range(blocks)])


class TransposingLayer(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x.transpose(1, 2)))


class SkipMLP(L.LightningModule):
    """Layers that begin by transposing their input, and the input layer's output skipping all of
    them to the head. Wherever the stages are cut between layers, a stage in the middle passes
    the skip on untouched (its input gradient is the output gradient it received) and begins
    with a transpose (its other input gradient is a transposed view); batches are ``(images,
    labels)``, of which the first channel is taken as an 8 x 8 matrix."""

    def __init__(self, size: int = 8, layers: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(size, size)
        self.layers = nn.Sequential(*[TransposingLayer(size) for _ in range(layers)])
        self.head = nn.Linear(size, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        skip = self.inp(images[:, 0])
        out = self.head(self.layers(skip) + skip).mean(dim=(1, 2))
        loss = F.mse_loss(out, labels.float())
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class LoggingMLP(L.LightningModule):
    """Logs two values, returns a dict, uses Adam + StepLR; batches are one tensor (features | label)."""

    def __init__(self, features: int = 12, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.features = features
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=-1) == y).float().mean()
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({"train_acc": acc, "logit_norm": logits.norm(dim=-1).mean()}, on_step=True, on_epoch=True)
        return {"loss": loss, "acc": acc}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ReducingMLP(LoggingMLP):
    """A loss summed over samples, and values logged with each ``reduce_fx``: a maximum, minimum
    and sum over samples, a mean logged as the epoch's maximum, and a count whose last op (a
    multiplication) hides its reduction, so only ``reduce_fx`` tells it is a sum."""

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[:, : self.features], batch[:, self.features].long()
        logits = self.net(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = F.cross_entropy(logits, y, reduction="sum")
        self.log("worst", per_sample.max(), reduce_fx="max", on_epoch=True, sync_dist=True)
        self.log("best", per_sample.min(), reduce_fx=torch.min, on_epoch=True, sync_dist=True)
        self.log("total", per_sample.sum(), reduce_fx="sum", on_epoch=True, sync_dist=True)
        self.log("mean_max", per_sample.mean(), reduce_fx="max", on_epoch=True, sync_dist=True)
        self.log("wrong", (logits.argmax(dim=-1) != y).sum() * 1.0, reduce_fx="sum", on_epoch=True, sync_dist=True)
        return {"loss": loss, "worst": per_sample.max()}


class _Images(Dataset):
    def __init__(self, size: int) -> None:
        gen = torch.Generator().manual_seed(1)
        self.images = torch.randn(size, 3, 8, 8, generator=gen)
        self.labels = (self.images.mean(dim=(1, 2, 3)) > 0).long() + 2 * (self.images[:, 0, 0, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


def image_data(size: int = 64) -> Dataset:
    return _Images(size)


class _Rows(Dataset):
    """Rows of features followed by a class label, returned as one tensor."""

    def __init__(self, size: int, features: int = 12) -> None:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(size, features, generator=gen)
        y = (x[:, 0] > 0).float() + 2 * (x[:, 1] > 0).float()
        self.data = torch.cat([x, y[:, None]], dim=1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def table_data(size: int = 64) -> Dataset:
    return _Rows(size)


def table_loader(batch_size: int = 8, size: int = 64, drop_last: bool = True) -> DataLoader:
    return DataLoader(_Rows(size), batch_size=batch_size, drop_last=drop_last)


class EvalGPT(ScheduledGPT):
    """The GPT with every evaluation step: logged scalars, a returned dict with a per-sample
    tensor, predictions of shape (batch, length)."""

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["tokens"])
        per_token = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
        accuracy = (logits.argmax(dim=-1) == batch["targets"]).float().mean()
        return per_token.mean(dim=1), accuracy

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        per_sample, accuracy = self._losses(batch)
        self.log("val_loss", per_sample.mean(), sync_dist=True)
        self.log("val_acc", accuracy, sync_dist=True, prog_bar=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        per_sample, _ = self._losses(batch)
        self.log("test_loss", per_sample.mean(), sync_dist=True)
        return {"loss": per_sample.mean(), "per_sample": per_sample}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["tokens"]).argmax(dim=-1)


class StridedGPT(EvalGPT):
    """Non-contiguous tensors at both ends of the pipeline, as torch < 2.13 checks every stage's
    input and output strides: with ``ColumnMajor`` the batch's tokens arrive as a transposed
    view, the training step passes a view of the logits (``logits[:, -1]``) to a torchmetrics
    object, and ``predict_step`` returns one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.last_token_acc = MulticlassAccuracy(num_classes=self.hparams.vocab_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["tokens"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        self.log("train_loss", loss)
        self.log("train_last_token_acc", self.last_token_acc(logits[:, -1], batch["targets"][:, -1]))
        return loss

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["tokens"])[:, -1]


class ColumnMajor:
    """Collate that stacks each field column-major: the batch's tensors are transposed views."""

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.stack([row[key] for row in rows]).t().contiguous().t() for key in rows[0]}


class OutOfOrderEvalGPT(EvalGPT):
    """Its validation step touches the last layers' weights first: the step's graph does not
    follow the training split, so the strategy gathers the module for it (and warns)."""

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        batch = {**batch, "tokens": batch["tokens"] + (self.ln_f.weight.sum() * 0).long()}
        super().validation_step(batch, batch_idx)


class EvalBatchNormCNN(BatchNormCNN):
    """Evaluation must use BatchNorm's running statistics (eval mode), held by their stage."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        self.log("test_loss", F.cross_entropy(self(images), labels), sync_dist=True)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).softmax(dim=-1)


class MetricMLP(LoggingMLP):
    """torchmetrics objects in every step: called (forward) in training_step, a MetricCollection
    updated and logged with log_dict in validation_step, a sum-type metric (its epoch value
    counts every sample once only if replicas' states are gathered without duplicates)."""

    def __init__(self) -> None:
        super().__init__()
        import torchmetrics
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

        self.train_acc = MulticlassAccuracy(num_classes=4)
        self.val_metrics = torchmetrics.MetricCollection(
            {"acc": MulticlassAccuracy(num_classes=4), "f1": MulticlassF1Score(num_classes=4)}, prefix="val_"
        )
        self.val_label_sum = torchmetrics.SumMetric()
        self.test_acc = MulticlassAccuracy(num_classes=4)

    def _split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net(batch[:, : self.features]), batch[:, self.features].long()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits, labels = self._split(batch)
        self.log("train_acc", self.train_acc(logits.argmax(dim=-1), labels), on_step=True, on_epoch=False)
        self.log("train_acc_epoch", self.train_acc, on_step=False, on_epoch=True)
        return F.cross_entropy(logits, labels)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits, labels = self._split(batch)
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics)
        self.val_label_sum.update(labels.float())
        self.log("val_label_sum", self.val_label_sum)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits, labels = self._split(batch)
        self.test_acc(logits, labels)
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self._split(batch)[0].softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)
