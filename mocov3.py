"""MoCo v3 for Vision Transformers, in one file.

Implements "An Empirical Study of Training Self-Supervised Vision Transformers" (Chen, Xie and
He, ICCV 2021, arXiv:2104.02057): a Vision Transformer with a frozen random patch projection and
a fixed 2D sin-cos position embedding, the BatchNorm MLP projector and predictor, the momentum
encoder, the symmetric InfoNCE loss, AdamW with warmup and cosine schedules, and a weighted kNN
monitor.

    python mocov3.py                              # classroom run: small ViT, Fashion-MNIST, CPU
    python mocov3.py --arch vit_small --data DIR  # ViT-S/16 at 224 px on one GPU
    torchrun --nproc_per_node=8 mocov3.py --arch vit_small --data /path/to/imagenet

`--batch-size` is the global batch over all processes. `python mocov3.py --help` lists every
option.
"""

import argparse
import copy
import datetime
import gzip
import json
import math
import os
import pickle
import re
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision import datasets, transforms
from tqdm import tqdm


class UsageError(Exception):
    """Bad input from the user: printed as one line, and the program exits with status 2."""


class DataError(UsageError):
    """An image file that cannot be read; it may surface on one process only."""


# ---------------------------------------------------------------------------- Vision Transformer

# Table 2 of the paper. ViT-S uses 12 heads (32 dims each) as in the paper, where DeiT-S uses 6.
# The `vit_*_cpu` presets are ours: small enough to train on 28-32 px images on a laptop CPU.
ARCHS = {
    "vit_small": dict(patch_size=16, dim=384, depth=12, heads=12, image_size=224),
    "vit_base": dict(patch_size=16, dim=768, depth=12, heads=12, image_size=224),
    "vit_large": dict(patch_size=16, dim=1024, depth=24, heads=16, image_size=224),
    "vit_huge": dict(patch_size=14, dim=1280, depth=32, heads=16, image_size=224),
    "vit_tiny_cpu": dict(patch_size=4, dim=192, depth=6, heads=6, image_size=28),
    "vit_nano_cpu": dict(patch_size=4, dim=128, depth=4, heads=4, image_size=28),
}


def sincos_position_embedding(grid_h, grid_w, dim, temperature=10000.0):
    """Return the fixed 2D sin-cos position embedding, shape (grid_h * grid_w, dim).

    Channels are [sin(col), cos(col), sin(row), cos(row)], a quarter each, at frequencies
    1 / temperature^(i / (dim/4)) as in the Transformer. Rows and columns are encoded
    separately, so the embedding is right for non-square grids too.
    """
    if dim % 4 != 0:
        raise UsageError(f"width {dim} is not divisible by 4, which the 2D sin-cos position "
                         "embedding needs (sin and cos for rows and columns); choose another --dim")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = rows.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    cols = cols.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    emb = torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)  # (N, dim)
    return emb.float()


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping P x P patches and project each to width D."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        # Weight (D, 3*P*P) in (channel, row, column) order, the same memory layout as a
        # (D, 3, P, P) convolution, so timm and official checkpoints convert by a reshape.
        self.proj = nn.Linear(3 * patch_size * patch_size, dim)

    def forward(self, x):
        p = self.patch_size
        x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)  # (B, N, 3PP)
        return self.proj(x)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a bias on q, k and v."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, num_queries=None):
        """Attend from the first `num_queries` tokens (all when None) to all N tokens."""
        qkv = self.qkv(x)  # (B, N, 3D)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q[:, :, :num_queries], k, v)  # (B, h, Q, D/h)
        x = rearrange(x, "b h q d -> b q (h d)")
        return self.proj(x)  # (B, Q, D)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, num_queries=None):
        """Update the first `num_queries` tokens (all when None): (B, N, D) -> (B, Q, D)."""
        x = x[:, :num_queries] + self.attn(self.norm1(x), num_queries)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT whose representation is the final [CLS] token; `head` maps it onwards.

    Module names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed,
    blocks.i.attn.qkv, norm, head), which the official MoCo v3 checkpoints also use.
    """

    def __init__(self, image_size=224, patch_size=16, dim=384, depth=12, heads=12,
                 mlp_ratio=4, learnable_patch_embed=False):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if height % patch_size or width % patch_size:
            raise UsageError(f"image size {height}x{width} is not divisible by the patch size "
                             f"{patch_size}; choose an --image-size that is a multiple of it")
        if dim % heads:
            raise UsageError(f"width {dim} is not divisible by the number of heads {heads}")
        self.image_size, self.patch_size, self.dim = (height, width), patch_size, dim
        self.grid = (height // patch_size, width // patch_size)

        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed position embedding, a buffer so that no optimizer can touch it. The [CLS] token
        # gets a zero position embedding.
        pos = sincos_position_embedding(*self.grid, dim)  # (N, D)
        self.register_buffer("pos_embed", torch.cat([torch.zeros(1, dim), pos])[None])
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        self.reset_parameters()

        # The paper's random patch projection (Section 4.2): freezing it after random
        # initialisation removes the loss spikes that come from sudden changes of the first
        # layer's gradient, and costs no accuracy.
        self.patch_embed.requires_grad_(learnable_patch_embed)

    def reset_parameters(self):
        """Initialise as the official MoCo v3 ViT: xavier-uniform weights, zero biases."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if name.endswith("qkv"):
                    # q, k and v are three (D, D) matrices, so the fan is D + D, not D + 3D.
                    bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    # For the patch projection the fans are 3*P*P and D, as for a convolution.
                    nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def forward_features(self, x):
        """Map images (B, 3, H, W) to the normalised [CLS] token (B, D)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, N, D)
        cls = self.cls_token + self.pos_embed[:, :1]  # (1, 1, D)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        for block in self.blocks[:-1]:
            x = block(x)  # (B, 1+N, D)
        # Only [CLS] is read out, and after the last attention every layer is per token. So the
        # last block updates the [CLS] row alone: it still attends to all 1+N tokens, but its
        # output projection and MLP run on one token. The result is the same, and ViT-S at
        # 224 px needs 6% fewer FLOPs in its blocks.
        x = self.blocks[-1](x, num_queries=1)  # (B, 1, D)
        return self.norm(x[:, 0])  # (B, D)

    def forward(self, x):
        return self.head(self.forward_features(x))


def create_vit(arch, **overrides):
    """Build a preset from ARCHS, with any of its fields (or `learnable_patch_embed`) overridden."""
    if arch not in ARCHS:
        raise UsageError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    config = {**ARCHS[arch], **overrides}
    return VisionTransformer(**config)


# ------------------------------------------------------------------------------ heads and loss

def at_least_fp32(x):
    """Cast fp16 and bf16 to fp32 (for statistics and the loss under autocast); keep fp64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes. The gradient of a sum is the sum of the gradients, so
    the backward pass sums too: each process gets the gradient from every process's loss."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are over the global batch of all processes.

    The paper's implementation normalises the projector and predictor over the whole batch
    (SyncBatchNorm). PyTorch's SyncBatchNorm rejects CPU tensors (torch 2.14), so this one is
    built from differentiable all-reduces and runs on gloo (CPU) and NCCL alike. In a single
    process it is the ordinary BatchNorm1d.

    It takes (B, C), or (V, B, C) for V views of the same B images. Each view is then normalised
    over its own B rows and updates the running statistics in turn, exactly as V separate calls.
    """

    def forward(self, x):
        if x.dim() == 3:
            return torch.stack([self.forward(view) for view in x])  # (V, B, C)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        x32 = at_least_fp32(x)  # statistics in fp32 under autocast
        count = torch.tensor([x.shape[0]], dtype=x32.dtype, device=x.device)
        count = AllReduceSum.apply(count)
        mean = AllReduceSum.apply(x32.sum(0)) / count  # (C,)
        var = AllReduceSum.apply(((x32 - mean) ** 2).sum(0)) / count  # biased, as BatchNorm
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * count / (count - 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked += 1
        y = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def build_mlp(num_layers, in_dim, hidden_dim, out_dim):
    """Build the MoCo v3 MLP: Linear (no bias), then BN and ReLU, except after the last Linear.

    The last layer ends in a BatchNorm without affine parameters: SimCLR v2 ends its head in a
    BatchNorm without shift, and the official MoCo v3 code also drops the scale for simplicity.
    The loss L2-normalises the output, which cancels any scale shared by all channels.
    """
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        else:
            layers.append(BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def world_info():
    """Return (rank, world size); (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_keys(k):
    """Concatenate k from every process in rank order: (N, C) -> (N * world, C), no gradient.

    Every process must have the same N, which the divisible global batch and drop_last ensure.
    """
    _, world = world_info()
    if world == 1:
        return k
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k.contiguous())
    return torch.cat(parts)


def contrastive_loss(q, k, temperature):
    """InfoNCE loss of Equation 1, times 2T; q (N, C) from this process, k (N, C) momentum keys.

    The negatives of each query are the keys of every other image in the global batch, so keys
    are gathered from all processes. This process's N queries are rows N*rank .. N*rank + N - 1
    of the global batch, which is where their positive keys sit in the gathered keys.
    """
    rank, _ = world_info()
    q = F.normalize(at_least_fp32(q), dim=1)
    k = F.normalize(gather_keys(at_least_fp32(k)), dim=1)  # (N * world, C)
    logits = q @ k.T / temperature  # (N, N * world)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    # Why 2T: the cross-entropy is -q.k+ / T + log sum_j exp(q.k_j / T). Times 2T, the positive
    # term becomes -2 q.k+, whose gradient is that of BYOL's loss 2 - 2 q.k+, and the scale of
    # the gradient no longer grows as 1/T when T is lowered.
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCo(nn.Module):
    """MoCo v3: base encoder f_q with projector, predictor, and momentum encoder f_k."""

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, temperature=0.2):
        super().__init__()
        self.temperature = temperature
        width = base_encoder.dim
        self.base_encoder = base_encoder
        self.base_encoder.head = build_mlp(3, width, mlp_dim, dim)  # projector
        self.predictor = build_mlp(2, dim, mlp_dim, dim)

        # The momentum encoder starts as a copy and only ever moves by the moving average.
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        """theta_k <- m * theta_k + (1 - m) * theta_q, in one fused update over all tensors."""
        base = list(self.base_encoder.parameters())
        momentum = list(self.momentum_encoder.parameters())
        torch._foreach_lerp_(momentum, base, 1.0 - m)

    @staticmethod
    def encode_views(encoder, x):
        """Map two views stacked as (2B, 3, H, W) to the encoder's output per view, (2, B, dim).

        Both views go through the backbone and the head as one batch, which runs faster than
        one pass per view. The result is the same: every backbone layer works on each image
        alone, and in the head, BatchNorm normalises each view over its own B images, as
        Algorithm 1 applies f_q and f_k to x1 and x2 separately.
        """
        features = encoder.forward_features(x)  # (2B, D)
        return encoder.head(features.unflatten(0, (2, -1)))  # (2, B, dim)

    def forward(self, x1, x2, m):
        """Return the symmetric loss ctr(q1, k2) + ctr(q2, k1) for two views (B, 3, H, W)."""
        x = torch.cat([x1, x2])  # (2B, 3, H, W)
        # The keys come first. Nothing here changes the base encoder, so the loss is the same,
        # and the keys' temporary activations are freed before the queries' activations are
        # kept for backward, which lowers the step's peak memory.
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1, k2 = self.encode_views(self.momentum_encoder, x)  # (B, dim) each

        q1, q2 = self.predictor(self.encode_views(self.base_encoder, x))  # (B, dim) each
        return (contrastive_loss(q1, k2, self.temperature)
                + contrastive_loss(q2, k1, self.temperature))


# ---------------------------------------------------------------------------------------- data

# Per-channel mean and std used to normalise each dataset's images.
NORMALIZATION = {
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, H, W) or (N, H, W, 3), returned as RGB PIL images."""

    def __init__(self, images, labels, transform=None):
        self.images, self.targets, self.transform = images, list(map(int, labels)), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image
        image = Image.fromarray(self.images[index].numpy()).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def read_idx(path):
    """Read an IDX file (plain or gzipped) of the MNIST family into a uint8 tensor."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def find_idx_file(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(root):
    """Return {"train", "test"}: ArrayDataset, from --data-root, Debian's package or a download."""
    folders = [root / "FashionMNIST" / "raw", root / "fashion-mnist", root, DEBIAN_FASHION_MNIST]
    for folder in folders:
        files = {split: [find_idx_file(folder, n) for n in names]
                 for split, names in FASHION_MNIST_FILES.items()}
        if all(all(pair) for pair in files.values()):
            return {split: ArrayDataset(read_idx(images), read_idx(labels))
                    for split, (images, labels) in files.items()}
    try:
        splits = {split: datasets.FashionMNIST(root, train=(split == "train"), download=True)
                  for split in ("train", "test")}
    except Exception as error:  # torchvision raises several kinds when offline
        raise UsageError(
            f"Fashion-MNIST not found and its download failed ({error}). Get it one of three ways:"
            f" put the IDX files under {root / 'FashionMNIST' / 'raw'} (--data-root);"
            f" 'apt-get install dataset-fashion-mnist', which installs {DEBIAN_FASHION_MNIST};"
            " or run again with network access so that torchvision downloads it") from None
    return {split: ArrayDataset(ds.data, ds.targets) for split, ds in splits.items()}


def load_cifar(name, root):
    """Return {"train", "test"}: ArrayDataset for CIFAR-10 or CIFAR-100 through torchvision."""
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        splits = {split: cls(root, train=(split == "train"), download=True)
                  for split in ("train", "test")}
    except Exception as error:
        raise UsageError(f"{name} not found under --data-root {root} and its download failed "
                         f"({error}); run once with network access or pass --data-root") from None
    return {split: ArrayDataset(torch.from_numpy(ds.data), ds.targets)
            for split, ds in splits.items()}


def load_image_folder(path):
    """Return {"train", "test" if present}: ImageFolder datasets from an ImageFolder layout."""
    if not path.is_dir():
        raise UsageError(f"--data {path}: no such folder; pass an ImageFolder folder or one of "
                         "fashion-mnist, cifar10, cifar100")
    train_dir = path / "train" if (path / "train").is_dir() else path
    splits = {"train": train_dir}
    for name in ("val", "test"):
        if train_dir != path and (path / name).is_dir():
            splits["test"] = path / name
            break
    loaded = {}
    for split, folder in splits.items():
        try:
            loaded[split] = datasets.ImageFolder(folder, loader=load_image)
        except (FileNotFoundError, RuntimeError) as error:
            raise UsageError(f"--data {folder}: {error}; an ImageFolder folder holds one "
                             "subfolder of images per class") from None
    if "test" in loaded and loaded["test"].classes != loaded["train"].classes:
        # ImageFolder numbers classes by sorted folder name, so other folders shift the labels.
        train_classes, test_classes = set(loaded["train"].classes), set(loaded["test"].classes)
        differ = sorted(train_classes ^ test_classes)
        raise UsageError(f"--data {path}: the class folders of {splits['test'].name}/ and "
                         f"train/ differ ({', '.join(differ[:5])}); give both the same classes")
    return loaded


def load_image(path):
    """Open an image file as RGB. A file that PIL cannot decode stops training with a DataError
    naming it, rather than being skipped, so that no run silently trains on fewer images."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                # PIL's convert("RGB") clips 16-bit values to 255: scale 0..65535 to 0..255.
                import numpy as np
                pixels = np.asarray(image, dtype=np.float64) / 257
                image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for broken files
        raise DataError(f"cannot read image {path} ({error}); delete or replace the file and "
                        "run again (with --resume auto if the run has a checkpoint)") from None


def load_datasets(args):
    """Return ({"train", maybe "test"}: datasets of PIL images, normalisation key)."""
    root = Path(args.data_root)
    if args.data == "fashion-mnist":
        return load_fashion_mnist(root), "fashion-mnist"
    if args.data in ("cifar10", "cifar100"):
        return load_cifar(args.data, root), args.data
    return load_image_folder(Path(args.data)), "folder"


def pretrain_transforms(image_size, crop_min, normalization):
    """The two view augmentations of BYOL, which MoCo v3 uses: (first view, second view).

    The blur kernel is 23 px at 224 px in BYOL, about a tenth of the image, so it and the blur's
    sigma range (0.1 to 2.0 px at 224 px) scale with the image size here.
    """
    scale = image_size / 224
    kernel = max(3, int(round(23 * scale)) | 1)  # odd, at least 3
    sigma = (0.1 * scale, 2.0 * scale)

    def view(blur_p, solarize_p):
        return transforms.Compose([
            transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
            transforms.RandomApply([transforms.GaussianBlur(kernel, sigma)], p=blur_p),
            transforms.RandomSolarize(threshold=128, p=solarize_p),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(*normalization),
        ])

    return view(1.0, 0.0), view(0.1, 0.2)


def eval_transform(image_size, normalization, resize_crop):
    """Deterministic transform for evaluation: resize (and centre-crop at 224 px), normalise."""
    steps = [transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size)] \
        if resize_crop else [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(*normalization)])


def leave_ctrl_c_to_main(worker_id):
    """DataLoader worker_init_fn: ignore SIGINT in the worker.

    Ctrl-C on a terminal reaches every process of the group, and each worker would otherwise
    print its own traceback. The main process handles it and shuts the workers down. SIGTERM
    keeps its handler, because the worker must still end when the main process terminates it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TwoViews(torch.utils.data.Dataset):
    """Item i is two augmented views (x1, x2) of image i of `dataset`.

    The random draws for image i in epoch e are seeded from (seed, e, i) alone. So augmentations
    differ across images, epochs and seeds, yet do not depend on the number of processes or
    DataLoader workers, and a resumed run sees the same views as an uninterrupted one.
    """

    def __init__(self, dataset, view1, view2, seed):
        self.dataset, self.view1, self.view2, self.seed = dataset, view1, view2, seed
        self.epoch = 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, _ = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.view1(image), self.view2(image)


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch after its first `start_step` batches."""

    def __init__(self, dataset, batch_per_rank, rank, world, seed):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_per_rank, self.start_step = batch_per_rank, 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start_step * self.batch_per_rank:])

    def __len__(self):
        return self.num_samples - self.start_step * self.batch_per_rank


# ----------------------------------------------------------------------------------- schedules

def learning_rate(epoch, args):
    """Learning rate at a fractional epoch: linear warmup, then a half-cycle cosine to zero."""
    peak = args.lr * args.batch_size / 256  # linear scaling rule (Goyal et al., 2017)
    if epoch < args.warmup_epochs or args.warmup_epochs == args.epochs:
        return peak * min(epoch / args.warmup_epochs, 1.0)
    progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum(epoch, args):
    """Momentum m at a fractional epoch: from args.moco_m to 1 on a half-cycle cosine.

    With m -> 1 the keys change ever more slowly as the encoder converges, as in BYOL.
    """
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs)) * (1.0 - args.moco_m)


# ---------------------------------------------------------------------------------- evaluation

def share_loader(dataset, args):
    """Return a loader of this process's contiguous share of `dataset`, and the share size.

    Process r takes images r * share to (r + 1) * share - 1, so gather_shares puts the results
    back in dataset order.
    """
    rank, world = world_info()
    share = math.ceil(len(dataset) / world)
    indices = range(rank * share, min((rank + 1) * share, len(dataset)))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=256, num_workers=args.workers,
                                         worker_init_fn=leave_ctrl_c_to_main)
    return loader, share


@torch.no_grad()
def extract_features(encoder, dataset, args, device):
    """Return L2-normalised [CLS] features (N, D) and labels (N,) of a dataset, in order.

    Each process encodes a contiguous share of the images and the shares are gathered, so no
    image is counted twice and the result does not depend on the number of processes.
    """
    loader, share = share_loader(dataset, args)
    features, labels = [], []
    was_training = encoder.training
    encoder.eval()
    for images, targets in loader:
        with autocast(args, device):
            features.append(encoder.forward_features(images.to(device)).float())
        labels.append(targets.to(device))
    encoder.train(was_training)
    dim = encoder.dim
    features = torch.cat(features) if features else torch.zeros(0, dim, device=device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    features, labels = gather_shares(features, share), gather_shares(labels, share)
    return F.normalize(features, dim=1)[:len(dataset)], labels[:len(dataset)]


def gather_shares(x, share):
    """Concatenate each process's (n_i, ...) share, padded to `share` rows, in rank order."""
    _, world = world_info()
    if world == 1:
        return x
    padded = torch.zeros((share,) + x.shape[1:], dtype=x.dtype, device=x.device)
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes)])


def knn_predict(bank, bank_labels, queries, num_classes, k=200, temperature=0.1):
    """Weighted kNN (Wu et al., 2018): each of the k nearest bank features votes exp(sim / t).

    bank (N, D) and queries (M, D) are L2-normalised; returns predicted labels (M,).
    """
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in queries.split(1024):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)  # (m, k)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], weights)  # (m, classes)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(encoder, eval_sets, args, device):
    """kNN top-1 (%) of the [CLS] features: train split as the bank, test split as queries."""
    bank, bank_labels = extract_features(encoder, eval_sets["train"], args, device)
    queries, query_labels = extract_features(encoder, eval_sets["test"], args, device)
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predictions = knn_predict(bank, bank_labels, queries, num_classes, k=args.knn_k)
    return 100.0 * (predictions == query_labels).float().mean().item()


# ------------------------------------------------- linear probe, kNN and checkpoint conversion

# Subcommands that read a checkpoint written by pretraining: `probe` trains a linear classifier
# on frozen features, `knn` repeats the training-time kNN monitor, and `export` writes the
# backbone for timm or DeiT. The model shape comes from the checkpoint's `config` entry.

# Linear-probe presets. The paper's follow the official MoCo v3 ViT linear classification
# (facebookresearch/moco-v3, main_lincls.py and CONFIG.md): 90 epochs at batch 1024 and base
# lr 3, so a peak lr of 12, with RandomResizedCrop at torchvision's default scale (0.08, 1).
# The CPU presets are ours, for 28-32 px images. Their 10 epochs cost about as much as one
# epoch of CPU pretraining, because the probe passes each image forward once per epoch where
# pretraining spends about 8 forward passes' worth per image and epoch. Base lr 0.1 comes from
# one sweep (0.03 to 3) on a vit_nano_cpu pretrained for 1 epoch and probed on 2048
# Fashion-MNIST images for 5 epochs. Without --probe-bn, 0.1 was best and 3 diverged. With it,
# 0.3 was best, at 50% top-1 against 45% at 0.1. Crops start at 0.2 of the area, as in CPU
# pretraining, because 8% of a 28 px image is an 8 px square.
PROBE_PAPER_DEFAULTS = dict(epochs=90, batch_size=1024, lr=3.0, crop_min=0.08)
PROBE_CPU_DEFAULTS = dict(epochs=10, batch_size=256, lr=0.1, crop_min=0.2)

# Options that default to the checkpoint's pretraining value, and the value when it has none.
DEFAULTS_FROM_CHECKPOINT = dict(data="fashion-mnist", data_root="./data", seed=0,
                                eval_subset=10000, knn_k=200)


def read_checkpoint(path):
    """Load a pretraining checkpoint for evaluation; return (checkpoint, its config)."""
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint {path}: no such file; pass a checkpoint-epoch*.pth "
                         "file written by pretraining")
    checkpoint = load_checkpoint(path, option="--checkpoint")
    config = checkpoint.get("config")
    absent = [key for key in MODEL_KEYS if not isinstance(config, dict) or key not in config]
    if absent:
        raise UsageError(f"--checkpoint {path}: its 'config' entry lacks {', '.join(absent)}, "
                         "so the model shape is unknown; pass a checkpoint written by mocov3.py")
    return checkpoint, config


def compare_state_dicts(found, expected):
    """Compare state dicts: return (missing keys, unexpected keys, shape mismatches) of `found`."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    mismatched = []
    for key, value in expected.items():
        shape = tuple(getattr(found.get(key), "shape", ()))
        if key in found and shape != tuple(value.shape):
            mismatched.append(f"{key} {shape} in the file, {tuple(value.shape)} here")
    return missing, unexpected, mismatched


def describe_keys(label, keys, limit=5):
    """Format a list of keys for an error message: the first `limit` and a count of the rest."""
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f" and {len(keys) - limit} more"
    return f"{label}: {shown}"


def describe_problems(missing, unexpected, mismatched):
    """Format the lists of compare_state_dicts as one clause each, joined by semicolons."""
    parts = [describe_keys(label, keys) for label, keys in
             (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
             if keys]
    return "; ".join(parts)


def model_from_checkpoint(checkpoint, config, path, device, random_init_seed=None):
    """Build MoCo with the shape in the checkpoint's config and load the checkpoint's weights.

    With random_init_seed, the saved weights are checked but not loaded, so the model keeps the
    initial weights that pretraining with that seed started from (the untrained baseline).
    """
    shape = argparse.Namespace(**{key: config[key] for key in MODEL_KEYS})
    shape.learnable_patch_embed = bool(config.get("learnable_patch_embed", False))
    shape.temperature = config.get("temperature", 0.2)  # only used by the pretraining loss
    shape.seed = 0 if random_init_seed is None else random_init_seed
    moco = build_model(shape, device)
    saved = checkpoint["model"]
    problems = describe_problems(*compare_state_dicts(saved, moco.state_dict()))
    if problems:
        raise UsageError(f"--checkpoint {path}: its weights do not match the model in its own "
                         f"config ({problems}); the file is damaged or was edited")
    if random_init_seed is None:
        moco.load_state_dict(saved)
    return moco


class RawPixels(nn.Module):
    """Encoder stand-in for kNN whose features are an image's normalised pixels.

    kNN on these features is the baseline that learned features must beat.
    """

    def __init__(self, image_size):
        super().__init__()
        self.dim = 3 * image_size * image_size

    def forward_features(self, x):
        return x.flatten(1)  # (B, 3, H, W) -> (B, 3HW)


# Our ViT's module names follow timm's VisionTransformer, so the state dicts differ in two ways
# only: timm's patch projection is a Conv2d with weight (D, 3, P, P) where ours is a Linear with
# weight (D, 3*P*P) in the same (channel, row, column) order, and timm's `head` is a classifier
# where ours is the projector. Checked against timm 1.0.31 by test_evaluation.py.

def timm_vit_config(vit):
    """Return keyword arguments for timm's VisionTransformer with our ViT's shape."""
    # NOTE: timm's vit_small_patch16_224 has 6 heads and ours has 12. The weight shapes are the
    # same, so a 6-head model loads our weights without error but computes other features.
    # Build it with the num_heads returned here.
    return dict(img_size=vit.image_size, patch_size=vit.patch_size, embed_dim=vit.dim,
                depth=len(vit.blocks), num_heads=vit.blocks[0].attn.heads,
                mlp_ratio=vit.blocks[0].mlp.fc1.out_features / vit.dim, qkv_bias=True,
                class_token=True, global_pool="token", num_classes=0)


def export_timm_state_dict(vit):
    """Convert our ViT's weights to a state dict of timm's VisionTransformer, without `head.*`.

    DeiT fine-tunes from the same format, stored under a "model" key. The fixed sin-cos
    position embedding is included as `pos_embed`, which timm treats as a learnable parameter.
    """
    state = {}
    for key, value in vit.state_dict().items():
        if key.startswith("head."):
            continue
        if key == "patch_embed.proj.weight":
            p = vit.patch_size
            value = value.reshape(value.shape[0], 3, p, p)  # (D, 3*P*P) -> (D, 3, P, P)
        state[key] = value.detach().clone()
    return state


def import_timm_state_dict(vit, state_dict):
    """Load a state dict of timm's VisionTransformer (or DeiT) into our ViT, ignoring `head.*`.

    Keys and shapes must match exactly; anything else is a UsageError that lists them.
    """
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            continue
        if key == "patch_embed.proj.weight" and value.dim() == 4:
            value = value.flatten(1)  # (D, 3, P, P) -> (D, 3*P*P)
        converted[key] = value
    expected = {key: value for key, value in vit.state_dict().items()
                if not key.startswith("head.")}
    problems = describe_problems(*compare_state_dicts(converted, expected))
    if problems:
        # NOTE: no interpolation of pos_embed, so the image and patch sizes must be the file's.
        raise UsageError(f"timm state dict does not match this ViT ({problems}); build the ViT "
                         "with the image size, patch size, width, depth and heads of the file")
    vit.load_state_dict(converted, strict=False)  # strict would require our head's keys


def error_summary(error):
    """Return the first line of an exception's message, without terminal colour codes."""
    # torch.load's messages run over many lines, and main() prints only one line per error.
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_official_state_dict(path):
    """Load the `state_dict` of an official MoCo v3 `.pth.tar` with torch.load(weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"official checkpoint {path}: no such file; pass a pretraining "
                         ".pth.tar of the official MoCo v3 release, such as vit-s-300ep.pth.tar")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"official checkpoint {path}: torch.load(weights_only=True) rejected it, because "
            "it contains Python objects other than tensors or is not a PyTorch file. If it comes "
            "from a source you trust, save its tensors with torch.save(torch.load(PATH, "
            "weights_only=False)['state_dict'], NEW) and pass NEW") from None
    except Exception as error:  # truncated zip, not a PyTorch file
        raise UsageError(f"official checkpoint {path}: not a readable PyTorch file "
                         f"({error_summary(error)})") from None
    # Released pretraining files are {"epoch", "arch", "state_dict", "optimizer", ...}. A bare
    # state dict, as the message above suggests saving, is accepted too.
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"official checkpoint {path}: no 'state_dict' of tensors; pass a "
                         "pretraining .pth.tar of the official MoCo v3 release")
    return state


def load_official_checkpoint(path, moco, strict=True):
    """Load a pretraining `.pth.tar` of the official MoCo v3 code into `moco`.

    Returns (missing, unexpected), with keys named as in the file ("module.base_encoder...").
    A shape mismatch raises UsageError. With strict=True, so does a missing or unexpected key.
    With strict=False, every matching tensor is loaded and the caller reports the two lists.
    """
    state = read_official_state_dict(path)
    # The file's keys are ours behind DistributedDataParallel's "module." prefix.
    prefix = "module." if any(key.startswith("module.") for key in state) else ""
    converted, file_keys = {}, {}
    for key, value in state.items():
        name = key.removeprefix(prefix)
        if name.endswith("patch_embed.proj.weight") and value.dim() == 4:
            value = value.flatten(1)  # timm's conv (D, 3, P, P) -> our linear (D, 3*P*P)
        converted[name], file_keys[name] = value, key
    missing, unexpected, mismatched = compare_state_dicts(converted, moco.state_dict())
    missing = [prefix + name for name in missing]
    unexpected = [file_keys[name] for name in unexpected]
    problems = describe_problems(missing, unexpected, mismatched)
    if mismatched or (strict and problems):
        raise UsageError(f"official checkpoint {path} does not match this model ({problems}); "
                         "build the model with the file's arch, --mlp-dim and --out-dim")
    moco.load_state_dict({name: value for name, value in converted.items()
                          if name in moco.state_dict()}, strict=False)
    return missing, unexpected


def with_transform(dataset, transform):
    """Return a shallow copy of an ArrayDataset or ImageFolder that applies `transform`."""
    dataset = copy.copy(dataset)
    dataset.transform = transform
    return dataset


class SeededItems(torch.utils.data.Dataset):
    """Item i of `dataset`, with its random augmentation seeded by (seed, epoch, i) alone.

    As with TwoViews in pretraining, the crops and flips then do not depend on the number of
    processes or DataLoader workers.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed
        self.epoch = 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.dataset[index]


def fixed_subset(dataset, size, seed):
    """Pick a fixed random subset of `size` items, or return all when size is None or larger."""
    if size is None or size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(dataset), generator=generator)[:size]
    return torch.utils.data.Subset(dataset, sorted(picked.tolist()))


def probe_transform(image_size, crop_min, normalization):
    """Build the probe's training augmentation: random resized crop and horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(*normalization),
    ])


def build_probe_data(args):
    """Return (augmented train set, test set with the eval transform, number of classes)."""
    splits, normalization = load_datasets(args)
    if "test" not in splits:
        raise UsageError(f"--data {args.data}: no val/ or test/ folder to test the probe on")
    targets = list(splits["train"].targets) + list(splits["test"].targets)
    num_classes = max(targets) + 1
    mean_std = NORMALIZATION[normalization]
    train = with_transform(splits["train"],
                           probe_transform(args.image_size, args.crop_min, mean_std))
    test = with_transform(splits["test"], eval_transform(args.image_size, mean_std,
                                                         resize_crop=args.image_size >= 128))
    # The seeds are those of pretraining's subset (seed) and of the kNN test images (seed + 1).
    return (fixed_subset(train, args.subset, args.seed),
            fixed_subset(test, args.test_subset, args.seed + 1), num_classes)


def build_classifier(dim, num_classes, probe_bn):
    """Build a linear classifier of [CLS] features, optionally after a BatchNorm without affine."""
    linear = nn.Linear(dim, num_classes)
    # N(0, 0.01^2) weights and zero bias, as the official MoCo v3 linear classification.
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not probe_bn:
        return nn.Sequential(linear)
    # In eval mode this BatchNorm is a fixed affine map, so the probe stays linear. Our
    # BatchNorm1d takes its statistics over all processes, as one process would.
    return nn.Sequential(BatchNorm1d(dim, affine=False), linear)


def probe_loader(train_set, args, rank, world):
    """Build the sampler and shuffled loader of this process's share, in full batches only."""
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size // world, sampler=sampler,
        num_workers=args.workers, drop_last=True, pin_memory=torch.cuda.is_available(),
        worker_init_fn=leave_ctrl_c_to_main)
    if len(loader) == 0:
        raise UsageError(f"{len(train_set)} training images are fewer than one --batch-size "
                         f"{args.batch_size}; lower --batch-size or raise --subset")
    return sampler, loader


def train_probe_epoch(backbone, model, loader, optimizer, epoch, args, device):
    """Train the classifier (`model`, maybe DDP-wrapped) for one epoch; return the mean loss."""
    rank, _ = world_info()
    steps = len(loader)
    peak = args.lr * args.batch_size / 256  # linear scaling rule, as in pretraining
    model.train()
    total = torch.zeros((), device=device)
    progress = tqdm(loader, desc=f"probe epoch {epoch + 1}/{args.epochs}", leave=False,
                    disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    for step, (images, labels) in enumerate(progress):
        # Half-cycle cosine from the peak to zero without warmup, set every step (the official
        # code sets it once per epoch).
        lr = peak * 0.5 * (1.0 + math.cos(math.pi * (epoch + step / steps) / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Frozen features: no graph is built through the backbone.
        with torch.no_grad(), autocast(args, device):
            features = backbone.forward_features(images.to(device, non_blocking=True))  # (B, D)
        logits = model(features.float())  # (B, classes), in fp32
        loss = F.cross_entropy(logits, labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    progress.close()
    return mean_over_processes(total / steps)


@torch.no_grad()
def probe_top1(backbone, classifier, dataset, args, device):
    """Compute the classifier's top-1 (%) on `dataset`, each image classified by one process."""
    # Not extract_features, because the classifier takes raw features and extract_features
    # returns L2-normalised ones.
    loader, share = share_loader(dataset, args)
    classifier.eval()
    predictions = [torch.zeros(0, dtype=torch.long, device=device)]
    labels = [torch.zeros(0, dtype=torch.long, device=device)]
    for images, targets in loader:
        with autocast(args, device):
            features = backbone.forward_features(images.to(device))  # (B, D)
        predictions.append(classifier(features.float()).argmax(dim=1))
        labels.append(targets.to(device))
    predictions = gather_shares(torch.cat(predictions), share)
    labels = gather_shares(torch.cat(labels), share)
    return 100.0 * (predictions == labels).float().mean().item()


def linear_probe(backbone, train_set, test_set, num_classes, args, device):
    """Train a linear classifier on frozen [CLS] features; return (test top-1 %, classifier).

    The backbone is left frozen (requires_grad False) and in eval mode, so neither its weights
    nor its buffers change. `args` needs epochs, batch_size, lr, probe_bn, seed, workers, amp
    and no_progress.
    """
    rank, world = world_info()
    backbone.requires_grad_(False)
    backbone.eval()
    torch.manual_seed(args.seed)
    classifier = build_classifier(backbone.dim, num_classes, args.probe_bn).to(device)
    model = classifier
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)
    train_set = SeededItems(train_set, args.seed)
    sampler, loader = probe_loader(train_set, args, rank, world)
    # SGD with momentum 0.9 and no weight decay, as the official linear classification.
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.0, momentum=0.9, weight_decay=0.0)

    for epoch in range(args.epochs):
        train_set.epoch = epoch
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        loss = train_probe_epoch(backbone, model, loader, optimizer, epoch, args, device)
        if not math.isfinite(loss):
            raise TrainingError(f"probe loss is {loss} in epoch {epoch + 1}; lower --lr")
        speed = len(loader) * args.batch_size / (time.perf_counter() - start)
        print_main(f"probe epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, "
                   f"{speed:.0f} images/s")
    return probe_top1(backbone, classifier, test_set, args, device), classifier


def print_main(message):
    """Print from rank 0 only; every process computes the same result."""
    if world_info()[0] == 0:
        tqdm.write(message)


def append_result(args, name, record):
    """Append `record` as one JSON line to --output-dir/name from rank 0 (no-op without it)."""
    if args.output_dir is None or world_info()[0] != 0:
        return
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def add_evaluation_options(parser):
    """Add the options that `probe` and `knn` share."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint-epoch*.pth written by pretraining")
    add("--data", help="fashion-mnist, cifar10, cifar100, or a folder holding train/ and val/ "
                       "or test/ in ImageFolder layout (default: the checkpoint's)")
    add("--data-root", help="folder for the named datasets (default: the checkpoint's)")
    add("--workers", type=int, default=2,
        help="DataLoader worker processes per process (default: %(default)s)")
    add("--seed", type=int, help="seed of the image subsets (and, for probe, of shuffling and "
                                 "the classifier's initialisation); default: the checkpoint's")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="mixed precision of the backbone, as in pretraining (default: %(default)s)")
    add("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add("--backend", help="torch.distributed backend under torchrun (default: nccl on GPUs, "
                          "gloo on CPUs)")
    add("--output-dir", help="folder where the result is appended as one JSON line to "
                             "probe.jsonl or knn.jsonl (default: print only)")
    add("--random-init", action="store_true",
        help="ignore the checkpoint's weights and evaluate the initial weights that its "
             "pretraining started from (or that --seed gives): the untrained baseline")


def parse_knn_args(argv):
    """Parse the options of `python mocov3.py knn`."""
    parser = argparse.ArgumentParser(
        prog="mocov3.py knn",
        description="Weighted kNN top-1 of a checkpoint's base encoder, computed as the "
                    "training-time monitor does. With the defaults it reproduces the monitor's "
                    "number for the same weights.")
    add_evaluation_options(parser)
    parser.add_argument("--eval-subset", type=int,
                        help="at most this many train images (the bank) and test images (the "
                             "queries) (default: the checkpoint's)")
    parser.add_argument("--knn-k", type=int, help="neighbours k (default: the checkpoint's)")
    parser.add_argument("--pixels", action="store_true",
                        help="ignore the checkpoint's weights and use each image's normalised "
                             "pixels, at the checkpoint's image size, as its features: the "
                             "raw-pixel baseline that learned features must beat")
    args = parser.parse_args(argv)
    if args.pixels and args.random_init:
        parser.error("--pixels and --random-init are two different baselines; pass one")
    return args


def weights_label(args):
    """Return which weights an evaluation used: pixels, random-init or checkpoint."""
    if getattr(args, "pixels", False):
        return "pixels"
    return "random-init" if args.random_init else "checkpoint"


def parse_probe_args(argv):
    """Parse the options of `python mocov3.py probe`."""
    parser = argparse.ArgumentParser(
        prog="mocov3.py probe",
        description="Linear probe of a checkpoint: train a linear classifier on the frozen base "
                    "encoder's [CLS] features with SGD (momentum 0.9, no weight decay, cosine "
                    "learning rate) and report its top-1 on the test split. Defaults marked "
                    "CPU/paper depend on the checkpoint's arch (*_cpu presets or not).")
    add_evaluation_options(parser)
    add = parser.add_argument
    add("--epochs", type=int, help="training epochs (default: CPU 10, paper 90)")
    add("--batch-size", type=int, help="global batch in images, over all processes "
                                       "(default: CPU 256, paper 1024)")
    add("--lr", type=float, help="base learning rate per 256 images: the peak is lr * batch / "
                                 f"256 (default: CPU {PROBE_CPU_DEFAULTS['lr']}, paper 3)")
    add("--crop-min", type=float, help="smallest random-resized-crop scale, a fraction of the "
                                       "area (default: CPU 0.2, paper 0.08)")
    add("--probe-bn", action="store_true",
        help="put a BatchNorm without affine parameters before the classifier. It standardises "
             "each feature, so the best learning rate depends less on the backbone's feature "
             "scale, and in eval mode it is a fixed affine map, so the probe stays linear. The "
             "ViT linear probe of MAE (He, Chen, Xie et al., 2022) uses it")
    add("--subset", type=int, help="train on a fixed random subset of this many train images "
                                   "(default: all)")
    add("--test-subset", type=int, help="test on a fixed random subset of this many test "
                                        "images (default: all)")
    add("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def check_evaluation_args(args, config, positive):
    """Fill options left unset from the checkpoint's config, then validate them."""
    for key, fallback in DEFAULTS_FROM_CHECKPOINT.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, config.get(key, fallback))
    args.image_size = config["image_size"]
    for key in positive:
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise UsageError(f"--{key.replace('_', '-')} {value} must be positive")
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers} must be 0 or more")
    if args.output_dir is not None and Path(args.output_dir).is_file():
        raise UsageError(f"--output-dir {args.output_dir} is a file; pass a folder")


def run_knn(argv):
    """Run `python mocov3.py knn`: kNN top-1 of a checkpoint; return the exit status."""
    args = parse_knn_args(argv)
    checkpoint, config = read_checkpoint(args.checkpoint)
    check_evaluation_args(args, config, positive=("eval_subset", "knn_k"))
    device = setup_distributed(args)
    if args.pixels:
        encoder = RawPixels(args.image_size)
    else:
        seed = args.seed if args.random_init else None
        encoder = model_from_checkpoint(checkpoint, config, args.checkpoint, device,
                                        seed).base_encoder
    splits, normalization = load_datasets(args)
    eval_sets = build_eval_data(args, splits, normalization)
    if eval_sets is None:
        raise UsageError(f"--data {args.data}: no val/ or test/ folder for the kNN queries")

    top1 = knn_top1(encoder, eval_sets, args, device)
    print_main(f"kNN top-1 {top1:.2f}% (k={args.knn_k}, {len(eval_sets['train'])} bank and "
               f"{len(eval_sets['test'])} query images) of {args.checkpoint}, "
               f"{weights_label(args)}")
    append_result(args, "knn.jsonl", dict(
        checkpoint=str(args.checkpoint), weights=weights_label(args), knn_top1=top1,
        knn_k=args.knn_k, data=args.data, eval_subset=args.eval_subset, seed=args.seed))
    return 0


def run_probe(argv):
    """Run `python mocov3.py probe`: linear probe of a checkpoint; return the exit status."""
    args = parse_probe_args(argv)
    checkpoint, config = read_checkpoint(args.checkpoint)
    preset = PROBE_CPU_DEFAULTS if config["arch"].endswith("_cpu") else PROBE_PAPER_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_evaluation_args(args, config, positive=("epochs", "batch_size", "lr", "subset",
                                                  "test_subset"))
    if not 0 < args.crop_min <= 1:
        raise UsageError(f"--crop-min {args.crop_min} must be in (0, 1]")
    device = setup_distributed(args)
    _, world = world_info()
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} "
                         "processes; each process takes batch / processes images")
    if args.probe_bn and args.batch_size // world < 2:
        raise UsageError(f"--batch-size {args.batch_size} gives {args.batch_size // world} image "
                         f"per process; --probe-bn's BatchNorm needs at least 2, so pass at "
                         f"least {2 * world}")
    seed = args.seed if args.random_init else None
    moco = model_from_checkpoint(checkpoint, config, args.checkpoint, device, seed)
    train_set, test_set, num_classes = build_probe_data(args)

    top1, _ = linear_probe(moco.base_encoder, train_set, test_set, num_classes, args, device)
    print_main(f"linear probe top-1 {top1:.2f}% ({len(train_set)} train and {len(test_set)} "
               f"test images, {args.epochs} epochs) of {args.checkpoint}, {weights_label(args)}")
    append_result(args, "probe.jsonl", dict(
        checkpoint=str(args.checkpoint), weights=weights_label(args), probe_top1=top1,
        data=args.data, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, crop_min=args.crop_min, probe_bn=args.probe_bn,
        train_images=len(train_set), test_images=len(test_set), seed=args.seed))
    return 0


def run_export(argv):
    """Run `python mocov3.py export`: write the backbone for timm or DeiT; return 0."""
    parser = argparse.ArgumentParser(
        prog="mocov3.py export",
        description="Write the base encoder's ViT of a checkpoint as a state dict of timm's "
                    "VisionTransformer, under a 'model' key as DeiT's fine-tuning reads it. The "
                    "projector (head.*) is left out.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint-epoch*.pth written by pretraining")
    parser.add_argument("--out", required=True, help="file to write, such as vit.pth")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (never the --checkpoint itself)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise UsageError(f"--out {out}: not a file in an existing folder; pass a path such as "
                         "runs/vit.pth whose folder exists")
    if out.exists():
        if Path(args.checkpoint).exists() and out.samefile(args.checkpoint):
            raise UsageError(f"--out {out} is the --checkpoint itself, and writing the backbone "
                             "over it would lose the training state; pass another --out")
        if not args.overwrite:
            raise UsageError(f"--out {out} already exists; pass --overwrite to replace it, or "
                             "another --out")
    checkpoint, config = read_checkpoint(args.checkpoint)
    moco = model_from_checkpoint(checkpoint, config, args.checkpoint, torch.device("cpu"))
    vit = moco.base_encoder

    # To a temporary file first, so that a failed write leaves an earlier --out as it was.
    temporary = out.with_name(out.name + ".tmp")
    torch.save({"model": export_timm_state_dict(vit)}, temporary)
    os.replace(temporary, out)
    arguments = ", ".join(f"{key}={value!r}" for key, value in timm_vit_config(vit).items())
    print(f"wrote {out}; in timm, load its 'model' entry into "
          f"timm.models.vision_transformer.VisionTransformer({arguments})")
    return 0


COMMANDS = {"probe": run_probe, "knn": run_knn, "export": run_export}


# ------------------------------------------------------------------------------------ training

def autocast(args, device):
    """Autocast context for the chosen --amp precision (a no-op for fp32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(model, loader, optimizer, scaler, epoch, args, state):
    """Train for one epoch (from `state.step`); returns False if a stop signal ended it early."""
    rank, _ = world_info()
    moco = model.module if hasattr(model, "module") else model
    steps = state.steps_per_epoch
    progress = tqdm(total=steps, initial=state.step, desc=f"epoch {epoch}",
                    disable=rank != 0 or args.no_progress, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    seen = 0
    for x1, x2 in loader:
        # lr and m are set every iteration from the fractional epoch
        t = epoch + state.step / steps
        lr, m = learning_rate(t, args), momentum(t, args)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x1 = x1.to(state.device, non_blocking=True)
        x2 = x2.to(state.device, non_blocking=True)
        with autocast(args, state.device):
            loss = model(x1, x2, m)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        state.step += 1
        seen += x1.shape[0] * state.world
        stopping = stop_requested()
        if state.step % args.log_every == 0 or state.step == steps or stopping:
            loss_value = mean_over_processes(loss.detach())
            check_finite(loss_value, epoch, state.step)
            speed = seen / (time.perf_counter() - start)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", m=f"{m:.4f}",
                                 img_s=f"{speed:.0f}")
            state.log(dict(epoch=epoch, step=state.step, loss=loss_value, lr=lr, momentum=m,
                           images_per_s=round(speed, 1)))
        progress.update(1)
        if stopping:
            progress.close()
            return False
    progress.close()
    return True


def mean_over_processes(x):
    """Average a scalar tensor over all processes and return it as a float."""
    _, world = world_info()
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


def check_finite(loss, epoch, step):
    if not math.isfinite(loss):
        raise TrainingError(f"loss is {loss} at epoch {epoch}, step {step}; the last checkpoint "
                            "was kept. Lower --lr, raise --warmup-epochs, or try --amp off")


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss); printed as one line."""


_STOP_SIGNAL = []
_IN_TRAINING = [False]  # True while train_one_epoch runs, where a stop waits for the step


class StopRequested(Exception):
    """SIGTERM or SIGINT outside the training steps, where there is no step to finish."""


def request_stop(signum, frame):
    """Signal handler: finish the current step if training, otherwise stop at once.

    While an exception is already on its way out, the signal is only noted. torchrun sends
    SIGTERM to every process once one fails, and the error that ends this process must keep
    its own message. A signal noted during setup still stops training after its first step.
    """
    _STOP_SIGNAL.append(signum)
    if not (_IN_TRAINING[0] or sys.exc_info()[1] is not None):
        raise StopRequested(signum)


def stop_requested():
    """True if any process received SIGTERM or SIGINT; every process gets the same answer."""
    flag = torch.tensor([float(bool(_STOP_SIGNAL))])
    _, world = world_info()
    if world > 1:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag)
    return bool(flag.item())


# ----------------------------------------------------------------------------------- checkpoints

CHECKPOINT = re.compile(r"checkpoint-epoch(\d+)(?:-step(\d+))?\.pth$")


def checkpoint_path(output_dir, epoch, step):
    """checkpoint-epochE.pth after E whole epochs; checkpoint-epochE-stepS.pth within epoch E."""
    name = f"checkpoint-epoch{epoch:04d}" + (f"-step{step:06d}" if step else "") + ".pth"
    return Path(output_dir) / name


def list_checkpoints(output_dir):
    """Checkpoints in output_dir, oldest first (ordered by epoch, then step)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-epoch*.pth"):
        match = CHECKPOINT.match(path.name)
        if match:
            found.append(((int(match[1]), int(match[2] or 0)), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(path, moco, optimizer, scaler, epoch, step, args):
    """Write atomically: to a temporary file in the same folder, then rename over the target."""
    checkpoint = dict(
        model=moco.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        epoch=epoch, step=step, world_size=world_info()[1], config=plain_config(args))
    temporary = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
    for old in list_checkpoints(path.parent)[:-args.keep_checkpoints]:
        old.unlink()


def plain_config(args):
    """The arguments as plain Python types, so that torch.load(weights_only=True) can read them."""
    return {key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()}


MODEL_KEYS = ("arch", "image_size", "patch_size", "dim", "depth", "heads", "mlp_dim", "out_dim")


def load_checkpoint(path, option="--resume"):
    """Load a checkpoint safely (weights_only); a bad file is a UsageError naming it and option."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file; pass a checkpoint-epoch*.pth file, "
                         "or 'auto' to take the latest one in --output-dir")
    import zipfile
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise UsageError(f"{option} {path}: not a readable checkpoint (not a file written by "
                         "torch.save, or a truncated one); pass a checkpoint written by mocov3.py")
    # torch.load does not check the archive's CRC-32 sums, so changed bytes inside a tensor
    # would load silently. testzip reads every entry and names the first that fails.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # a damaged entry header or compressed stream
        reason = f"{type(error).__name__}: {error_summary(error)}"
        raise UsageError(f"{option} {path}: not a readable checkpoint ({reason}); pass an "
                         "earlier checkpoint") from None
    if damaged is not None:
        raise UsageError(f"{option} {path}: not a readable checkpoint (entry {damaged} fails "
                         "its CRC check, so the file is damaged); pass an earlier checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle of arbitrary objects
        reason = f"{type(error).__name__}: {error_summary(error)}"
        raise UsageError(f"{option} {path}: not a readable checkpoint ({reason}); "
                         "pass a checkpoint written by mocov3.py") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise UsageError(f"{option} {path}: not a mocov3.py checkpoint (no 'model' entry)")
    return checkpoint


def restore(checkpoint, path, moco, optimizer, scaler, args):
    """Load model, optimizer and scaler state; a model of another shape is a UsageError."""
    config = checkpoint.get("config", {})
    changed = [f"--{key.replace('_', '-')} {config[key]} (now {getattr(args, key)})"
               for key in ("data", "subset", "seed", "batch_size")
               if key in config and config[key] != getattr(args, key)]
    if changed:
        raise UsageError(f"--resume {path}: the checkpoint was trained with " + ", ".join(changed)
                         + "; resume with the same options, or start a new run")
    saved = checkpoint["model"]
    problems = describe_problems(*compare_state_dicts(saved, moco.state_dict()))
    if problems:
        was = ", ".join(f"{key}={config[key]}" for key in MODEL_KEYS if key in config)
        raise UsageError(f"--resume {path}: checkpoint does not fit this model ({problems}). It "
                         f"was trained with {was or 'unknown options'}; pass the same options")
    moco.load_state_dict(saved)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])


# -------------------------------------------------------------------------------- command line

# Defaults for the paper's presets (Table 1 and Section 4 of the paper, ViT rows) and for ours.
PAPER_DEFAULTS = dict(batch_size=4096, lr=1.5e-4, epochs=300, warmup_epochs=40, crop_min=0.08,
                      mlp_dim=4096, temperature=0.2, weight_decay=0.1, moco_m=0.99, knn_k=200)
# A classroom run is one epoch (234 steps on Fashion-MNIST), so the CPU presets start the
# momentum at 0.9: at 0.99 the keys lag about 100 steps behind the encoder. In our short
# Fashion-MNIST runs, m = 0.9 reached in 78 steps the kNN gain that m = 0.99 reached in 117,
# and a base lr of 3e-3 did worse than 1.5e-3.
CPU_DEFAULTS = dict(batch_size=256, lr=1.5e-3, epochs=1, warmup_epochs=0.1, crop_min=0.2,
                    mlp_dim=1024, temperature=0.2, weight_decay=0.1, moco_m=0.9, knn_k=200)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: X)" only for options whose default is a value, not None or False."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="MoCo v3 self-supervised pretraining of a Vision Transformer. Options shown "
                    "with 'preset' take the arch's default: the paper's for vit_small/base/"
                    "large/huge, CPU-sized ones for the *_cpu presets (see README).",
        epilog="Subcommands that read a checkpoint of this pretraining: 'mocov3.py probe "
               "--checkpoint PATH' trains and tests a linear classifier on frozen features, "
               "'mocov3.py knn --checkpoint PATH' reports kNN top-1 as the training-time "
               "monitor does, and 'mocov3.py export --checkpoint PATH --out FILE' writes the "
               "backbone as a timm/DeiT state dict. Add --help after a subcommand for its options.",
        formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--arch", default="vit_nano_cpu", help=f"ViT preset: {', '.join(ARCHS)}")
    add("--image-size", type=int, help="input image side in pixels (default: the preset's)")
    add("--patch-size", type=int, help="patch side P in pixels (default: the preset's)")
    add("--dim", type=int,
        help="ViT width D (default: the preset's); a multiple of 4 and of --heads")
    add("--depth", type=int, help="number of Transformer blocks (default: the preset's)")
    add("--heads", type=int, help="attention heads per block (default: the preset's)")
    add("--learnable-patch-embed", action="store_true",
        help="train the patch projection instead of freezing it (the paper's comparison)")
    add("--data", default="fashion-mnist",
        help="fashion-mnist, cifar10, cifar100, or a folder in ImageFolder layout (or holding "
             "train/ and optionally val/ or test/, as ImageNet)")
    add("--data-root", default="./data", help="folder for the named datasets (downloads go here)")
    add("--subset", type=int, help="train on a fixed random subset of this many images")
    add("--eval-subset", type=int, default=10000,
        help="kNN uses at most this many train images (bank) and test images (queries)")
    add("--epochs", type=int, help="training epochs (default: preset)")
    add("--warmup-epochs", type=float, help="linear learning-rate warmup, in epochs (preset)")
    add("--batch-size", type=int, help="global batch, in image pairs over all processes (preset)")
    add("--lr", type=float, help="base learning rate, per 256 images; lr = lr * batch / 256")
    add("--weight-decay", type=float, help="AdamW weight decay (preset)")
    add("--moco-m", type=float, help="momentum m at the start; it rises to 1 on a cosine")
    add("--temperature", type=float, help="softmax temperature T of the loss (preset)")
    add("--mlp-dim", type=int, help="hidden width of the projector and predictor (preset)")
    add("--out-dim", type=int, default=256, help="output width of the projector and predictor")
    add("--crop-min", type=float, help="smallest random-resized-crop scale, a fraction of the area")
    add("--knn-k", type=int, help="neighbours k of the kNN monitor (preset)")
    add("--eval-every", type=int, default=1, help="kNN every this many epochs (0: only at ends)")
    add("--output-dir", help="folder for metrics.jsonl and checkpoints "
                             "(default: runs/ARCH-DATE-TIME)")
    add("--resume", help="checkpoint to continue from, or 'auto' for the latest in --output-dir")
    add("--overwrite", action="store_true",
        help="delete the checkpoints (except the one --resume names) and metrics.jsonl that "
             "--output-dir already contains, to start afresh or from an older checkpoint")
    add("--keep-checkpoints", type=int, default=1,
        help="how many of the newest checkpoints to keep")
    add("--seed", type=int, default=0, help="seed for weights, subset, shuffling, augmentation")
    add("--workers", type=int, default=2, help="DataLoader worker processes per training process")
    add("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="mixed precision: auto is bf16 on GPUs that support it, fp16 with a gradient "
             "scaler on older GPUs, off (fp32) on CPUs")
    add("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    add("--backend", help="torch.distributed backend (default: nccl on GPUs, gloo on CPUs)")
    add("--log-every", type=int, default=10, help="log loss and lr every this many steps")
    add("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    fill_defaults(args)
    return args


def fill_defaults(args):
    """Fill preset-dependent options left unset, then validate every numeric option."""
    if args.arch not in ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    preset = ARCHS[args.arch]
    defaults = CPU_DEFAULTS if args.arch.endswith("_cpu") else PAPER_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("patch_size", "dim", "depth", "heads", "image_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    positive = ("epochs", "batch_size", "lr", "image_size", "patch_size", "dim", "depth", "heads",
                "temperature", "mlp_dim", "out_dim",
                "knn_k", "log_every", "keep_checkpoints", "eval_subset")
    for key in positive:
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} must be positive")
    for key in ("lr", "temperature", "warmup_epochs", "weight_decay", "moco_m", "crop_min"):
        if not math.isfinite(getattr(args, key)):
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} must be a finite "
                             "number")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay {args.weight_decay} must be 0 or more")
    if not 0 <= args.seed < 2**31:
        raise UsageError(f"--seed {args.seed} must be in [0, 2**31)")
    for key in ("subset",):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise UsageError(f"--{key} {getattr(args, key)} must be positive")
    if not 0 <= args.warmup_epochs <= args.epochs:
        raise UsageError(f"--warmup-epochs {args.warmup_epochs} must be in [0, --epochs "
                         f"{args.epochs}]")
    if not 0 <= args.moco_m <= 1:
        raise UsageError(f"--moco-m {args.moco_m} must be in [0, 1]")
    if not 0 < args.crop_min <= 1:
        raise UsageError(f"--crop-min {args.crop_min} must be in (0, 1]")
    if args.image_size % args.patch_size:
        raise UsageError(f"--image-size {args.image_size} is not divisible by the patch size "
                         f"{args.patch_size} of {args.arch}; use a multiple of {args.patch_size}")
    if args.dim % 4:
        raise UsageError(f"--dim {args.dim} is not divisible by 4, which the 2D sin-cos position "
                         "embedding needs; use a multiple of 4")
    if args.dim % args.heads:
        raise UsageError(f"--dim {args.dim} is not divisible by --heads {args.heads}; each head "
                         "takes dim / heads channels")
    if args.workers < 0 or args.eval_every < 0:
        raise UsageError("--workers and --eval-every must be 0 or more")


# ---------------------------------------------------------------------------------------- main

def setup_distributed(args):
    """Join the torchrun process group if there is one; return the device of this process."""
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device}: invalid; pass cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is available; pass cpu")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        backend = args.backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    if args.amp == "auto":
        if device.type == "cuda":
            args.amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # NOTE: fp32 is the CPU default because the README's results were measured in it.
            # On a 2-core AMD EPYC with avx512_bf16, bf16 autocast made the vit_nano_cpu step
            # 1.2x and the vit_small 224 px step 1.5x faster (benchmarks/README.md). CPUs
            # without bf16 instructions may run it slower (not measured). --amp bf16 turns it on.
            args.amp = "off"
    if args.amp == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA device; use --amp bf16 or off on a CPU")
    return device


class RunState:
    """Position in training and the metrics log; only rank 0 writes the log."""

    def __init__(self, output_dir, device, steps_per_epoch):
        self.rank, self.world = world_info()
        self.output_dir, self.device, self.steps_per_epoch = output_dir, device, steps_per_epoch
        self.step = 0

    def log(self, record):
        if self.rank == 0:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def print(self, *parts):
        if self.rank == 0:
            tqdm.write(" ".join(str(p) for p in parts))


def prepare_output_dir(args):
    """Pick the output folder and check it against --resume and --overwrite; writes nothing."""
    rank, world = world_info()
    if args.output_dir is None:
        stamp = [datetime.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if world > 1:
            dist.broadcast_object_list(stamp, src=0)  # every rank writes to the same folder
        args.output_dir = f"runs/{args.arch}-{stamp[0]}"
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output-dir {output_dir} is a file; pass a folder")
    existing = list_checkpoints(output_dir) if output_dir.is_dir() else []
    if args.resume == "auto":
        args.resume = str(existing[-1]) if existing else None
    if existing and not args.overwrite and not continues_folder(args.resume, existing):
        # A new run, a file from elsewhere or an older checkpoint of this folder would write
        # over the later checkpoints or mix two runs, and the cleanup of old checkpoints could
        # then delete the new ones.
        raise UsageError(f"--output-dir {output_dir} already contains checkpoints of a run, "
                         f"the latest {existing[-1].name}; pass --resume auto to continue it, "
                         "--overwrite to delete them first, or another --output-dir")
    return output_dir


def continues_folder(resume, existing):
    """Return whether --resume is the latest of the folder's checkpoints `existing`."""
    return bool(resume and existing and Path(resume).resolve() == existing[-1].resolve())


def create_output_dir(output_dir, args):
    """Create the output folder; with --overwrite, delete the earlier run's files first.

    Called once data, model and checkpoint have loaded, so that a run failing on bad input
    leaves an earlier run's results as they were.
    """
    if world_info()[0] != 0:
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(output_dir)
    if args.overwrite and not continues_folder(args.resume, existing):
        # The checkpoint being resumed has loaded already, but it stays until the next one is
        # written, in case this run fails first.
        keep = Path(args.resume).resolve() if args.resume else None
        for path in existing:
            if path.resolve() != keep:
                path.unlink()
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)


def build_training_data(args, splits, normalization, rank, world):
    """Return the two-view training set, its sampler and DataLoader."""
    train = splits["train"]
    if len(train) == 0:
        raise UsageError(f"--data {args.data}: no training images found")
    if args.subset is not None and args.subset > len(train):
        raise UsageError(f"--subset {args.subset} is more than the {len(train)} training images "
                         f"of --data {args.data}; pass at most {len(train)}")
    if args.subset is not None and args.subset < len(train):
        generator = torch.Generator().manual_seed(args.seed)
        picked = torch.randperm(len(train), generator=generator)[:args.subset].tolist()
        train = torch.utils.data.Subset(train, sorted(picked))
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {world} "
                         "processes; each process takes batch / processes images")
    if args.batch_size // world < 2:
        raise UsageError(f"--batch-size {args.batch_size} gives {args.batch_size // world} image "
                         f"per process; BatchNorm needs at least 2, so pass at least {2 * world}")
    if len(train) < args.batch_size:
        raise UsageError(f"--data {args.data} has {len(train)} training images, fewer than one "
                         f"--batch-size {args.batch_size}; lower --batch-size or add images")
    view1, view2 = pretrain_transforms(args.image_size, args.crop_min,
                                       NORMALIZATION[normalization])
    two_views = TwoViews(train, view1, view2, args.seed)
    batch_per_rank = args.batch_size // world
    sampler = EpochSampler(two_views, batch_per_rank, rank, world, args.seed)
    loader = torch.utils.data.DataLoader(
        two_views, batch_size=batch_per_rank, sampler=sampler, num_workers=args.workers,
        drop_last=True, pin_memory=torch.cuda.is_available(), worker_init_fn=leave_ctrl_c_to_main)
    return two_views, sampler, loader


def build_eval_data(args, splits, normalization):
    """Return {"train", "test"} datasets for kNN (fixed subsets); None without a test split."""
    if "test" not in splits:
        return None
    transform = eval_transform(args.image_size, NORMALIZATION[normalization],
                               resize_crop=args.image_size >= 128)
    eval_sets = {}
    for split in ("train", "test"):
        dataset = splits[split]
        if isinstance(dataset, ArrayDataset):
            dataset = ArrayDataset(dataset.images, dataset.targets, transform)
        else:
            dataset = datasets.ImageFolder(dataset.root, transform=transform, loader=load_image)
        if len(dataset) > args.eval_subset:
            generator = torch.Generator().manual_seed(args.seed + 1)
            picked = torch.randperm(len(dataset), generator=generator)[:args.eval_subset]
            dataset = torch.utils.data.Subset(dataset, sorted(picked.tolist()))
        eval_sets[split] = dataset
    return eval_sets


def build_model(args, device):
    """Build MoCo on `device` with the same initial weights in every process."""
    torch.manual_seed(args.seed)
    vit = create_vit(args.arch, image_size=args.image_size, patch_size=args.patch_size,
                     dim=args.dim, depth=args.depth, heads=args.heads,
                     learnable_patch_embed=args.learnable_patch_embed)
    return MoCo(vit, dim=args.out_dim, mlp_dim=args.mlp_dim,
                temperature=args.temperature).to(device)


def evaluation_due(epoch, args):
    """Return whether kNN runs after `epoch` epochs: at the start, each --eval-every, at the end."""
    return epoch in (0, args.epochs) or bool(args.eval_every and epoch % args.eval_every == 0)


def evaluation_logged(output_dir, epoch):
    """Return whether metrics.jsonl in output_dir has the kNN result of `epoch`."""
    path = Path(output_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short when a run was killed while writing it
            continue
        if isinstance(record, dict) and record.get("epoch") == epoch and "knn_top1" in record:
            return True
    return False


def evaluate(moco, eval_sets, args, device, state, epoch):
    if eval_sets is None:
        return
    top1 = knn_top1(moco.base_encoder, eval_sets, args, device)
    state.print(f"epoch {epoch}: kNN top-1 {top1:.2f}%")
    state.log(dict(epoch=epoch, knn_top1=top1))


def train(args):
    """Pretrain MoCo v3 as configured by args; returns the exit status."""
    # From here on SIGTERM and SIGINT finish the current step and write a checkpoint.
    _STOP_SIGNAL.clear()
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    device = setup_distributed(args)
    rank, world = world_info()
    output_dir = prepare_output_dir(args)
    splits, normalization = load_datasets(args)
    two_views, sampler, loader = build_training_data(args, splits, normalization, rank, world)
    eval_sets = build_eval_data(args, splits, normalization)

    moco = build_model(args, device)
    model = moco
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            moco, device_ids=[device.index] if device.type == "cuda" else None)
    trainable = [p for p in moco.parameters() if p.requires_grad]
    # fused: one kernel updates every tensor, where the default on CPUs loops over them in
    # Python (benchmarks/README.md times both).
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay,
                                  fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    state = RunState(output_dir, device, len(sampler) // sampler.batch_per_rank)
    start_epoch = 0
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        restore(checkpoint, args.resume, moco, optimizer, scaler, args)
        start_epoch, state.step = checkpoint["epoch"], checkpoint["step"]
        if state.step and checkpoint.get("world_size") != world:
            raise UsageError(f"--resume {args.resume}: stopped mid-epoch with "
                             f"{checkpoint.get('world_size')} processes; resume it with as many")
        state.print(f"resumed from {args.resume} at epoch {start_epoch}, step {state.step}")
    create_output_dir(output_dir, args)
    state.print(f"MoCo v3 {args.arch}, {len(two_views)} images, global batch {args.batch_size} "
                f"on {world} process(es), {device}, amp {args.amp}; output in {output_dir}")

    if eval_sets is None:
        state.print(f"--data {args.data} has no test split (val/ or test/ beside train/): "
                    "kNN evaluation is skipped")
    # A resumed run also evaluates here when it was stopped during this epoch's evaluation.
    if (state.step == 0 and evaluation_due(start_epoch, args)
            and not (args.resume and evaluation_logged(output_dir, start_epoch))):
        evaluate(moco, eval_sets, args, device, state, epoch=start_epoch)
    for epoch in range(start_epoch, args.epochs):
        two_views.epoch = epoch
        sampler.set_epoch(epoch)
        sampler.start_step = state.step
        _IN_TRAINING[0] = True
        try:
            finished = train_one_epoch(model, loader, optimizer, scaler, epoch, args, state)
        finally:
            _IN_TRAINING[0] = False
        done_epoch, done_step = (epoch + 1, 0) if finished else (epoch, state.step)
        if rank == 0:
            save_checkpoint(checkpoint_path(output_dir, done_epoch, done_step), moco, optimizer,
                            scaler, done_epoch, done_step, args)
        if not finished:
            state.print(f"stopped by signal at epoch {epoch}, step {state.step}; checkpoint "
                        f"written. Continue with --resume auto --output-dir {output_dir}")
            return 128 + _STOP_SIGNAL[0] if _STOP_SIGNAL else 143
        state.step = 0
        if evaluation_due(epoch + 1, args):
            evaluate(moco, eval_sets, args, device, state, epoch=epoch + 1)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        # A first word probe, knn or export picks that subcommand; otherwise this is pretraining.
        if argv and argv[0] in COMMANDS:
            status = COMMANDS[argv[0]](argv[1:])
        else:
            args = parse_args(argv)
            status = train(args)
    except (UsageError, TrainingError) as error:
        # Bad input and a non-finite (all-reduced) loss are the same on every process, so rank 0
        # alone prints them; an unreadable image may be met by one process only. RANK is read
        # from torchrun's environment because the error may come before the process group.
        rank = int(os.environ.get("RANK", 0))
        if rank == 0 or isinstance(error, DataError):
            # A DataLoader worker's error arrives as the worker's traceback, whose last line is
            # "mocov3.DataError: message": keep the message.
            lines = str(error).strip().splitlines()
            message = lines[0] if len(lines) == 1 else re.sub(r"^[\w.]+: ", "", lines[-1])
            prefix = f"error on rank {rank}" if rank else "error"
            print(f"{prefix}: {message}", file=sys.stderr)
        status = 2 if isinstance(error, UsageError) else 1
    except StopRequested as stop:
        # Setup or evaluation: the last checkpoint, if any, was written before it began.
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"stopped by signal {stop.args[0]} outside training; earlier checkpoints are "
                  "intact", file=sys.stderr)
        status = 128 + stop.args[0]
    except OSError as error:
        # A path that cannot be written or read (a folder under a file, a full disk).
        print(f"error: {error}; check the path and its permissions", file=sys.stderr)
        status = 1
    except RuntimeError as error:
        # Another process failed and closed its connections (gloo raises a RuntimeError that
        # says so, NCCL a DistError): that process's own message says why, so this one reports
        # the lost peer in one line instead of a traceback. Other errors keep their traceback.
        if not (isinstance(error, dist.DistError) or "closed by peer" in str(error)):
            raise
        rank = int(os.environ.get("RANK", 0))
        first_line = str(error).strip().splitlines()[0][:200]
        print(f"rank {rank} stopped: another process failed ({first_line})", file=sys.stderr)
        status = 1
    finally:
        # The status is settled, so a signal now (torchrun's SIGTERM once another process
        # failed) is ignored until the handlers found at the start are back.
        for number in handlers:
            signal.signal(number, signal.SIG_IGN)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
