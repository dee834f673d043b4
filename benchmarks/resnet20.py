"""The CIFAR ResNet-20 of He et al., "Deep Residual Learning for Image Recognition" (2016), 4.2.

Layout: a 3x3 convolution to 16 channels, three stages of three basic blocks each (16, 32 and
64 channels at 32x32, 16x16 and 8x8 pixels; the first block of stages 2 and 3 halves the
resolution with a stride-2 convolution), global average pooling and a 10-way linear layer;
6 * 3 + 2 = 20 weighted layers, 269,722 parameters (the 0.27 M of the paper's Table 6).

Every convolution is bias-free and followed by BatchNorm. Shortcuts are the paper's option A:
the identity, and where a block changes shape, the input subsampled by 2 in space and padded
with zero channels (no parameters; the 1x1-convolution shortcut would be option B).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "ResNet20", "resnet20", "load_pretrained", "WEIGHTS"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers with an option-A (parameter-free) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.pad_channels = out_channels - in_channels

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad_channels:
            # Zero channels on both sides, as in the paper's option A.
            lo = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad_channels - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, option-A shortcuts).

    Input: float tensor (N, 3, 32, 32), normalized per channel; output: (N, num_classes) logits.
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_ch = 16
        for i, ch in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10) -> ResNet20:
    """A freshly initialized CIFAR ResNet-20."""
    return ResNet20(num_classes=num_classes)


WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights",
                       "resnet20_cifar10.safetensors")


def load_pretrained(path: str | None = None) -> ResNet20:
    """ResNet-20 with the trained CIFAR-10 weights (``weights/resnet20_cifar10.safetensors``).

    The training settings, the input normalization (per-channel mean/std) and the held-out
    accuracy are in the JSON file next to the weights. Returns the model in eval mode.
    """
    from safetensors.torch import load_file

    path = WEIGHTS if path is None else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resnet20: weights file not found at {path} "
                                "(train it with benchmarks/train_resnet20.py)")
    model = ResNet20()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()
