"""Tests for mocov3.py: the ViT, heads, loss, momentum encoder, schedules and the command line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mocov3

HERE = Path(__file__).resolve().parent
FASHION_MNIST = mocov3.DEBIAN_FASHION_MNIST


def tiny_moco(learnable_patch_embed=False, seed=0):
    """A MoCo small enough for many steps in a test: 8x8 images, 2x2 patches, width 16."""
    torch.manual_seed(seed)
    vit = mocov3.VisionTransformer(image_size=8, patch_size=2, dim=16, depth=2, heads=2,
                                   learnable_patch_embed=learnable_patch_embed)
    return mocov3.MoCo(vit, dim=8, mlp_dim=32, temperature=0.2)


def run_cli(*args, cwd=None, timeout=600):
    """Run `python mocov3.py ARGS` and return the completed process."""
    command = [sys.executable, str(HERE / "mocov3.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout)


# ---------------------------------------------------------------------------------- the ViT

@pytest.mark.parametrize("arch, expected", [
    ("vit_small", 21_665_664),
    ("vit_base", 85_798_656),
    ("vit_large", 303_301_632),
    ("vit_huge", 630_764_800),
])
def test_preset_parameter_counts(arch, expected):
    with torch.device("meta"):
        vit = mocov3.create_vit(arch)
    # The position embedding is a fixed buffer here, but the standard count includes it.
    count = sum(p.numel() for p in vit.parameters()) + vit.pos_embed.numel()
    assert count == expected


def test_vit_small_has_twelve_heads():
    with torch.device("meta"):
        vit = mocov3.create_vit("vit_small")
    assert vit.blocks[0].attn.heads == 12


def test_patch_projection_xavier_uniform_bound():
    vit = mocov3.create_vit("vit_small")
    weight = vit.patch_embed.proj.weight
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 384))
    assert weight.shape == (384, 3 * 16 * 16)
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.95 * bound
    assert torch.all(vit.patch_embed.proj.bias == 0)


def test_qkv_init_uses_per_matrix_fan():
    vit = mocov3.create_vit("vit_nano_cpu")
    weight = vit.blocks[0].attn.qkv.weight  # (3D, D)
    dim = weight.shape[1]
    bound = math.sqrt(6.0 / (dim + dim))
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.95 * bound


def test_cls_token_init_is_tiny():
    vit = mocov3.create_vit("vit_nano_cpu")
    assert vit.cls_token.abs().max() < 1e-5
    assert vit.cls_token.abs().max() > 0


def test_sincos_non_square_grid():
    vit = mocov3.VisionTransformer(image_size=(12, 20), patch_size=4, dim=16, depth=1, heads=2)
    pos = vit.pos_embed[0]  # (1 + 3*5, 16)
    assert pos.shape == (1 + 3 * 5, 16)
    assert torch.all(pos[0] == 0)  # [CLS]
    patches = pos[1:]
    distances = torch.cdist(patches, patches) + torch.eye(len(patches))
    assert distances.min() > 1e-3  # every position distinct
    assert "pos_embed" not in dict(vit.named_parameters())
    assert "pos_embed" in dict(vit.named_buffers())


def test_sincos_rows_and_columns_encoded_separately():
    pos = mocov3.sincos_position_embedding(3, 5, 16)
    grid = pos.reshape(3, 5, 16)
    # The first half depends on the column only, the second on the row only.
    assert torch.allclose(grid[0, :, :8], grid[2, :, :8])
    assert torch.allclose(grid[:, 0, 8:], grid[:, 4, 8:])


def test_vit_output_is_cls_feature():
    vit = mocov3.create_vit("vit_nano_cpu")
    features = vit(torch.randn(5, 3, 28, 28))
    assert features.shape == (5, 128)


def test_last_block_cls_only_matches_full():
    """The last block updates only [CLS], yet the features and every gradient equal those of
    running every block on every token, as timm does."""
    torch.manual_seed(0)
    vit = mocov3.create_vit("vit_nano_cpu", depth=3, learnable_patch_embed=True).double()
    x = torch.randn(4, 3, 28, 28, dtype=torch.float64)
    weights = torch.randn(128, dtype=torch.float64)

    def every_token(x):
        patches = vit.patch_embed(x) + vit.pos_embed[:, 1:]
        cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(len(x), -1, -1)
        return vit.norm(vit.blocks(torch.cat([cls, patches], dim=1))[:, 0])

    shapes = []
    vit.blocks[-1].register_forward_hook(lambda module, inputs, out: shapes.append(out.shape))
    results = []
    for features in (vit.forward_features, every_token):
        vit.zero_grad()
        out = features(x)
        (out @ weights).sum().backward()
        results.append((out, [p.grad.clone() for p in vit.parameters()]))

    assert shapes == [(4, 1, 128), (4, 50, 128)]  # [CLS] alone, then all 1 + 49 tokens
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for ours, full in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(image_size=30, patch_size=4, dim=16, heads=2), "not divisible by the patch size"),
    (dict(image_size=8, patch_size=2, dim=18, heads=2), "not divisible by 4"),
    (dict(image_size=8, patch_size=2, dim=16, heads=3), "not divisible by the number of heads"),
])
def test_vit_rejects_bad_shapes(kwargs, fragment):
    with pytest.raises(mocov3.UsageError, match=fragment):
        mocov3.VisionTransformer(depth=1, **kwargs)


def test_unknown_arch_rejected():
    with pytest.raises(mocov3.UsageError, match="vit_smal"):
        mocov3.create_vit("vit_smal")


# --------------------------------------------------------------------------- heads and MoCo

def test_heads_layout():
    moco = tiny_moco()
    projector, predictor = moco.base_encoder.head, moco.predictor
    linears = [m for m in projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    assert all(m.bias is None for m in linears)
    assert len([m for m in predictor if isinstance(m, torch.nn.Linear)]) == 2
    assert isinstance(projector[-1], torch.nn.BatchNorm1d)
    assert not projector[-1].affine
    assert isinstance(predictor[-1], torch.nn.BatchNorm1d)
    assert not predictor[-1].affine
    assert isinstance(projector[2], torch.nn.ReLU)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_views_match_separate_calls(training):
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 5, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    together, apart = mocov3.BatchNorm1d(5).double(), mocov3.BatchNorm1d(5).double()
    with torch.no_grad():
        together.weight.uniform_(0.5, 2)
        together.running_var.fill_(2)
    apart.load_state_dict(together.state_dict())
    together.train(training), apart.train(training)
    y = together(x)  # (2, 6, 5): each view normalised over its own 6 rows
    expected = torch.stack([apart(x[0]), apart(x[1])])
    torch.testing.assert_close(y, expected)
    weights = torch.randn(2, 6, 5, dtype=torch.float64)
    grads = [torch.autograd.grad((out * weights).sum(), (x, bn.weight))
             for out, bn in ((y, together), (expected, apart))]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    for got, want in zip(together.buffers(), apart.buffers()):
        torch.testing.assert_close(got, want)  # running statistics updated once per view


def train_steps(moco, steps, lr=1e-2, weight_decay=0.1):
    trainable = [p for p in moco.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x1 = torch.randn(8, 3, 8, 8, generator=generator)
        x2 = torch.randn(8, 3, 8, 8, generator=generator)
        loss = moco(x1, x2, 0.99)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return optimizer


def test_patch_projection_frozen_under_weight_decay():
    moco = tiny_moco()
    encoder = moco.base_encoder
    patch_before = encoder.patch_embed.proj.weight.clone()
    bias_before = encoder.patch_embed.proj.bias.clone()
    pos_before = encoder.pos_embed.clone()
    block_before = encoder.blocks[0].mlp.fc1.weight.clone()
    optimizer = train_steps(moco, steps=3)
    assert torch.equal(encoder.patch_embed.proj.weight, patch_before)
    assert torch.equal(encoder.patch_embed.proj.bias, bias_before)
    assert torch.equal(encoder.pos_embed, pos_before)
    assert encoder.patch_embed.proj.weight.grad is None
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(encoder.patch_embed.proj.weight) not in in_optimizer
    assert not torch.equal(encoder.blocks[0].mlp.fc1.weight, block_before)  # training happened


def test_learnable_patch_projection_changes():
    moco = tiny_moco(learnable_patch_embed=True)
    before = moco.base_encoder.patch_embed.proj.weight.clone()
    train_steps(moco, steps=3)
    assert not torch.equal(moco.base_encoder.patch_embed.proj.weight, before)


def test_momentum_encoder_not_trained():
    moco = tiny_moco()
    optimizer = train_steps(moco, steps=1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for p in moco.momentum_encoder.parameters():
        assert not p.requires_grad
        assert p.grad is None
        assert id(p) not in in_optimizer


def test_momentum_update_closed_form():
    moco = tiny_moco()
    # Make the two encoders differ first, so the average is not trivially equal to both.
    train_steps(moco, steps=2)
    base = {n: p.detach().clone() for n, p in moco.base_encoder.named_parameters()}
    old = {n: p.detach().clone() for n, p in moco.momentum_encoder.named_parameters()}
    m = 0.9
    optimizer = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad], lr=1e-2)
    loss = moco(torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8), m)
    loss.backward()
    optimizer.step()
    differs = 0
    for name, p in moco.momentum_encoder.named_parameters():
        expected = m * old[name] + (1 - m) * base[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)
        differs += not torch.equal(old[name], base[name])
    assert differs > 0


# ------------------------------------------------------------------------------------- loss

def pseudocode_ctr(q, k, tau):
    """Algorithm 1's ctr(q, k), transcribed: logits = q k^T, labels = range(N), CE(logits/tau)."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t()
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        row = logits[i] / tau
        total += -(row[i] - torch.logsumexp(row, dim=0))
    return 2 * tau * total / n


def test_loss_matches_pseudocode():
    torch.manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(16, 32) for _ in range(4))
    ours = mocov3.contrastive_loss(q1, k2, 0.2) + mocov3.contrastive_loss(q2, k1, 0.2)
    reference = pseudocode_ctr(q1, k2, 0.2) + pseudocode_ctr(q2, k1, 0.2)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_loss_of_collapsed_features():
    n, temperature = 8, 0.2
    q = torch.ones(n, 4)
    k = torch.ones(n, 4)
    loss = mocov3.contrastive_loss(q, k, temperature) + mocov3.contrastive_loss(q, k, temperature)
    assert loss.item() == pytest.approx(4 * temperature * math.log(n), rel=1e-6)
    assert loss.item() == pytest.approx(1.66355, abs=1e-5)


def test_loss_of_aligned_features_is_small():
    # Orthogonal one-hot features, each key equal to its query: the loss approaches 0.
    q = torch.eye(8)
    loss = mocov3.contrastive_loss(q, q.clone(), 0.05)
    assert loss.item() < 1e-6


def test_moco_loss_symmetric_in_views():
    moco = tiny_moco()
    moco.eval()  # running statistics, so both orders see the same normalisation
    x1, x2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        forward = moco(x1, x2, 1.0)
        backward = moco(x2, x1, 1.0)
    torch.testing.assert_close(forward, backward)


def test_one_batch_backbone_matches_two_passes():
    # float64, so that only a difference in the math, not rounding, can fail the test
    moco = tiny_moco().double()
    x1, x2 = torch.randn(8, 3, 8, 8).double(), torch.randn(8, 3, 8, 8).double()
    loss = moco(x1, x2, 0.99)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in moco.named_parameters() if p.grad is not None}

    reference = tiny_moco().double()
    encoder, momentum_encoder = reference.base_encoder, reference.momentum_encoder
    q1 = reference.predictor(encoder(x1))
    q2 = reference.predictor(encoder(x2))
    with torch.no_grad():
        reference.update_momentum_encoder(0.99)
        k1, k2 = momentum_encoder(x1), momentum_encoder(x2)
    expected = (mocov3.contrastive_loss(q1, k2, 0.2) + mocov3.contrastive_loss(q2, k1, 0.2))
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert len(grads) == len([p for p in reference.parameters() if p.grad is not None])
    for name, p in reference.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12)
    # BatchNorm's running statistics, updated once per view in both
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(moco.named_buffers())[name], buffer, rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------------------------- schedules

def schedule_args(**overrides):
    args = mocov3.parse_args(["--arch", "vit_small"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_learning_rate_schedule():
    args = schedule_args(lr=1.5e-4, batch_size=4096, epochs=300, warmup_epochs=40)
    peak = 1.5e-4 * 4096 / 256
    assert mocov3.learning_rate(0, args) == 0
    assert mocov3.learning_rate(20, args) == pytest.approx(peak / 2)
    assert mocov3.learning_rate(40, args) == pytest.approx(peak)
    assert mocov3.learning_rate(170, args) == pytest.approx(peak / 2)
    assert mocov3.learning_rate(300, args) == pytest.approx(0, abs=1e-12)


def test_momentum_schedule():
    args = schedule_args(moco_m=0.99, epochs=300)
    assert mocov3.momentum(0, args) == pytest.approx(0.99)
    assert mocov3.momentum(150, args) == pytest.approx(0.995)
    assert mocov3.momentum(300, args) == pytest.approx(1.0)
    values = [mocov3.momentum(e, args) for e in range(301)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_paper_defaults_for_vit_small():
    args = mocov3.parse_args(["--arch", "vit_small"])
    assert (args.lr, args.batch_size, args.epochs, args.warmup_epochs) == (1.5e-4, 4096, 300, 40)
    assert (args.temperature, args.weight_decay, args.moco_m) == (0.2, 0.1, 0.99)
    assert (args.image_size, args.patch_size, args.heads) == (224, 16, 12)


# ------------------------------------------------------------------------------------ data

def test_two_views_reproducible_and_varied():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    dataset = mocov3.ArrayDataset(images, [0, 1, 2, 3])
    view1, view2 = mocov3.pretrain_transforms(28, 0.08, mocov3.NORMALIZATION["fashion-mnist"])
    two_views = mocov3.TwoViews(dataset, view1, view2, seed=0)
    a1, a2 = two_views[0]
    b1, b2 = two_views[0]
    assert a1.shape == (3, 28, 28)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same (seed, epoch, index)
    assert not torch.equal(a1, a2)  # the two views differ
    two_views.epoch = 1
    c1, _ = two_views[0]
    assert not torch.equal(a1, c1)  # a new epoch draws new views


def test_augmentations_differ_across_workers():
    images = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    dataset = mocov3.ArrayDataset(images, [0] * 8)
    view1, view2 = mocov3.pretrain_transforms(28, 0.08, mocov3.NORMALIZATION["fashion-mnist"])
    two_views = mocov3.TwoViews(dataset, view1, view2, seed=0)
    # The same image index twice, loaded by two different workers.
    same = torch.utils.data.Subset(two_views, [3, 3])
    loader = torch.utils.data.DataLoader(same, batch_size=1, num_workers=2)
    first, second = [x1 for x1, _ in loader]
    # Seeding depends on the image, not the worker, so the views are equal ...
    assert torch.equal(first, second)
    # ... while different images in different workers draw different crops.
    loader = torch.utils.data.DataLoader(two_views, batch_size=4, num_workers=2)
    batches = [x1 for x1, _ in loader]
    assert not torch.equal(batches[0], batches[1])


def test_blur_kernel_scales_with_image_size():
    small, _ = mocov3.pretrain_transforms(28, 0.08, mocov3.NORMALIZATION["fashion-mnist"])
    large, _ = mocov3.pretrain_transforms(224, 0.08, mocov3.NORMALIZATION["folder"])
    blur = lambda t: t.transforms[3].transforms[0]  # noqa: E731
    assert blur(large).kernel_size == (23, 23)
    assert blur(small).kernel_size == (3, 3)
    assert blur(small).sigma[1] == pytest.approx(2.0 * 28 / 224)


def test_knn_hand_computed():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    queries = F.normalize(torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 1.1]]), dim=1)
    predictions = mocov3.knn_predict(bank, labels, queries, num_classes=2, k=1)
    assert predictions.tolist() == [0, 1, 1]
    # With k = 4 every bank point votes; weights exp(sim / 0.1) favour the nearer class.
    predictions = mocov3.knn_predict(bank, labels, queries, num_classes=2, k=4)
    assert predictions.tolist() == [0, 1, 1]


# ------------------------------------------------------------------------- command line

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST} "
           "(apt-get install dataset-fashion-mnist)")

QUICK = ["--subset", 256, "--batch-size", 64, "--eval-subset", 200, "--workers", 0,
         "--no-progress", "--log-every", 1, "--data-root", "/nonexistent-data-root"]


@needs_fashion_mnist
def test_cli_trains_and_resumes(tmp_path):
    out = tmp_path / "run"
    first = run_cli(*QUICK, "--epochs", 2, "--output-dir", out)
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 8  # 2 epochs of 256 / 64 steps
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert {"epoch", "step", "loss", "lr", "momentum"} <= set(steps[0])
    assert [r["epoch"] for r in records if "knn_top1" in r] == [0, 1, 2]
    assert (out / "checkpoint-epoch0002.pth").is_file()
    assert "kNN top-1" in first.stdout

    resumed = run_cli(*QUICK, "--epochs", 3, "--output-dir", out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r][-1] == 2
    assert (out / "checkpoint-epoch0003.pth").is_file()
    checkpoint = torch.load(out / "checkpoint-epoch0003.pth", weights_only=True)
    assert checkpoint["epoch"] == 3
    assert checkpoint["config"]["arch"] == "vit_nano_cpu"


@pytest.mark.parametrize("args, fragment", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--arch", "vit_gigantic"], "vit_gigantic"),
    (["--image-size", "30"], "--image-size 30"),
    (["--epochs", "0"], "--epochs 0"),
    (["--batch-size", "-4"], "--batch-size -4"),
    (["--lr", "0"], "--lr 0"),
])
def test_cli_bad_input_one_line_error(tmp_path, args, fragment):
    result = run_cli(*args, "--output-dir", tmp_path / "run", timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]


def test_cli_help_lists_every_option():
    result = run_cli("--help", timeout=120)
    assert result.returncode == 0
    for option in ("--arch", "--data", "--data-root", "--epochs", "--batch-size", "--lr",
                   "--output-dir", "--resume", "--seed", "--workers", "--subset", "--eval-every"):
        assert option in result.stdout


def test_fashion_mnist_missing_lists_three_ways(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(mocov3, "DEBIAN_FASHION_MNIST", tmp_path / "no-package")
    monkeypatch.setattr(mocov3.datasets, "FashionMNIST", offline)
    with pytest.raises(mocov3.UsageError) as error:
        mocov3.load_fashion_mnist(tmp_path / "empty-root")
    message = str(error.value)
    assert str(tmp_path / "empty-root" / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "network access" in message


@needs_fashion_mnist
def test_fashion_mnist_from_data_root_first(tmp_path):
    import gzip
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for names in mocov3.FASHION_MNIST_FILES.values():
        for name in names:
            with gzip.open(FASHION_MNIST / (name + ".gz")) as f:
                (raw / name).write_bytes(f.read())
    # Keep 5 training images: IDX headers are a magic number, then each dimension's size.
    labels = (raw / "train-labels-idx1-ubyte").read_bytes()
    (raw / "train-labels-idx1-ubyte").write_bytes(
        labels[:4] + (5).to_bytes(4, "big") + labels[8:8 + 5])
    images = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(
        images[:4] + (5).to_bytes(4, "big") + images[8:16] + images[16:16 + 5 * 28 * 28])
    splits = mocov3.load_fashion_mnist(tmp_path)
    assert len(splits["train"]) == 5  # the copy under --data-root, not the package's 60,000
    assert len(splits["test"]) == 10000
