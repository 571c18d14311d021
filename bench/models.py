"""Models the step benchmark trains: all map a batch to class logits so every baseline applies.

Sizes are parameters so the CPU ``--quick`` run stays small and the GPU run can be realistic.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


class MLP(nn.Module):
    """Flattened CIFAR-shaped input -> two hidden ReLU layers -> logits."""

    def __init__(self, in_features: int = 3 * 32 * 32, hidden: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, NUM_CLASSES))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """CIFAR-shaped (3x32x32) CNN with BatchNorm: three conv stages, global pool, linear head."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, width, 1),
            *_conv_bn(width, 2 * width, 2),
            *_conv_bn(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


class TransformerBlock(nn.Module):
    """One pre-LayerNorm transformer block on (B, tokens, dim) using F.scaled_dot_product_attention,
    mean-pooled into a linear head. The fused attention kernels may lack a double backward, which is
    exactly what the double-backprop baselines trip over."""

    def __init__(self, dim: int = 64, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs with BatchNorm and an identity/projection skip."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016) with the usual CIFAR stem (3x3 conv, no max-pool): ~11M parameters."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, width, 1))
        blocks: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            for i in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, NUM_CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def input_shape(model_name: str, sizes: dict) -> tuple[int, ...]:
    """Per-sample input shape of a model (without the batch axis)."""
    if model_name == "transformer":
        return (sizes.get("tokens", 16), sizes.get("dim", 64))
    return (3, 32, 32)


def build_model(model_name: str, sizes: dict) -> nn.Module:
    """Build a model by name with the given size knobs (see ``bench.steps.SIZES``)."""
    if model_name == "mlp":
        return MLP(hidden=sizes.get("hidden", 256))
    if model_name == "cnn":
        return SmallCNN(width=sizes.get("width", 32))
    if model_name == "transformer":
        return TransformerBlock(dim=sizes.get("dim", 64), heads=sizes.get("heads", 4))
    if model_name == "resnet18":
        return ResNet18(width=sizes.get("width", 64))
    raise ValueError(f"unknown model {model_name!r}; expected mlp, cnn, transformer or resnet18")
