"""Benchmark mocov3.py's training step against the same MoCo v3 step built on timm's ViT.

For each configuration (ViT preset, implementation, precision) this measures:

- step throughput: image pairs per second, from the median of several timed steps after warm-up.
  One step is forward(x1, x2, m) returning the loss, backward, and an AdamW step, on fixed random
  inputs, so data loading is not part of it;
- peak memory of the step (see `measure_group` for how, on CPU and on CUDA);
- model FLOPs per step, counted analytically (see `step_flops`), and MFU: achieved FLOP/s over the
  peak FLOP/s of a large matrix multiply measured in the same run and in the same dtype;
- data loading: decoded and augmented image pairs per second in one process, which is what one
  DataLoader worker delivers.

It also profiles mocov3.py's step in each precision with torch.profiler, prints one Markdown
page and writes it to benchmarks/README.md, which records how long the last full run took and on
what machine.

    python benchmarks/benchmark.py            # full run: CPU presets, fp32 and bf16
    python benchmarks/benchmark.py --quick    # smoke test: smaller batches, 1 timed step
    python benchmarks/benchmark.py --threads 1   # steadier on a machine shared with others
    python benchmarks/benchmark.py --help

Each preset and dtype runs in a fresh process, so that one's allocator state does not leak into
the next.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import io
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch._C._profiler import _EventType
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import mocov3  # noqa: E402  (after the path change, so the script runs from any folder)

DEFAULT_OUTPUT = REPO / "benchmarks" / "README.md"
DEFAULT_JPEG_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"

# Hyperparameters of the timed step. They barely change its cost, and m is fixed so that no
# schedule enters the timing.
OUT_DIM = 256
TEMPERATURE = 0.2
MOMENTUM = 0.99
LEARNING_RATE = 1.5e-4
WEIGHT_DECAY = 0.1

# CPU configurations: vit_small at 224 px, the MoCo v3 paper's resolution, with a small batch
# because one step costs about 69 GFLOP per image pair. The classroom preset runs at mocov3.py's
# CPU defaults.
CPU_CONFIGS = {
    "vit_small": dict(image_size=224, batch=8, mlp_dim=4096),
    "vit_nano_cpu": dict(image_size=28, batch=256, mlp_dim=1024),
}
CUDA_BATCH = 256  # image pairs per step for vit_small on one GPU, unless --batch-size sets it

# Targets set for mocov3.py's step on vit_small at 224 px. The page reports them, nothing fails.
TARGETS = {
    "speedup_bf16": 1.25,  # ours / timm pairs per second, bf16 autocast
    "speedup_fp32": 1.10,  # the same in fp32
    "mfu_fp32": 0.70,  # fraction of the measured fp32 matmul peak
}

IMPLEMENTATIONS = {
    "ours": "mocov3.MoCo on mocov3.VisionTransformer, both views in one backbone pass",
    "timm": "timm's VisionTransformer, one backbone pass per view as in the official MoCo v3 code "
            "(facebookresearch/moco-v3, moco/builder.py)",
    "timm-concat": "timm's VisionTransformer in mocov3.MoCo unchanged, both views in one pass",
    "ours-compiled": "ours, with the whole MoCo module wrapped in torch.compile",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------ the timm step

class TimmBackbone(nn.Module):
    """timm's VisionTransformer set up as MoCo v3's ViT, with the interface mocov3.MoCo uses.

    MoCo needs `dim`, a replaceable `head` and `forward_features(x)` returning the final
    normalised [CLS] token (B, D). timm's forward_features returns every token after the final
    LayerNorm, so the [CLS] token is taken from it, as timm's own 'token' pooling does.
    """

    def __init__(self, image_size, patch_size, dim, depth, heads):
        super().__init__()
        self.vit = TimmVisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=dim, depth=depth,
            num_heads=heads, mlp_ratio=4, qkv_bias=True, class_token=True, global_pool="token",
            num_classes=0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        self.dim = dim
        self.head = nn.Identity()

        # The fixed 2D sin-cos position embedding, with a zero entry for [CLS], taken from
        # mocov3 so that both models add the same numbers.
        grid = image_size // patch_size
        position = mocov3.sincos_position_embedding(grid, grid, dim)
        with torch.no_grad():
            self.vit.pos_embed.copy_(torch.cat([torch.zeros(1, dim), position])[None])
        self.vit.pos_embed.requires_grad_(False)
        self.vit.patch_embed.requires_grad_(False)  # frozen random patch projection

    def forward_features(self, x):
        return self.vit.forward_features(x)[:, 0]  # (B, D)

    def forward(self, x):
        return self.head(self.forward_features(x))


class TwoPassMoCo(mocov3.MoCo):
    """mocov3.MoCo with the official code's forward: each encoder runs once per view.

    Heads, loss and momentum update are mocov3's. Against `mocov3.MoCo` only the backbone, the
    batching of the two views and their order differ (queries before keys, as the official
    code). The loss is the same function of the inputs.
    """

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return (mocov3.contrastive_loss(q1, k2, self.temperature)
                + mocov3.contrastive_loss(q2, k1, self.temperature))


def build_moco(impl, arch, image_size, mlp_dim):
    """Build one of IMPLEMENTATIONS for an mocov3.ARCHS preset at the given image size."""
    preset = mocov3.ARCHS[arch]
    if impl in ("ours", "ours-compiled"):
        backbone = mocov3.create_vit(arch, image_size=image_size)
    else:
        backbone = TimmBackbone(image_size, preset["patch_size"], preset["dim"],
                                preset["depth"], preset["heads"])
    moco_class = TwoPassMoCo if impl == "timm" else mocov3.MoCo
    return moco_class(backbone, dim=OUT_DIM, mlp_dim=mlp_dim, temperature=TEMPERATURE)


def timm_state_dict(ours_state):
    """Map a state dict of mocov3.MoCo on mocov3's ViT onto the names of the timm-based MoCo."""
    mapped = {}
    for key, value in ours_state.items():
        encoder, _, rest = key.partition(".")
        if encoder in ("base_encoder", "momentum_encoder") and not rest.startswith("head."):
            key = f"{encoder}.vit.{rest}"
            if rest == "patch_embed.proj.weight":
                # Linear (D, 3*P*P) to Conv2d (D, 3, P, P): mocov3 orders the inputs as a conv
                patch = int(math.isqrt(value.shape[1] // 3))
                value = value.reshape(value.shape[0], 3, patch, patch)
        mapped[key] = value
    return mapped


def check_parity(arch, image_size, mlp_dim, impls, batch=4):
    """Return the largest relative loss difference of the timm steps from ours, same weights.

    Returns None when `impls` contains no timm implementation.
    """
    torch.manual_seed(0)
    ours = build_moco("ours", arch, image_size, mlp_dim)
    x1 = torch.randn(batch, 3, image_size, image_size)
    x2 = torch.randn(batch, 3, image_size, image_size)
    # a copy, because the forward below updates the momentum encoder in place
    state = timm_state_dict({key: value.clone() for key, value in ours.state_dict().items()})
    with torch.no_grad():
        expected = ours(x1, x2, MOMENTUM).item()
    worst = None
    for impl in impls:
        if impl not in ("timm", "timm-concat"):
            continue
        other = build_moco(impl, arch, image_size, mlp_dim)
        other.load_state_dict(state, strict=True)
        with torch.no_grad():
            loss = other(x1, x2, MOMENTUM).item()
        difference = abs(loss - expected) / abs(expected)
        worst = difference if worst is None else max(worst, difference)
    return worst


# ------------------------------------------------------------------------------------- FLOPs

def vit_forward_flops(arch, image_size):
    """Return (patch projection, linear layers of the blocks, attention) forward FLOPs per image.

    A multiply-add counts as 2 FLOPs. With N patches, T = N + 1 tokens, width D, depth L and
    MLP width 4D, the patch projection is 2 N (3 P^2) D. A block that updates every token has
    linear layers qkv 6 T D^2 + output projection 2 T D^2 + MLP 16 T D^2 = 24 T D^2, and
    attention Q K^T 2 T^2 D + A V 2 T^2 D = 4 T^2 D. The model needs only [CLS] from the last
    block, so that block computes qkv on all T tokens but the rest on one: 6 T D^2 + 18 D^2 of
    linear layers and 4 T D of attention. LayerNorm, GELU, softmax, biases and residual adds are
    elementwise and left out.
    """
    preset = mocov3.ARCHS[arch]
    patch, dim, depth = preset["patch_size"], preset["dim"], preset["depth"]
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    patch_flops = 2 * patches * 3 * patch * patch * dim
    linear = (depth - 1) * 24 * tokens * dim**2 + 6 * tokens * dim**2 + 18 * dim**2
    attention = (depth - 1) * 4 * tokens**2 * dim + 4 * tokens * dim
    return patch_flops, linear, attention


def step_flops(arch, image_size, batch, mlp_dim, out_dim=OUT_DIM, attention=True):
    """Return the model FLOPs of one training step on `batch` image pairs.

    The base encoder, projector and predictor run forward on 2B images and backward at twice
    their forward cost (gradients for activations and for weights). The frozen patch projection
    is the exception: it has no weight gradient and its input, the image, needs none, so its
    backward costs nothing. The momentum encoder and its projector run forward only, under
    no_grad. The two InfoNCE losses cost 2 B^2 C each for the logits q k^T and the same again
    backward, where only q needs a gradient. The AdamW step, the momentum update and BatchNorm
    are elementwise and left out, so MFU counts only the matrix work that the model needs. The
    timm-based step does more: its last block updates every token, which MFU does not count.
    attention=False leaves out Q K^T and A V, to compare with counters that skip them.
    """
    patch_flops, linear_flops, attention_flops = vit_forward_flops(arch, image_size)
    blocks = linear_flops + (attention_flops if attention else 0)
    width = mocov3.ARCHS[arch]["dim"]
    projector = 2 * (width * mlp_dim + mlp_dim * mlp_dim + mlp_dim * out_dim)
    predictor = 2 * (out_dim * mlp_dim + mlp_dim * out_dim)
    images = 2 * batch

    base_forward = images * (patch_flops + blocks + projector + predictor)
    base_backward = 2 * images * (blocks + projector + predictor)
    momentum_forward = images * (patch_flops + blocks + projector)
    loss = 2 * (2 * batch * batch * out_dim) * 2
    return base_forward + base_backward + momentum_forward + loss


def check_flop_formula(arch, image_size, mlp_dim, batch=2):
    """Return the relative difference of step_flops from torch's FLOP counter on ours' step.

    torch.utils.flop_counter counts matrix multiplies and convolutions as they run, backward
    included. On CPU it has no formula for the fused attention kernel, so attention is left out
    of both sides of the comparison.
    """
    torch.manual_seed(0)
    moco = build_moco("ours", arch, image_size, mlp_dim)
    x1 = torch.randn(batch, 3, image_size, image_size)
    x2 = torch.randn(batch, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        moco(x1, x2, MOMENTUM).backward()
    counted = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                  if "scaled_dot_product" not in str(op))
    expected = step_flops(arch, image_size, batch, mlp_dim, attention=False)
    return abs(expected - counted) / counted


# ----------------------------------------------------------------------------- measurements

@dataclasses.dataclass
class Config:
    """One step configuration: what to build, on what, and how many steps to time."""

    arch: str
    impl: str
    dtype: str
    batch: int
    image_size: int
    mlp_dim: int
    device: str
    steps: int
    threads: int  # torch threads, 0 for torch's default


# The first steps of every implementation are untimed: they warm up oneDNN or cuBLAS, and the
# second one is the first to hold the previous step's gradients and the AdamW state at once.
UNTIMED_STEPS = 2


def set_threads(count):
    """Set torch's thread count for this process; 0 keeps torch's default."""
    if count:
        torch.set_num_threads(count)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(moco, optimizer, x1, x2, dtype, device):
    """Run one step as mocov3.train_one_epoch does: loss under autocast, zero_grad, backward, AdamW.

    zero_grad comes after the forward there too, so the forward runs while the previous step's
    gradients are still alive.
    """
    with torch.profiler.record_function("forward"):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = moco(x1, x2, MOMENTUM)
    optimizer.zero_grad(set_to_none=True)
    with torch.profiler.record_function("backward"):
        loss.backward()
    with torch.profiler.record_function("optimizer"):
        optimizer.step()
    return loss


def prepare_step(config):
    """Build the model, optimizer and fixed random inputs of a configuration on its device."""
    device = torch.device(config.device)
    torch.manual_seed(0)
    shape = (config.batch, 3, config.image_size, config.image_size)
    x1, x2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
    moco = build_moco(config.impl, config.arch, config.image_size, config.mlp_dim).to(device)
    trainable = [p for p in moco.parameters() if p.requires_grad]
    # fused, as mocov3.train builds it, for every implementation
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                                  fused=True)
    if config.impl == "ours-compiled":
        moco = torch.compile(moco)
    return moco, optimizer, x1, x2


def peak_cpu_tensor_bytes(function):
    """Call function() under torch.profiler and return (its result, peak live CPU tensor bytes).

    The peak counts every tensor that PyTorch's CPU allocator handed out during the call and had
    not yet freed, above what was live when the call began, so it has the meaning of
    torch.cuda.max_memory_allocated. Memory that oneDNN or the C allocator keep on their own is
    not in it.
    NOTE: the running totals come from the profiler's private event tree
    (kineto_results.experimental_event_tree), read here on torch 2.14. A later torch may move it.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        result = function()
    allocations = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            fields = event.typed[1]
            allocations.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
    if not allocations:
        raise RuntimeError("torch.profiler recorded no CPU allocations, so the peak memory cannot "
                           "be measured with this torch version; run with --device cuda or "
                           "update peak_cpu_tensor_bytes")
    allocations.sort()
    _, first_total, first_size = allocations[0]
    baseline = first_total - first_size  # live bytes the allocator counted before the call
    return result, max(total for _, total, _ in allocations) - baseline


def measure_group(configs):
    """Measure configurations that differ only in implementation, in one fresh process.

    Each implementation is built and run for UNTIMED_STEPS steps, which also measure its peak
    memory: everything allocated from building the model to the end of those steps, that is
    weights, momentum encoder, gradients, AdamW state, inputs and activations. Then the timed
    steps go round robin over the implementations, in an order that rotates every round, so
    that a change in load from other processes on the machine hits all of them alike. Each
    round also times one matrix multiply for the matmul peak, so that the peak is measured under
    the same load as the steps. Returns ({impl: measurements}, best matmul FLOP/s).
    Besides wall-clock time, each step's CPU time (all threads of this process) is recorded: it
    leaves out the time other processes hold the cores, so it is steadier on a busy machine.
    """
    device = torch.device(configs[0].device)
    set_threads(configs[0].threads)
    prepared, results = {}, {}
    for config in configs:
        dtype = DTYPES[config.dtype]

        def build_and_warm_up(config=config, dtype=dtype):
            moco, optimizer, x1, x2 = prepare_step(config)
            for _ in range(UNTIMED_STEPS):
                train_step(moco, optimizer, x1, x2, dtype, device)
            return moco, optimizer, x1, x2

        # NOTE: the CUDA branches of this script have not yet run on a GPU.
        if device.type == "cuda":
            synchronize(device)
            baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            prepared[config.impl] = build_and_warm_up()
            peak = torch.cuda.max_memory_allocated(device) - baseline
        else:
            prepared[config.impl], peak = peak_cpu_tensor_bytes(build_and_warm_up)
        results[config.impl] = dict(seconds=[], cpu_seconds=[], peak_bytes=peak,
                                    threads=torch.get_num_threads())

    peak_flops = 0.0
    for round_index in range(configs[0].steps):
        peak_flops = max(peak_flops, measure_matmul_peak(configs[0].dtype, str(device), repeats=1))
        shift = round_index % len(configs)
        for config in configs[shift:] + configs[:shift]:
            moco, optimizer, x1, x2 = prepared[config.impl]
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = train_step(moco, optimizer, x1, x2, DTYPES[config.dtype], device)
            synchronize(device)
            results[config.impl]["seconds"].append(time.perf_counter() - start)
            results[config.impl]["cpu_seconds"].append(time.process_time() - cpu_start)
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"{config}: the loss is {loss.item()}, so the step is broken")
    return results, peak_flops


def measure_matmul_peak(dtype_name, device_name, size=4096, repeats=5):
    """Return the best FLOP/s of a size x size matrix multiply over `repeats` timed runs."""
    device = torch.device(device_name)
    dtype = DTYPES[dtype_name]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    inner = 1 if device.type == "cpu" else 20  # a GPU multiply is too short to time alone
    a @ b  # warm-up: oneDNN and cuBLAS pick their kernels on the first call
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2 * size**3 / best


def time_phases(moco, optimizer, x1, x2, dtype, device):
    """Run one step and return {phase: (wall seconds, CPU seconds)} for its three phases."""
    clocks = [(time.perf_counter(), time.process_time())]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = moco(x1, x2, MOMENTUM)
    clocks.append((time.perf_counter(), time.process_time()))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clocks.append((time.perf_counter(), time.process_time()))
    optimizer.step()
    clocks.append((time.perf_counter(), time.process_time()))
    names = ("forward with momentum update and keys", "backward", "AdamW step")
    return {name: (end[0] - begin[0], end[1] - begin[1])
            for name, begin, end in zip(names, clocks, clocks[1:])}


def profile_step(config, top=10):
    """Time the phases of one step, then profile the next; return both, in milliseconds.

    Runs in its own process, after one untimed step. The phases are timed without the profiler,
    whose per-op overhead would inflate phases of many small ops such as the AdamW step. The op
    table gives means over `config.steps` profiled steps.
    """
    device = torch.device(config.device)
    dtype = DTYPES[config.dtype]
    set_threads(config.threads)
    moco, optimizer, x1, x2 = prepare_step(config)
    train_step(moco, optimizer, x1, x2, dtype, device)
    phases = time_phases(moco, optimizer, x1, x2, dtype, device)

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(config.steps):
            train_step(moco, optimizer, x1, x2, dtype, device)
    ops = [e for e in profiler.key_averages()
           if e.key not in ("forward", "backward", "optimizer")]
    total_self = sum(e.self_cpu_time_total for e in ops)
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [dict(name=e.key, self_ms=e.self_cpu_time_total / 1e3 / config.steps,
                 share=e.self_cpu_time_total / total_self, calls=e.count // config.steps)
            for e in ops[:top]]
    return dict(phases=phases, total_ms=total_self / 1e3 / config.steps, rows=rows)


def time_adamw_variants(arch, mlp_dim, threads, repeats=7):
    """Return the median CPU seconds of AdamW.step per variant, and of the momentum update.

    mocov3.py builds AdamW with fused=True. Without it, CPUs take the per-tensor ("for-loop")
    implementation by default; foreach and fused are the two batched ones. The variants take
    turns, so that a change in load hits all of them alike.
    """
    set_threads(threads)
    moco = build_moco("ours", arch, CPU_CONFIGS[arch]["image_size"], mlp_dim)
    trainable = [p for p in moco.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p) * 1e-3
    variants = {}
    for name, options in (("default", {}), ("foreach", dict(foreach=True)),
                          ("fused", dict(fused=True))):
        variants[name] = torch.optim.AdamW(trainable, lr=LEARNING_RATE,
                                           weight_decay=WEIGHT_DECAY, **options)
        variants[name].step()  # creates the moment buffers

    seconds = {name: [] for name in variants}
    seconds["momentum update"] = []
    for _ in range(repeats):
        for name, optimizer in variants.items():
            start = time.process_time()
            optimizer.step()
            seconds[name].append(time.process_time() - start)
        start = time.process_time()
        moco.update_momentum_encoder(MOMENTUM)
        seconds["momentum update"].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


# ------------------------------------------------------------------------------ data loading

class JpegImages(torch.utils.data.Dataset):
    """JPEG files held as bytes; item i is (decoded RGB PIL image, class index)."""

    def __init__(self, blobs, labels):
        self.blobs, self.labels = blobs, labels

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, index):
        from PIL import Image
        image = Image.open(io.BytesIO(self.blobs[index])).convert("RGB")
        return image, self.labels[index]


def read_jpeg_archive(path, count):
    """Read the first `count` train/<class>/*.jpg members of a .tar.gz into a JpegImages."""
    blobs, labels, classes = [], [], {}
    with tarfile.open(path, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[0] == "train"
                    and parts[2].endswith(".jpg")):
                continue
            blobs.append(archive.extractfile(member).read())
            labels.append(classes.setdefault(parts[1], len(classes)))
            if len(blobs) == count:
                break
    return JpegImages(blobs, labels)


def measure_loader(dataset, normalization, image_size, seconds):
    """Return TwoViews pairs per second in this process, with one thread as a DataLoader worker.

    Images are visited in a fixed shuffled order for at least `seconds` (and at least 20 pairs).
    """
    torch.set_num_threads(1)  # what torch.utils.data sets in each worker process
    view1, view2 = mocov3.pretrain_transforms(image_size, 0.2, mocov3.NORMALIZATION[normalization])
    two_views = mocov3.TwoViews(dataset, view1, view2, seed=0)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    two_views[order[0]]  # warm-up
    pairs = 0
    start = time.perf_counter()
    while pairs < 20 or time.perf_counter() - start < seconds:
        two_views[order[(pairs + 1) % len(order)]]
        pairs += 1
    return pairs / (time.perf_counter() - start)


def measure_data(image_sizes, data_root, jpeg_archive, seconds):
    """Return {(dataset, image size): pairs/s}, or a reason string for a dataset that is absent."""
    results = {}
    fashion = mocov3.load_fashion_mnist(Path(data_root))["train"]
    sources = [("Fashion-MNIST", fashion, "fashion-mnist")]
    if jpeg_archive.is_file():
        sources.append(("CIFAR-10 JPEG copy", read_jpeg_archive(jpeg_archive, 2000), "cifar10"))
    else:
        results["CIFAR-10 JPEG copy"] = f"skipped: {jpeg_archive} not found"
    for name, dataset, normalization in sources:
        for size in image_sizes:
            results[(name, size)] = measure_loader(dataset, normalization, size, seconds)
    return results


# ----------------------------------------------------------------------------- orchestration

def run_in_fresh_process(function, *args):
    """Call function(*args) in a new Python process and return its result."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def plan_configs(args, device):
    """Return the step configurations that the command line selects."""
    configs = []
    for arch in args.archs:
        if device.type == "cuda":
            if arch != "vit_small":
                continue  # the CPU preset is too small to say anything about a GPU
            image_size, batch, mlp_dim = 224, CUDA_BATCH, 4096
        else:
            base = CPU_CONFIGS[arch]
            image_size, batch, mlp_dim = base["image_size"], base["batch"], base["mlp_dim"]
        if args.quick:
            batch = max(2, batch // 4)
        batch = args.batch_size or batch
        for dtype in args.dtypes:
            for impl in args.impls:
                configs.append(Config(arch, impl, dtype, batch, image_size, mlp_dim, str(device),
                                      args.steps, args.threads))
    return configs


def summarise(config, measured, peaks):
    """Turn one configuration's raw measurement into a table row."""
    median = statistics.median(measured["seconds"])
    fastest = min(measured["seconds"])
    flops = step_flops(config.arch, config.image_size, config.batch, config.mlp_dim)
    peak = peaks[config.dtype]
    cpu_seconds = statistics.median(measured["cpu_seconds"])
    return dict(config=config, median_s=median, min_s=fastest, max_s=max(measured["seconds"]),
                cpu_s=cpu_seconds, pairs_per_cpu_s=config.batch / cpu_seconds,
                pairs_per_s=config.batch / median, max_pairs_per_s=config.batch / fastest,
                flops=flops, flops_per_s=flops / median,
                mfu=flops / median / peak, max_mfu=flops / fastest / peak,
                cpu_mfu=flops / (cpu_seconds / measured["threads"]) / peak,
                peak_bytes=measured["peak_bytes"], threads=measured["threads"])


def ratio(rows, arch, dtype, key, numerator="ours", denominator="timm"):
    """Return rows[numerator][key] / rows[denominator][key] for one arch and dtype, or None."""
    values = {}
    for row in rows:
        c = row["config"]
        if c.arch == arch and c.dtype == dtype:
            values[c.impl] = row[key]
    if numerator in values and denominator in values:
        return values[numerator] / values[denominator]
    return None


# ---------------------------------------------------------------------------------- the page

def machine_description():
    """Return a one-line description of the CPU, cores and memory of this machine."""
    model = platform.processor() or "unknown CPU"
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    with open("/proc/meminfo") as f:
        memory_gib = int(f.readline().split()[1]) / 2**20
    notable = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return (f"{model}, {os.cpu_count()} logical cores visible to this process, "
            f"{memory_gib:.0f} GiB RAM; CPU flags {', '.join(notable) or 'none of note'}")


def mocov3_revision():
    """Return the git commit of mocov3.py and whether the file differs from it, or 'unknown'."""
    digest = hashlib.sha256((REPO / "mocov3.py").read_bytes()).hexdigest()[:12]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "mocov3.py"],
                                 cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return f"unknown commit, file sha256 {digest}"
    state = "with uncommitted changes" if changed else "unchanged"
    return f"commit {commit} ({state}), file sha256 {digest}"


def format_ratio(value):
    return "not checked" if value is None else f"{value:.1e}"


def format_bytes(n):
    return f"{n / 2**20:,.0f} MiB"


def step_table(rows, cpu_time):
    """Return the step measurements as Markdown; cpu_time adds the CPU-time columns."""
    header = ["preset", "px", "batch", "impl", "dtype", "step ms (min-max)", "pairs/s",
              "ours/this", "peak memory", "GFLOP/step", "GFLOP/s", "MFU"]
    if cpu_time:
        header += ["CPU s/step", "ours/this (CPU time)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        c = row["config"]
        cells = [c.arch, c.image_size, c.batch, c.impl, c.dtype,
                 f"{row['median_s'] * 1e3:,.0f} ({row['min_s'] * 1e3:,.0f}-"
                 f"{row['max_s'] * 1e3:,.0f})",
                 f"{row['pairs_per_s']:,.1f}",
                 format_speedup(ratio(rows, c.arch, c.dtype, "pairs_per_s", "ours", c.impl)),
                 format_bytes(row["peak_bytes"]), f"{row['flops'] / 1e9:,.0f}",
                 f"{row['flops_per_s'] / 1e9:,.1f}", f"{100 * row['mfu']:.0f}%"]
        if cpu_time:
            cells += [f"{row['cpu_s']:,.2f}", format_speedup(
                ratio(rows, c.arch, c.dtype, "pairs_per_cpu_s", "ours", c.impl))]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def format_speedup(value):
    return "" if value is None else f"{value:.2f}"


def target_table(rows, cpu_time):
    """Return the targets for vit_small as Markdown, judged on the median step time.

    The columns for the fastest step and for CPU time show how much of a miss or a pass load
    from other processes could explain.
    """
    def ours_fp32(key):
        for row in rows:
            c = row["config"]
            if (c.arch, c.impl, c.dtype) == ("vit_small", "ours", "fp32"):
                return 100 * row[key]
        return None

    checks = []
    for dtype in ("bf16", "fp32"):
        goal = TARGETS[f"speedup_{dtype}"]
        values = [ratio(rows, "vit_small", dtype, key)
                  for key in ("pairs_per_s", "max_pairs_per_s", "pairs_per_cpu_s")]
        checks.append((f"{dtype}: ours/timm pairs per second", f">= {goal:.2f}", "{:.2f}",
                       lambda value, goal=goal: value >= goal, values))
    for dtype in ("bf16", "fp32"):
        peak = ratio(rows, "vit_small", dtype, "peak_bytes")
        checks.append((f"{dtype}: ours/timm peak memory", "<= 1.000", "{:.3f}",
                       lambda value: value <= 1.0, [peak, peak, peak]))
    goal = 100 * TARGETS["mfu_fp32"]
    values = [ours_fp32(key) for key in ("mfu", "max_mfu", "cpu_mfu")]
    checks.append(("fp32: MFU of ours", f">= {goal:.0f}%", "{:.0f}%",
                   lambda value, goal=goal: value >= goal, values))

    header = ["target", "goal", "median step", "fastest step"]
    header += ["median CPU time"] if cpu_time else []
    header += ["met (median step)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, goal_text, fmt, met, values in checks:
        if not cpu_time:
            values = values[:2]
        if values[0] is None:
            lines.append(f"| {name} | {goal_text} | not run |" + " |" * (len(header) - 3))
            continue
        verdict = "yes" if met(values[0]) else "**no**"
        formatted = " | ".join(fmt.format(value) for value in values)
        lines.append(f"| {name} | {goal_text} | {formatted} | {verdict} |")
    return "\n".join(lines)


def data_table(data, rows):
    """Return loader pairs/s per worker beside the fastest step at the same image size."""
    fastest = {}
    for row in rows:
        size = row["config"].image_size
        fastest[size] = max(fastest.get(size, 0.0), row["pairs_per_s"])
    lines = ["| data | px | pairs/s per worker | fastest step pairs/s | workers to keep up |",
             "|---|---|---|---|---|"]
    notes = []
    for key, value in data.items():
        if isinstance(value, str):
            notes.append(f"{key}: {value}.")
            continue
        name, size = key
        step = fastest.get(size)
        needed = f"{math.ceil(step / value)}" if step else ""
        step_text = f"{step:,.1f}" if step else ""
        lines.append(f"| {name} | {size} | {value:,.1f} | {step_text} | {needed} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def profile_section(profile, adamw):
    phases = ", ".join(f"{name} {wall * 1e3:,.0f} ms ({cpu * 1e3:,.0f} ms CPU)"
                       for name, (wall, cpu) in profile["phases"].items())
    lines = [f"One step without the profiler: {phases}.", "",
             "| op | self CPU ms per step | share | calls per step |", "|---|---|---|---|"]
    for row in profile["rows"]:
        lines.append(f"| `{row['name']}` | {row['self_ms']:,.1f} | {100 * row['share']:.1f}% "
                     f"| {row['calls']} |")
    lines.append(f"| all ops | {profile['total_ms']:,.1f} | 100% | |")
    if adamw:
        timings = ", ".join(f"{name} {seconds * 1e3:,.0f} ms" for name, seconds in adamw.items()
                            if name != "momentum update")
        lines += ["", "Median CPU time of 7 calls over the same trainable parameters, outside the "
                      f"step: AdamW.step {timings} (mocov3.py uses fused); "
                      f"`update_momentum_encoder` {adamw['momentum update'] * 1e3:,.0f} ms."]
    return "\n".join(lines)


def method_section(device, peaks):
    if device.type == "cuda":
        memory = ("torch.cuda.max_memory_allocated from building the model to the end of its "
                  "untimed steps, minus what was allocated before")
    else:
        memory = ("The peak of live CPU tensor bytes from building the model to the end of its "
                  "untimed steps, above what was live before, read from torch.profiler's "
                  "allocation records (`profile_memory=True`). It has the meaning of "
                  "torch.cuda.max_memory_allocated: weights, momentum encoder, gradients, AdamW "
                  "state, inputs and activations. It leaves out what the C allocator keeps after "
                  "frees, oneDNN's own buffers and Python objects, so the process's resident set "
                  "is larger")
    implementations = "\n".join(f"  - `{name}`: {text}" for name, text in IMPLEMENTATIONS.items())
    peak_text = ", ".join(f"{dtype} {flops / 1e9:,.0f} GFLOP/s" for dtype, flops in peaks.items())
    return f"""\
- **Step.** `loss = moco(x1, x2, m)` (under `torch.autocast` for bf16), then
  `zero_grad(set_to_none=True)`, `loss.backward()` and fused `AdamW.step()`, lr
  {LEARNING_RATE} and weight decay {WEIGHT_DECAY}; m = {MOMENTUM}; fixed random inputs, so data
  loading is not in the step. Projector and predictor are `mocov3.build_mlp` with output width
  {OUT_DIM}, the loss is `mocov3.contrastive_loss` at T = {TEMPERATURE}, and the momentum update
  is `mocov3.MoCo.update_momentum_encoder` (one `torch._foreach_lerp_`) in every implementation.
  The official code updates the momentum encoder in a Python loop over parameters, a cost that
  this comparison leaves out.
- **Implementations.**
{implementations}

  The timm model is `timm.models.vision_transformer.VisionTransformer` with qkv bias, LayerNorm
  eps 1e-6, the [CLS] token, mocov3's fixed sin-cos position embedding copied into `pos_embed`,
  and both `pos_embed` and the patch projection frozen. Before timing, the run loads the weights
  of ours into the timm models and checks that the loss agrees (the parity line above).
- **Time.** The first {UNTIMED_STEPS} steps of each implementation are untimed. The timed steps
  then go round robin over the implementations of one preset and dtype in one process, in an
  order that rotates every round, so that load from other processes hits all of them alike. The
  table gives the median wall-clock time (`time.perf_counter`, with `torch.cuda.synchronize` on
  a GPU) and the min-max spread. "ours/this" is ours' pairs/s over that row's. On CPU it also
  gives the median CPU time of a step (`time.process_time`, all threads of the process). CPU
  time leaves out the time that other processes hold the cores, so on a busy machine it is the
  steadier basis for comparing implementations. It still counts OpenMP threads spinning while
  they wait for each other, and the slowdown from sharing caches and memory bandwidth. The
  CPU-time MFU in the targets assumes that the threads' CPU time would overlap fully on free
  cores, so it is an estimate.
- **Memory.** {memory}.
- **FLOPs.** Per image, the ViT forward is the patch projection 2 N (3 P^2) D plus, per block,
  24 T D^2 + 4 T^2 D (qkv, Q K^T, A V, output projection, MLP), with N patches, T = N + 1 tokens
  and width D. The projector adds 2 (D H + H H + H C) and the predictor 2 (C H + H C), with MLP
  width H and output width C. A step runs the base encoder, projector and predictor forward on
  2B images and backward at twice that, except the frozen patch projection, which needs no
  backward. The momentum encoder and its projector run forward only, under no_grad. The logits
  of the two losses add 8 B^2 C. Elementwise work (norms, activations, softmax, AdamW, the
  momentum update) is left out.
- **MFU.** Model FLOP/s over the peak FLOP/s of a 4096 x 4096 matrix multiply in the same dtype
  and thread count. The peak is the best of 5 multiplies before the steps, 5 after them and one
  in every round of timed steps, which in this run gave {peak_text}. Other processes slow the
  multiply too, so on a busy machine the peak can come out low and MFU high.
- **Data loading.** `mocov3.TwoViews` with `mocov3.pretrain_transforms` (crop scale from 0.2)
  in one process with one thread, as in a DataLoader worker: decode, two augmented views,
  normalised tensors. Collation and the transfer between processes are not included. The JPEG
  rows read the first 2000 training images of a CIFAR-10 JPEG archive (a lossy copy of
  CIFAR-10) into memory and decode one on every access.
"""


def load_average():
    """Return the 1-minute load average, the number of runnable threads averaged by the kernel."""
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def render_page(args, device, rows, peaks, data, profiles, adamw, checks, run_info):
    """Return the whole results page as Markdown."""
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}; host: {machine_description()}"
    else:
        machine = machine_description()
    threads = ", ".join(sorted({str(row["threads"]) for row in rows}))
    parity_text = "; ".join(f"{arch} {format_ratio(c['parity'])}" for arch, c in checks.items())
    flops_text = "; ".join(f"{arch} {c['flops']:.1e}" for arch, c in checks.items())
    loads = run_info["load_averages"]
    contention = ""
    if max(loads) > os.cpu_count():
        contention = (f". It exceeded the {os.cpu_count()} cores, so other processes competed "
                      "with this run for them.")

    sections = [
        "# Benchmarks: mocov3.py's training step against the same step on timm's ViT", "",
        "Written by `benchmarks/benchmark.py`; rerun it to refresh this page. Timings on a shared "
        "machine are noisy, so compare rows of one run, not numbers across runs.", "",
        f"- Command: `{command}`",
        f"- Date: {when}; the run took {run_info['seconds'] / 60:.1f} minutes",
        f"- Machine: {machine}; torch threads: {threads}",
        f"- Load average (1 minute) at the start, middle and end of the run: "
        f"{', '.join(f'{x:.1f}' for x in loads)}{contention}",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, timm {timm.__version__}",
        f"- mocov3.py: {mocov3_revision()}",
        f"- Steps: {UNTIMED_STEPS} untimed, then {args.steps} timed, per configuration",
        f"- Parity: relative loss difference of the timm steps from ours with the same weights "
        f"(fp32, 4 pairs): {parity_text}",
        f"- FLOP formula against `torch.utils.flop_counter` on ours' step without attention "
        f"(relative difference): {flops_text}",
        "",
    ]
    if device.type != "cuda":
        sections += ["NOTE: GPU figures are still missing. This run had no CUDA device; on one, "
                     "the script runs vit_small at 224 px in bf16 with `--batch-size` pairs "
                     f"(default {CUDA_BATCH}).", ""]
    cpu_time = device.type == "cpu"
    sections += ["## Training step", "", step_table(rows, cpu_time), "",
                 "## Targets for mocov3.py (vit_small, 224 px)", "",
                 target_table(rows, cpu_time), ""]
    if data:
        sections += ["## Data loading", "", data_table(data, rows), ""]
    for i, profile in enumerate(profiles):
        c = profile["config"]
        sections += [f"## Where the time goes: ours, {c.arch}, {c.image_size} px, batch "
                     f"{c.batch}, {c.dtype}", "",
                     f"Phase times of one step, then torch.profiler over {c.steps} step(s): the "
                     "top ops by self CPU time. The profiler adds overhead to every op, so its "
                     "totals are higher than the phase times.", "",
                     profile_section(profile, adamw if i == 0 else None), ""]
    sections += ["## Method", "", method_section(device, peaks)]
    return "\n".join(sections)


# ---------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark mocov3.py's MoCo v3 training step against the same step on timm's "
                    "ViT: throughput, peak memory, FLOPs and MFU, data loading, and a profile.")
    add = parser.add_argument

    # what to run
    add("--archs", nargs="+", default=list(CPU_CONFIGS), choices=list(CPU_CONFIGS),
        help="ViT presets to run (default: %(default)s; on CUDA only vit_small runs)")
    add("--impls", nargs="+", default=["ours", "timm"], choices=list(IMPLEMENTATIONS),
        help="implementations to run (default: %(default)s). " + ". ".join(
            f"{name} is {text}" for name, text in IMPLEMENTATIONS.items()))
    add("--dtypes", nargs="+", choices=list(DTYPES),
        help="precisions: fp32, and bf16 autocast (default: fp32 bf16 on CPU, bf16 on CUDA)")
    add("--batch-size", type=int,
        help=f"image pairs per step for every preset (default: vit_small 8 and vit_nano_cpu 256 "
             f"on CPU, {CUDA_BATCH} on CUDA)")
    add("--steps", type=int, default=3,
        help=f"timed steps per configuration, after {UNTIMED_STEPS} untimed ones "
             "(default: %(default)s)")

    add("--quick", action="store_true",
        help="a smoke test: a quarter of the default batch, 1 timed step per configuration, "
             "1 s of data loading per case, no profile")
    add("--device", help="cpu or cuda (default: cuda if available)")
    add("--threads", type=int, default=0,
        help="torch threads for the steps, the matmul peak and the profile, 0 to keep torch's "
             "default. On a machine shared with other processes, 1 thread avoids "
             "OpenMP threads waiting for a preempted partner, so CPU times are steadier")

    # extras and output
    add("--no-profile", action="store_true", help="skip the torch.profiler summary")
    add("--no-data", action="store_true", help="skip the data-loading measurement")
    add("--data-root", default="data",
        help="folder searched for Fashion-MNIST, as mocov3.py's --data-root (default: %(default)s)")
    add("--jpeg-archive", type=Path, default=DEFAULT_JPEG_ARCHIVE,
        help="CIFAR-10 JPEG archive, a .tar.gz with train/<class>/*.jpg, skipped if missing "
             "(default: %(default)s)")
    add("--data-seconds", type=float, default=3.0,
        help="seconds of data loading per dataset and image size (default: %(default)s)")
    add("--output", type=Path, default=DEFAULT_OUTPUT,
        help="Markdown page to write (default: %(default)s)")
    add("--no-write", action="store_true", help="print the page without writing --output")
    args = parser.parse_args(argv)

    if args.quick:
        args.steps, args.data_seconds, args.no_profile = 1, 1.0, True
    if args.batch_size is not None and args.batch_size < 2:
        parser.error(f"--batch-size {args.batch_size} must be at least 2 (BatchNorm needs it)")
    if args.steps < 1:
        parser.error(f"--steps {args.steps} must be at least 1")
    if args.threads < 0:
        parser.error(f"--threads {args.threads} must be 0 (torch's default) or more")
    if args.data_seconds <= 0:
        parser.error(f"--data-seconds {args.data_seconds} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    load_averages = [load_average()]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda given, but torch.cuda.is_available() is False")
    if args.dtypes is None:
        args.dtypes = ["bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    configs = plan_configs(args, device)
    if not configs:
        sys.exit("error: no configuration selected, because on CUDA only vit_small runs; "
                 "pass --archs vit_small")

    # checks first: a timm model that computed something else would make every ratio moot
    checks = {}
    for arch in dict.fromkeys(c.arch for c in configs):
        first = next(c for c in configs if c.arch == arch)
        parity = check_parity(arch, first.image_size, first.mlp_dim, args.impls)
        flops = check_flop_formula(arch, first.image_size, first.mlp_dim)
        checks[arch] = dict(parity=parity, flops=flops)
        print(f"{arch}: loss of the timm steps differs from ours by {format_ratio(parity)} "
              f"(relative); FLOP formula differs from torch's counter by {flops:.1e}", flush=True)

    # the matmul peak before, during (measure_group) and after the steps, so that a busy
    # neighbour during one measurement does not inflate MFU
    dtypes = list(dict.fromkeys(c.dtype for c in configs))
    set_threads(args.threads)
    peaks = {dtype: measure_matmul_peak(dtype, str(device)) for dtype in dtypes}
    measured = {}
    groups = {}
    for config in configs:
        groups.setdefault((config.arch, config.dtype), []).append(config)
    for group in groups.values():
        results, group_peak = run_in_fresh_process(measure_group, group)
        peaks[group[0].dtype] = max(peaks[group[0].dtype], group_peak)
        for config in group:
            measured[config.impl, config.arch, config.dtype] = results[config.impl]
            row = summarise(config, results[config.impl], peaks)
            print(f"{config.arch} {config.impl} {config.dtype} batch {config.batch}: "
                  f"{row['median_s'] * 1e3:,.0f} ms/step, {row['pairs_per_s']:,.1f} pairs/s, "
                  f"peak {format_bytes(row['peak_bytes'])}", flush=True)
    for dtype in dtypes:
        peaks[dtype] = max(peaks[dtype], measure_matmul_peak(dtype, str(device)))
    rows = [summarise(c, measured[c.impl, c.arch, c.dtype], peaks) for c in configs]
    load_averages.append(load_average())

    data = None
    if not args.no_data:
        sizes = list(dict.fromkeys(c.image_size for c in configs))
        data = run_in_fresh_process(measure_data, sizes, args.data_root, args.jpeg_archive,
                                    args.data_seconds)
        print("data loading done", flush=True)

    profiles, adamw = [], None
    if not args.no_profile and device.type == "cpu":
        # ours in every precision of the run, on the first preset (vit_small by default)
        for dtype in dtypes:
            profiled = dataclasses.replace(configs[0], impl="ours", dtype=dtype, steps=1)
            profiles.append(run_in_fresh_process(profile_step, profiled) | dict(config=profiled))
        adamw = run_in_fresh_process(time_adamw_variants, profiled.arch, profiled.mlp_dim,
                                     args.threads)

    load_averages.append(load_average())
    run_info = dict(seconds=time.perf_counter() - started, load_averages=load_averages)
    page = render_page(args, device, rows, peaks, data, profiles, adamw, checks, run_info)
    print(page)
    if not args.no_write:
        args.output.write_text(page)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
