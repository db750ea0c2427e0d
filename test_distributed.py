"""Multi-process MoCo v3 on the CPU with gloo: results must equal one process on the whole batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mocov3

HERE = Path(__file__).resolve().parent
STEPS = 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_moco():
    """A small MoCo in float64, so that only a difference in the math, not the order of float
    sums across processes, can fail a comparison."""
    torch.manual_seed(0)
    vit = mocov3.VisionTransformer(image_size=8, patch_size=2, dim=16, depth=2, heads=2)
    return mocov3.MoCo(vit, dim=8, mlp_dim=32, temperature=0.2).double()


def batches():
    """STEPS global batches of 8 image pairs."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=generator, dtype=torch.float64),
             torch.randn(8, 3, 8, 8, generator=generator, dtype=torch.float64))
            for _ in range(STEPS)]


def train(model, moco, rows):
    """Run STEPS AdamW steps on `rows` of each global batch; return first loss, grads, params."""
    optimizer = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    first_loss, first_grads = None, None
    for x1, x2 in batches():
        loss = model(x1[rows], x2[rows], 0.99)
        optimizer.zero_grad()
        loss.backward()
        if first_loss is None:
            first_loss = mocov3.mean_over_processes(loss.detach())
            first_grads = {n: p.grad.clone() for n, p in moco.named_parameters()
                           if p.grad is not None}
        optimizer.step()
    params = {n: p.detach().clone() for n, p in moco.state_dict().items()}
    return first_loss, first_grads, params


def distributed_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        moco = tiny_moco()
        model = torch.nn.parallel.DistributedDataParallel(moco)
        share = 8 // world
        result = train(model, moco, slice(rank * share, (rank + 1) * share))
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "two.pt"
    mp.spawn(distributed_worker, args=(2, free_port(), out), nprocs=2)
    loss2, grads2, params2 = torch.load(out)

    moco = tiny_moco()
    loss1, grads1, params1 = train(moco, moco, slice(0, 8))

    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-5, atol=1e-12,
                                   msg=f"gradient of {name}")
    for name in params1:
        # BatchNorm running statistics are compared too: they must be global-batch statistics.
        # The atol covers the key bias, whose true gradient is 0 (softmax ignores a shift of
        # every score), so AdamW turns rounding noise of about 1e-17 into steps of about 1e-10.
        torch.testing.assert_close(params2[name], params1[name], rtol=1e-5, atol=1e-8,
                                   msg=f"{name} after {STEPS} steps")


def labels_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        # Global batch of 8 one-hot features, each query equal to its own key: only the right
        # labels make every positive the best match, which gives a loss near 0.
        features = torch.eye(8)[rank * 4:(rank + 1) * 4]
        loss = mocov3.contrastive_loss(features, features.clone(), temperature=0.05)
        keys = mocov3.gather_keys(features)
        result = dict(loss=mocov3.mean_over_processes(loss.detach()), keys=keys)
        torch.save(result, out.with_name(f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_labels_offset_by_rank(tmp_path):
    mp.spawn(labels_worker, args=(2, free_port(), tmp_path / "x"), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        # Keys are gathered in rank order, so rank r's positives are rows 4r .. 4r + 3.
        assert torch.equal(result["keys"], torch.eye(8))
        assert result["loss"] < 1e-6


def batchnorm_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 5, dtype=torch.float64) * 3 + 1
        x.requires_grad_(True)
        bn = mocov3.BatchNorm1d(5).double()
        y = bn(x[rank * 4:(rank + 1) * 4])
        (y * torch.arange(5.0)).pow(2).sum().backward()
        torch.save(dict(y=y.detach(), grad=x.grad, mean=bn.running_mean, var=bn.running_var),
                   out.with_name(f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_batchnorm_uses_global_batch(tmp_path):
    mp.spawn(batchnorm_worker, args=(2, free_port(), tmp_path / "x"), nprocs=2)
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64) * 3 + 1
    x.requires_grad_(True)
    bn = torch.nn.BatchNorm1d(5).double()
    y = bn(x)
    (y * torch.arange(5.0)).pow(2).sum().backward()
    grad = torch.zeros_like(x)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(result["y"], y[rows].detach())
        torch.testing.assert_close(result["mean"], bn.running_mean)
        torch.testing.assert_close(result["var"], bn.running_var)
        grad[rows] = result["grad"][rows]
    torch.testing.assert_close(grad, x.grad, rtol=1e-7, atol=1e-10)


def test_sampler_epochs_and_shards():
    dataset = list(range(100))
    samplers = [mocov3.EpochSampler(dataset, batch_per_rank=10, rank=r, world=2, seed=0)
                for r in range(2)]
    orders = []
    for epoch in range(2):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shards = [list(sampler) for sampler in samplers]
        assert not set(shards[0]) & set(shards[1])  # no image on both processes
        assert len(shards[0]) == len(shards[1]) == 50
        orders.append(shards[0])
    assert orders[0] != orders[1]  # reshuffled between epochs


def test_sampler_start_step_skips_batches():
    dataset = list(range(100))
    sampler = mocov3.EpochSampler(dataset, batch_per_rank=10, rank=0, world=1, seed=0)
    whole = list(sampler)
    sampler.start_step = 3
    assert list(sampler) == whole[30:]
    assert len(sampler) == 70


needs_fashion_mnist = pytest.mark.skipif(
    not mocov3.DEBIAN_FASHION_MNIST.is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

QUICK = ["--subset", 256, "--batch-size", 64, "--eval-subset", 256, "--workers", 0,
         "--no-progress", "--log-every", 1, "--keep-checkpoints", 10,
         "--data-root", "/nonexistent-data-root"]


def run(command, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          timeout=timeout, env=env)


@needs_fashion_mnist
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_two_processes_then_resume_with_one(tmp_path):
    out = tmp_path / "run"
    torchrun = ["torchrun", "--nproc_per_node=2", "--master_port", free_port(),
                HERE / "mocov3.py"]
    result = run(torchrun + QUICK + ["--epochs", 1, "--output-dir", out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.glob("*.jsonl")) == [out / "metrics.jsonl"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # written once, by rank 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch0001.pth"]
    assert result.stdout.count("kNN top-1") == 2  # printed once per evaluation
    knn_two = [r["knn_top1"] for r in records if "knn_top1" in r]

    resumed = run([sys.executable, HERE / "mocov3.py"] + QUICK
                  + ["--epochs", 2, "--output-dir", out, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-epoch0001.pth", "checkpoint-epoch0002.pth"]

    # kNN of the same weights is the same number with one process as with two.
    one = tmp_path / "one"
    single = run([sys.executable, HERE / "mocov3.py"] + QUICK
                 + ["--epochs", 1, "--output-dir", one])
    assert single.returncode == 0, single.stderr[-3000:]
    records = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] for r in records if "knn_top1" in r][0] == knn_two[0]


def knn_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        features = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
        share = -(-7 // world)
        mine = features[rank * share:(rank + 1) * share]
        torch.save(mocov3.gather_shares(mine, share), out.with_name(f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_shares_counts_each_row_once(tmp_path):
    # 7 rows over 3 processes: shares of 3, 3 and 1, padded to 3 for the gather.
    mp.spawn(knn_worker, args=(3, free_port(), tmp_path / "x"), nprocs=3)
    expected = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    for rank in range(3):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_batch_not_divisible_by_processes():
    args = mocov3.parse_args(["--batch-size", "10"])
    splits = {"train": mocov3.ArrayDataset(torch.zeros(20, 28, 28, dtype=torch.uint8), [0] * 20)}
    with pytest.raises(mocov3.UsageError, match="--batch-size 10 is not divisible by the 3"):
        mocov3.build_training_data(args, splits, "fashion-mnist", rank=0, world=3)


def test_fewer_images_than_batch():
    args = mocov3.parse_args(["--batch-size", "64"])
    splits = {"train": mocov3.ArrayDataset(torch.zeros(20, 28, 28, dtype=torch.uint8), [0] * 20)}
    with pytest.raises(mocov3.UsageError, match="20 training images, fewer than one"):
        mocov3.build_training_data(args, splits, "fashion-mnist", rank=0, world=1)


def test_normalized_features_shape():
    vit = mocov3.create_vit("vit_nano_cpu")
    dataset = mocov3.ArrayDataset(torch.zeros(5, 28, 28, dtype=torch.uint8), [0] * 5,
                                  mocov3.eval_transform(28, mocov3.NORMALIZATION["folder"], False))
    args = mocov3.parse_args(["--workers", "0"])
    features, labels = mocov3.extract_features(vit, dataset, args, torch.device("cpu"))
    assert features.shape == (5, 128)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert F.cosine_similarity(features[0], features[1], dim=0) > 0.999


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_error_on_one_rank_ends_all(tmp_path):
    from PIL import Image
    root = tmp_path / "images"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (28, 28), (100 * c, 20 * i, 50)).save(root / f"class{c}" / f"{i}.png")
    # ImageFolder orders class0/0..7 then class1/0..7; break an image that only rank 1 loads.
    sampler = mocov3.EpochSampler(list(range(16)), batch_per_rank=4, rank=1, world=2, seed=0)
    index = list(sampler)[0]
    broken = root / f"class{index // 8}" / f"{index % 8}.png"
    broken.write_bytes(b"not a png")

    torchrun = ["torchrun", "--nproc_per_node=2", "--master_port", free_port(),
                HERE / "mocov3.py"]
    result = run(torchrun + ["--data", root, "--batch-size", 8, "--epochs", 1, "--workers", 0,
                             "--no-progress", "--output-dir", tmp_path / "out"], timeout=300)
    assert result.returncode != 0
    assert result.stderr.count(f"error on rank 1: cannot read image {broken}") == 1
    assert "rank 0 stopped: another process failed" in result.stderr
    # torchrun prints its own summary, but neither training process prints a traceback.
    assert "[rank0]: Traceback" not in result.stderr
    assert "[rank1]: Traceback" not in result.stderr
