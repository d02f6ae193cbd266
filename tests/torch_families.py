"""Small PyTorch models of today's on-device families, exported to ONNX by the tests and by
bench/model_families.py: a vision transformer, a MobileNetV2-style CNN (depthwise convolutions,
ReLU6) and a GRU classifier over sequences (Fashion-MNIST rows as 28 steps of 28 features)."""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    """ViT: 7x7 patches of a 28x28 image -> 16 tokens + a class token, pre-norm encoder blocks."""

    def __init__(
        self, dim: int = 32, depth: int = 2, heads: int = 2, mlp: int = 64, classes: int = 10, bias: bool = True
    ) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, stride=7)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True, norm_first=True, bias=bias
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, dim)
        cls = self.cls.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


def _inverted_residual(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
    hidden = cin * expand
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(),
        nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(),
        nn.Conv2d(hidden, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        self.block = _inverted_residual(cin, cout, stride, expand)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class TinyMobileNetV2(nn.Module):
    def __init__(self, classes: int = 10, widths: tuple[int, int] = (16, 24), expand: int = 4) -> None:
        super().__init__()
        narrow, wide = widths
        self.stem = nn.Sequential(
            nn.Conv2d(1, narrow, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(narrow), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(narrow, narrow, 1, 2),
            InvertedResidual(narrow, wide, 2, expand),
            InvertedResidual(wide, wide, 1, expand),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(wide, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class RowGRU(nn.Module):
    """A GRU text-style classifier over a sequence: each of the 28 image rows is one step."""

    def __init__(self, features: int = 28, hidden: int = 48, classes: int = 10) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        _, h = self.gru(x)
        return self.head(h[-1])


FAMILIES = {
    "vit": (TinyViT, (1, 28, 28)),
    "mobilenetv2": (TinyMobileNetV2, (1, 28, 28)),
    "gru": (RowGRU, (28, 28)),
}


def export(module: nn.Module, in_shape: tuple, path, dynamo: bool = False, opset: int = 17) -> None:
    """PyTorch's ONNX export with a dynamic batch axis, by the legacy (TorchScript) or dynamo exporter."""
    module.eval()
    example = (torch.zeros(2, *in_shape),)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=opset,
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
        )
        program.save(str(path))
    else:
        torch.onnx.export(
            module,
            example,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )
