"""One MoCo v3 training step in several gloo processes on the CPU.

notebooks/05_many_gpus.ipynb starts the processes. The worker lives in this module, not in the
notebook, because torch.multiprocessing.spawn starts fresh interpreters that import the worker
by module name, and a function defined in a notebook cell has no module that a fresh
interpreter could import.
"""

import copy
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# mocov3.py sits in the repository root, one folder above this file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mocov3  # noqa: E402


def build_small_moco():
    """Build a small MoCo for 28 x 28 images: a 4 x 4 grid of 7 x 7 patches, in float64.

    In float64, sums taken in another order across processes differ only by rounding (about
    1e-16 relative). That is far below any difference in the math, so a wrong result cannot
    hide behind rounding.
    """
    torch.manual_seed(0)
    vit = mocov3.VisionTransformer(image_size=28, patch_size=7, dim=16, depth=2, heads=2)
    return mocov3.MoCo(vit, dim=8, mlp_dim=32, temperature=0.2).double()


def find_free_port():
    """Return a TCP port on 127.0.0.1 that was free a moment ago, for the process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalBatchNorm1d(nn.BatchNorm1d):
    """torch.nn.BatchNorm1d that, like mocov3.BatchNorm1d, also takes views (V, B, C) and
    normalises each on its own, as mocov3.MoCo's heads need."""

    def forward(self, x):
        if x.dim() == 3:
            return torch.stack([self.forward(view) for view in x])  # (V, B, C)
        return super().forward(x)


def with_local_batchnorm(moco):
    """Return a copy of moco whose BatchNorm layers use only this process's batch.

    Every mocov3.BatchNorm1d becomes a LocalBatchNorm1d with the same weights and buffers.
    That is how plain BatchNorm layers behave under DistributedDataParallel.
    """
    local = copy.deepcopy(moco)
    for parent in list(local.modules()):
        for name, child in parent.named_children():
            if isinstance(child, mocov3.BatchNorm1d):
                plain = LocalBatchNorm1d(child.num_features, eps=child.eps,
                                         momentum=child.momentum, affine=child.affine,
                                         track_running_stats=child.track_running_stats,
                                         dtype=child.running_mean.dtype)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return local


def try_sync_batchnorm():
    """Run PyTorch's SyncBatchNorm on a CPU tensor and return its error message, or None."""
    sync = nn.SyncBatchNorm(4)
    try:
        sync(torch.randn(2, 4))
    except ValueError as error:
        return str(error)
    return None


def train_step_worker(rank, world, port, folder):
    """Run one MoCo v3 step on this process's share of the batch saved in folder/setup.pt.

    Writes folder/rank{rank}.pt with this process's loss, the loss averaged over processes,
    the queries q1, q2 of its own images, the keys k1, k2 gathered from every process, the
    gradients after DistributedDataParallel has averaged them, and the loss that per-process
    BatchNorm statistics would give.
    """
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        setup = torch.load(Path(folder) / "setup.pt")
        x1, x2, m = setup["x1"], setup["x2"], setup["m"]
        share = x1.shape[0] // world
        # Process r takes rows N*r .. N*r + N - 1, so the global batch is the processes' images
        # in rank order, the order in which gather_keys concatenates the keys.
        rows = slice(rank * share, (rank + 1) * share)
        x1, x2 = x1[rows], x2[rows]

        moco = build_small_moco()
        moco.load_state_dict(setup["state"])
        local = with_local_batchnorm(moco)  # copied before the step changes anything

        # The training step, as in mocov3.train_one_epoch: DDP averages the gradients.
        model = nn.parallel.DistributedDataParallel(moco)
        loss = model(x1, x2, m)
        loss.backward()
        gradients = {name: p.grad for name, p in moco.named_parameters() if p.grad is not None}

        # The same queries and keys again, to look at. The forward above has already applied
        # the momentum update, so f_k is the one that made the loss's keys.
        with torch.no_grad():
            q1 = moco.predictor(moco.base_encoder(x1))
            q2 = moco.predictor(moco.base_encoder(x2))
            k1 = mocov3.gather_keys(moco.momentum_encoder(x1))
            k2 = mocov3.gather_keys(moco.momentum_encoder(x2))
            local_loss = local(x1, x2, m)

        result = dict(
            loss=loss.item(), mean_loss=mocov3.mean_over_processes(loss.detach()),
            q1=q1, q2=q2, k1=k1, k2=k2, gradients=gradients,
            local_bn_mean_loss=mocov3.mean_over_processes(local_loss),
            sync_batchnorm_error=try_sync_batchnorm())
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
