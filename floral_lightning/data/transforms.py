"""Pure tensor transforms: the per-cluster shifts of spec §3, normalisation and batched augmentation.

All functions work on whole batches (no per-sample Python loops) and take explicit generators, so data
preparation stays deterministic and cheap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF


def _check_cluster(cluster: int, num_clusters: int) -> None:
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    if not 0 <= cluster < num_clusters:
        raise ValueError(f"cluster must be in [0, {num_clusters - 1}] for num_clusters={num_clusters}, got {cluster}")


def rotate(x: torch.Tensor, cluster: int, num_clusters: int) -> torch.Tensor:
    """Rotate a batch of images ``[..., H, W]`` counter-clockwise by ``360 / num_clusters * cluster`` degrees.

    Multiples of 90° use ``torch.rot90`` (exact, no interpolation; 90° and 270° swap H and W of non-square
    images); other angles use torchvision's ``rotate`` (nearest interpolation, corners filled with 0).
    """
    _check_cluster(cluster, num_clusters)
    if x.dim() < 3:
        raise ValueError(f"rotate expects images [..., C, H, W] (or [N, H, W]), got shape {tuple(x.shape)}")
    # the angle 360·c/C is a multiple of 90° exactly when 4·c is divisible by C (integer test, no float fuzz)
    if (4 * cluster) % num_clusters == 0:
        k = (4 * cluster // num_clusters) % 4
        return x if k == 0 else torch.rot90(x, k, dims=(-2, -1))
    angle = 360.0 * cluster / num_clusters
    return TF.rotate(x, angle)


def label_shift(y: torch.Tensor, cluster: int, num_classes: int) -> torch.Tensor:
    """Permute labels cyclically: ``(y + cluster) mod num_classes``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return (y + cluster) % num_classes


def label_subset_mask(y: torch.Tensor, cluster: int, num_clusters: int) -> torch.Tensor:
    """Boolean mask of samples whose label belongs to ``cluster`` (label ``l`` is in cluster ``l mod C``)."""
    _check_cluster(cluster, num_clusters)
    return y % num_clusters == cluster


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images ``[B, C, H, W]`` in 0..255 → float32 ``(x / 255 - mean) / std`` per channel."""
    channels = x.shape[-3]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {channels} channels")
    # fold the /255 into the statistics: one subtract and one divide over the batch
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).mul_(255.0).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).mul_(255.0).view(-1, 1, 1)
    return (x.to(torch.float32) - m) / s


def flip_crop_params(
    batch_size: int, padding: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw per-sample ``(flip, top, left)`` for :func:`random_flip_crop`, in that order from ``generator``.

    ``flip`` is a bool [B]; ``top``/``left`` are the crop offsets in the padded image, uniform in
    ``0..2*padding``.
    """
    flip = torch.rand(batch_size, generator=generator) < 0.5
    top = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch_size,), generator=generator)
    return flip, top, left


def apply_flip_crop(
    x: torch.Tensor, flip: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad ``x`` [B, C, H, W] by ``padding``, crop H×W at ``(top, left)``, then mirror where ``flip``.

    One ``gather`` over flattened pixel indices replaces a per-sample loop (about 3x faster on CPU than
    indexing with four broadcast index tensors).
    """
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = left.to(dev)[:, None] + torch.arange(w, device=dev)  # [B, W]
    # mirroring the crop = reading its columns right to left
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def random_flip_crop(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation on a float batch [B, C, H, W]: per-sample random crop after zero
    padding, then per-sample horizontal flip with probability 1/2 (vectorised).

    The padding is zero in normalised space (the per-channel mean colour), not black as it would be when
    cropping before normalisation.
    """
    if x.dim() != 4:
        raise ValueError(f"random_flip_crop expects [B, C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    flip, top, left = flip_crop_params(x.shape[0], padding, generator)
    return apply_flip_crop(x, flip, top, left, padding)
