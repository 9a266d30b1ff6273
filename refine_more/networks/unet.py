"""2-D U-Net used as the learned proximal operator, and LoRA for its convolutions (paper eq. 11).

The U-Net is residual (output = input + U(input)) with a zero-initialised last layer, so an
untrained network is the identity and the refinement starts exactly at the INR maps.
No normalisation layers: the slices of one subject are the batch, and the output must not depend
on which slices happen to be in it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _double_conv(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.1))


class UNet2D(nn.Module):
    """`levels` 2× downsamplings; channels width·2^l; the paper's 4 levels at width 32 ≈ 7.8 M parameters.
    `out_kernel`: size of the last convolution (the public code's is 3×3; with 3 channels that
    gives the paper's LoRA count, 517,600 at rank 16)."""

    def __init__(self, channels: int = 4, width: int = 32, levels: int = 4, out_kernel: int = 1):
        super().__init__()
        self.levels = levels
        widths = [width * 2**l for l in range(levels + 1)]
        self.down = nn.ModuleList([_double_conv(channels if l == 0 else widths[l - 1], widths[l]) for l in range(levels)])
        self.bottom = _double_conv(widths[levels - 1] if levels else channels, widths[levels])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[l + 1], widths[l], 2, stride=2) for l in reversed(range(levels))])
        self.dec = nn.ModuleList([_double_conv(2 * widths[l], widths[l]) for l in reversed(range(levels))])
        self.out = nn.Conv2d(widths[0], channels, out_kernel, padding=out_kernel // 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        """x (B, C, H, W) → x + U(x); H, W are padded to a multiple of 2^levels internally."""
        h, w = x.shape[-2:]
        m = 2**self.levels
        ph, pw = (-h) % m, (-w) % m
        y = F.pad(x, (0, pw, 0, ph), mode="replicate") if (ph or pw) else x
        skips = []
        for block in self.down:
            y = block(y)
            skips.append(y)
            y = F.max_pool2d(y, 2)
        y = self.bottom(y)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            y = dec(torch.cat([up(y), skip], dim=1))
        y = self.out(y)[..., :h, :w]
        return x + y


class LoRAConv(nn.Module):
    """A frozen convolution plus a low-rank update ΔW = β·A·B of its weight viewed as (m, l).

    m = weight.shape[0], l = the rest (input channels × kernel). B starts at zero, so an adapted
    model starts exactly at the base model.
    """

    def __init__(self, base: nn.Module, rank: int, beta: float = 1.0):
        super().__init__()
        if not isinstance(base, (nn.Conv2d, nn.ConvTranspose2d)):
            raise TypeError(f"LoRAConv wraps Conv2d/ConvTranspose2d, got {type(base).__name__}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        m = base.weight.shape[0]
        l = base.weight[0].numel()
        self.rank, self.beta = rank, beta
        self.lora_A = nn.Parameter(torch.empty(m, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, l))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self):
        return (self.beta * (self.lora_A @ self.lora_B)).view_as(self.base.weight)

    def forward(self, x):
        w = self.base.weight + self.delta_weight()
        b = self.base
        if isinstance(b, nn.Conv2d):
            return F.conv2d(x, w, b.bias, b.stride, b.padding, b.dilation, b.groups)
        return F.conv_transpose2d(x, w, b.bias, b.stride, b.padding, b.output_padding, b.groups, b.dilation)

    def merged(self) -> nn.Module:
        """A plain convolution with β·A·B folded into its weight."""
        import copy
        conv = copy.deepcopy(self.base)
        with torch.no_grad():
            conv.weight.add_(self.delta_weight())
        for p in conv.parameters():
            p.requires_grad_(True)
        return conv


def add_lora(module: nn.Module, rank: int, beta: float = 1.0) -> nn.Module:
    """Replace every Conv2d / ConvTranspose2d in `module` (in place) by a LoRAConv; freeze the rest."""
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Conv2d, nn.ConvTranspose2d)):
            setattr(module, name, LoRAConv(child, rank, beta))
        else:
            add_lora(child, rank, beta)
    return module


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRAConv back into a plain convolution (in place), for export."""
    for name, child in list(module.named_children()):
        if isinstance(child, LoRAConv):
            setattr(module, name, child.merged())
        else:
            merge_lora(child)
    return module


def lora_parameters(module: nn.Module):
    return [p for n, p in module.named_parameters() if n.endswith("lora_A") or n.endswith("lora_B")]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
