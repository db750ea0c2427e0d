"""Tests for the evaluation side of mocov3.py: timm and official-checkpoint conversion, the
linear probe, and the probe, knn and export commands."""

import argparse
import json
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import mocov3

HERE = Path(__file__).resolve().parent
FASHION_MNIST = mocov3.DEBIAN_FASHION_MNIST

# The command-line tests read the Debian package's files (--data-root /nonexistent skips
# ./data), so they never download.
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST.is_dir(),
    reason=f"no Fashion-MNIST at {FASHION_MNIST}; apt-get install dataset-fashion-mnist")


def run_cli(*args, timeout=600):
    """Run `python mocov3.py ARGS` and return the completed process."""
    command = [sys.executable, str(HERE / "mocov3.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def tiny_moco(seed=0):
    """Build a MoCo small enough for quick tests: 8x8 images, 2x2 patches, width 16."""
    torch.manual_seed(seed)
    vit = mocov3.VisionTransformer(image_size=8, patch_size=2, dim=16, depth=2, heads=2)
    return mocov3.MoCo(vit, dim=8, mlp_dim=32, temperature=0.2)


@torch.no_grad()
def perturb(module, seed, buffers=True):
    """Add noise to every parameter (and floating buffer), so that no two tensors are alike."""
    generator = torch.Generator().manual_seed(seed)
    tensors = list(module.parameters())
    if buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    for tensor in tensors:
        tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))


# ------------------------------------------------------------------------------ timm format

def timm_vision_transformer(**kwargs):
    """Build timm's VisionTransformer in eval mode, or skip the test without timm."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    return timm_vit.VisionTransformer(**kwargs).eval()


def test_timm_weights_give_same_features_vit_small():
    torch.manual_seed(0)
    theirs = timm_vision_transformer(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="token")
    perturb(theirs, seed=1)
    ours = mocov3.create_vit("vit_small").eval()
    mocov3.import_timm_state_dict(ours, theirs.state_dict())

    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = theirs(images)  # (B, D): final norm of [CLS], no head
        features = ours.forward_features(images)
    assert expected.shape == (2, 384)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_export_loads_strictly_into_timm():
    ours = mocov3.create_vit("vit_nano_cpu", depth=2).eval()
    perturb(ours, seed=2)
    theirs = timm_vision_transformer(**mocov3.timm_vit_config(ours))
    # strict: the exported keys are exactly timm's, with nothing missing or left over
    theirs.load_state_dict(mocov3.export_timm_state_dict(ours), strict=True)

    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = ours.forward_features(images)
        features = theirs(images)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_export_then_import_round_trip():
    source = mocov3.create_vit("vit_nano_cpu", depth=2)
    perturb(source, seed=3)
    target = mocov3.create_vit("vit_nano_cpu", depth=2)
    mocov3.import_timm_state_dict(target, mocov3.export_timm_state_dict(source))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_export_patch_weight_is_convolution():
    vit = mocov3.create_vit("vit_nano_cpu", depth=1)
    perturb(vit, seed=4)
    state = mocov3.export_timm_state_dict(vit)
    weight, bias = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    assert weight.shape == (128, 3, 4, 4)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(images, weight, bias, stride=4)  # (B, D, 7, 7)
        tokens = vit.patch_embed(images)  # (B, 49, D), rows of patches in order
    torch.testing.assert_close(tokens, conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)


def test_export_drops_head_and_copies():
    moco = tiny_moco()
    state = mocov3.export_timm_state_dict(moco.base_encoder)
    assert not [key for key in state if key.startswith("head.")]
    assert "pos_embed" in state
    state["cls_token"].add_(1.0)
    assert not torch.equal(state["cls_token"], moco.base_encoder.cls_token)


def test_import_rejects_other_image_size():
    source = mocov3.create_vit("vit_nano_cpu", depth=1, image_size=32)
    target = mocov3.create_vit("vit_nano_cpu", depth=1, image_size=28)
    with pytest.raises(mocov3.UsageError, match="pos_embed"):
        mocov3.import_timm_state_dict(target, mocov3.export_timm_state_dict(source))


def test_import_names_unexpected_and_missing():
    vit = mocov3.create_vit("vit_nano_cpu", depth=1)
    state = mocov3.export_timm_state_dict(vit)
    state["fc_norm.weight"] = torch.ones(128)
    del state["norm.bias"]
    state["head.weight"] = torch.zeros(10, 128)  # a classifier head is ignored
    with pytest.raises(mocov3.UsageError) as error:
        mocov3.import_timm_state_dict(vit, state)
    assert "unexpected: fc_norm.weight" in str(error.value)
    assert "missing: norm.bias" in str(error.value)
    assert "head.weight" not in str(error.value)


# ------------------------------------------------------------------- official checkpoints

def official_state_dict(moco):
    """Return moco's state dict as the official code saves it: "module." keys, conv weights."""
    state = {}
    for key, value in moco.state_dict().items():
        if key.endswith("patch_embed.proj.weight"):
            value = value.reshape(value.shape[0], 3, 2, 2)  # tiny_moco's patches are 2x2
        state["module." + key] = value.clone()
    return state


def save_official(path, state):
    """Save `state` in the layout of the official release's .pth.tar files."""
    optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0, 1]}]}
    torch.save(dict(epoch=300, arch="vit_small", state_dict=state, optimizer=optimizer), path)


def test_official_checkpoint_round_trip(tmp_path):
    source = tiny_moco(seed=0)
    perturb(source, seed=5)  # base and momentum encoders now differ, as after training
    state = official_state_dict(source)
    assert state["module.base_encoder.patch_embed.proj.weight"].shape == (16, 3, 2, 2)
    assert "module.momentum_encoder.pos_embed" in state
    save_official(tmp_path / "vit.pth.tar", state)

    target = tiny_moco(seed=1)
    missing, unexpected = mocov3.load_official_checkpoint(tmp_path / "vit.pth.tar", target)
    assert missing == []
    assert unexpected == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_official_missing_and_unexpected_named(tmp_path):
    source = tiny_moco(seed=0)
    perturb(source, seed=6)
    state = official_state_dict(source)
    del state["module.predictor.0.weight"]
    state["module.queue"] = torch.zeros(8, 4)
    save_official(tmp_path / "vit.pth.tar", state)

    with pytest.raises(mocov3.UsageError) as error:
        mocov3.load_official_checkpoint(tmp_path / "vit.pth.tar", tiny_moco(seed=1))
    assert "missing: module.predictor.0.weight" in str(error.value)
    assert "unexpected: module.queue" in str(error.value)

    target = tiny_moco(seed=1)
    before = target.predictor[0].weight.clone()
    missing, unexpected = mocov3.load_official_checkpoint(tmp_path / "vit.pth.tar", target,
                                                          strict=False)
    assert missing == ["module.predictor.0.weight"]
    assert unexpected == ["module.queue"]
    assert torch.equal(target.predictor[0].weight, before)
    assert torch.equal(target.base_encoder.cls_token, source.base_encoder.cls_token)


def test_official_shape_mismatch_raises(tmp_path):
    state = official_state_dict(tiny_moco())
    state["module.base_encoder.norm.weight"] = torch.ones(24)
    save_official(tmp_path / "vit.pth.tar", state)
    with pytest.raises(mocov3.UsageError, match=r"base_encoder\.norm\.weight \(24,\)"):
        mocov3.load_official_checkpoint(tmp_path / "vit.pth.tar", tiny_moco(), strict=False)


def test_official_pickled_objects_rejected(tmp_path):
    state = official_state_dict(tiny_moco())
    torch.save(dict(state_dict=state, args=argparse.Namespace(lr=0.1)), tmp_path / "a.pth.tar")
    with pytest.raises(mocov3.UsageError, match="weights_only"):
        mocov3.load_official_checkpoint(tmp_path / "a.pth.tar", tiny_moco())


def test_official_missing_file(tmp_path):
    with pytest.raises(mocov3.UsageError, match="no such file"):
        mocov3.load_official_checkpoint(tmp_path / "absent.pth.tar", tiny_moco())


# ---------------------------------------------------------------------------- linear probe

def probe_args(**overrides):
    """Return the options that linear_probe reads, sized for a quick test."""
    options = dict(epochs=2, batch_size=16, lr=0.1, probe_bn=False, seed=0, workers=0,
                   amp="off", no_progress=True)
    return argparse.Namespace(**{**options, **overrides})


def brightness_dataset(count, seed):
    """Build noisy 8x8 images of two classes: dark (label 0) and bright (label 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 2
    images = torch.randn(count, 3, 8, 8, generator=generator) * 0.3
    images += (2.0 * labels - 1.0)[:, None, None, None]
    return torch.utils.data.TensorDataset(images, labels)


@pytest.mark.parametrize("probe_bn", [False, True])
def test_probe_leaves_backbone_unchanged(probe_bn):
    moco = tiny_moco()
    perturb(moco, seed=7)
    backbone = moco.base_encoder
    backbone.train()
    before = {key: value.clone() for key, value in backbone.state_dict().items()}
    data = brightness_dataset(64, seed=0)

    top1, classifier = mocov3.linear_probe(backbone, data, data, 2, probe_args(probe_bn=probe_bn),
                                           torch.device("cpu"))
    after = backbone.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.training
    assert 0.0 <= top1 <= 100.0
    assert len(classifier) == (2 if probe_bn else 1)


def test_probe_learns_separable_classes():
    moco = tiny_moco()
    train, test = brightness_dataset(64, seed=1), brightness_dataset(64, seed=2)
    top1, _ = mocov3.linear_probe(moco.base_encoder, train, test, 2,
                                  probe_args(epochs=3, probe_bn=True), torch.device("cpu"))
    assert top1 >= 90.0


def test_probe_rejects_batch_larger_than_data():
    data = brightness_dataset(8, seed=0)
    with pytest.raises(mocov3.UsageError, match="--batch-size 16"):
        mocov3.linear_probe(tiny_moco().base_encoder, data, data, 2, probe_args(),
                            torch.device("cpu"))


def probe_on_rows(train_rows, test_rows):
    """Probe tiny_moco with the BatchNorm; return (top-1, classifier weights, lone-zero top-1).

    The last value is the top-1 of a classifier that always predicts class 0, on test images
    whose only label 0 is the last one, so it is 100 / test_rows if each is counted once.
    """
    moco = tiny_moco()
    train, test = brightness_dataset(train_rows, seed=1), brightness_dataset(test_rows, seed=2)
    args = probe_args(probe_bn=True)
    top1, classifier = mocov3.linear_probe(moco.base_encoder, train, test, 2, args,
                                           torch.device("cpu"))
    weights = {key: value.clone() for key, value in classifier.state_dict().items()}

    always_zero = nn.Linear(16, 2)
    nn.init.zeros_(always_zero.weight)
    always_zero.bias.data = torch.tensor([1.0, 0.0])
    images, _ = test.tensors
    labels = torch.ones(test_rows, dtype=torch.long)
    labels[-1] = 0
    lone_zero = torch.utils.data.TensorDataset(images, labels)
    counted = mocov3.probe_top1(moco.base_encoder, always_zero, lone_zero, args,
                                torch.device("cpu"))
    return top1, weights, counted


def probe_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        result = probe_on_rows(train_rows=64, test_rows=37)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def free_port():
    """Return a free TCP port on this machine for the process group."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


def test_probe_two_processes_equal_one(tmp_path):
    # Two gloo processes with half the batch each: DDP averages the gradients, the BatchNorm
    # takes global statistics, and the 37 test images are split 19 + 18.
    mp.spawn(probe_worker, args=(2, free_port(), tmp_path / "two.pt"), nprocs=2)
    top1_two, weights_two, counted_two = torch.load(tmp_path / "two.pt")
    top1_one, weights_one, counted_one = probe_on_rows(train_rows=64, test_rows=37)

    assert counted_one == pytest.approx(100 / 37)
    assert counted_two == pytest.approx(100 / 37)
    assert top1_two == pytest.approx(top1_one)
    assert weights_two.keys() == weights_one.keys()
    for key, value in weights_one.items():
        torch.testing.assert_close(weights_two[key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_probe_augmentation_seeded_per_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8, generator=generator)
    transform = mocov3.probe_transform(28, 0.2, mocov3.NORMALIZATION["fashion-mnist"])
    items = mocov3.SeededItems(mocov3.ArrayDataset(images, [0, 1, 2, 3], transform), seed=0)

    first, _ = items[2]
    torch.manual_seed(123)  # the global random state must not matter
    items[1]
    again, _ = items[2]
    assert torch.equal(first, again)
    items.epoch = 1
    next_epoch, _ = items[2]
    assert not torch.equal(first, next_epoch)


def test_classifier_initialisation():
    torch.manual_seed(0)
    classifier = mocov3.build_classifier(384, 1000, probe_bn=True)
    batchnorm, linear = classifier
    assert not batchnorm.affine
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(linear.bias == 0)


# ---------------------------------------------------------------------------- command line

def write_checkpoint(path, config_overrides=None):
    """Write a checkpoint of an untrained small model in the layout pretraining writes."""
    args = mocov3.parse_args(["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
                              "--output-dir", str(path.parent)])
    moco = mocov3.build_model(args, torch.device("cpu"))
    config = {**mocov3.plain_config(args), **(config_overrides or {})}
    torch.save(dict(model=moco.state_dict(), epoch=1, step=0, config=config), path)
    return moco


def run_main(capsys, *args):
    """Run mocov3.main in this process; return (exit status, stderr lines)."""
    status = mocov3.main([str(a) for a in args])
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["probe", "knn", "export"])
def test_cli_missing_checkpoint(tmp_path, capsys, command):
    extra = ["--out", tmp_path / "vit.pth"] if command == "export" else []
    status, lines = run_main(capsys, command, "--checkpoint", tmp_path / "absent.pth", *extra)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith("error: --checkpoint ")
    assert "absent.pth: no such file" in lines[0]


@pytest.mark.parametrize("content, fragment", [
    ("text", "not a readable checkpoint"),
    ("no config", "'config' entry lacks arch"),
])
def test_cli_not_a_checkpoint(tmp_path, capsys, content, fragment):
    path = tmp_path / "file.pth"
    if content == "text":
        path.write_text("not a checkpoint\n")
    else:
        torch.save(dict(model={}), path)
    status, lines = run_main(capsys, "knn", "--checkpoint", path)
    assert status == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"error: --checkpoint {path}")
    assert fragment in lines[0]


def test_cli_weights_not_fitting_config(tmp_path, capsys):
    write_checkpoint(tmp_path / "checkpoint.pth", config_overrides=dict(dim=64))
    status, lines = run_main(capsys, "probe", "--checkpoint", tmp_path / "checkpoint.pth")
    assert status == 2
    assert len(lines) == 1
    assert "base_encoder.cls_token (1, 1, 32) in the file, (1, 1, 64) here" in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "0"], "--lr 0.0 must be positive"),
    (["--epochs", "-1"], "--epochs -1 must be positive"),
    (["--crop-min", "1.5"], "--crop-min 1.5"),
    (["--workers", "-1"], "--workers -1"),
])
def test_cli_probe_bad_options(tmp_path, capsys, args, fragment):
    write_checkpoint(tmp_path / "checkpoint.pth")
    status, lines = run_main(capsys, "probe", "--checkpoint", tmp_path / "checkpoint.pth", *args)
    assert status == 2
    assert len(lines) == 1
    assert fragment in lines[0]


def test_cli_bad_checkpoint_exit_status(tmp_path):
    (tmp_path / "file.pth").write_text("not a checkpoint\n")
    result = run_cli("probe", "--checkpoint", tmp_path / "file.pth", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_cli_export_writes_timm_file(tmp_path, capsys):
    moco = write_checkpoint(tmp_path / "checkpoint.pth")
    status = mocov3.main(["export", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                          "--out", str(tmp_path / "vit.pth")])
    assert status == 0
    assert "num_heads=2" in capsys.readouterr().out
    saved = torch.load(tmp_path / "vit.pth", weights_only=True)
    expected = mocov3.export_timm_state_dict(moco.base_encoder)
    assert saved["model"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(saved["model"][key], value), key


def test_cli_export_rejects_missing_folder(tmp_path, capsys):
    write_checkpoint(tmp_path / "checkpoint.pth")
    status, lines = run_main(capsys, "export", "--checkpoint", tmp_path / "checkpoint.pth",
                             "--out", tmp_path / "absent" / "vit.pth")
    assert status == 2
    assert "--out" in lines[0]


def test_cli_export_keeps_existing_files(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pth"
    write_checkpoint(checkpoint)
    size = checkpoint.stat().st_size
    # --out equal to --checkpoint: rejected even with --overwrite
    for extra in ([], ["--overwrite"]):
        status, lines = run_main(capsys, "export", "--checkpoint", checkpoint, "--out",
                                 checkpoint, *extra)
        assert status == 2
        assert lines == [f"error: --out {checkpoint} is the --checkpoint itself, and writing the "
                         "backbone over it would lose the training state; pass another --out"]
        assert checkpoint.stat().st_size == size
    # another existing file: replaced only with --overwrite
    out = tmp_path / "vit.pth"
    out.write_text("earlier export")
    status, lines = run_main(capsys, "export", "--checkpoint", checkpoint, "--out", out)
    assert status == 2
    assert "already exists; pass --overwrite" in lines[0]
    assert out.read_text() == "earlier export"
    assert mocov3.main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                        "--overwrite"]) == 0
    assert "model" in torch.load(out, weights_only=True)


def test_cli_probe_bn_rejects_batch_of_one(tmp_path, capsys):
    write_checkpoint(tmp_path / "checkpoint.pth")
    status, lines = run_main(capsys, "probe", "--checkpoint", tmp_path / "checkpoint.pth",
                             "--probe-bn", "--batch-size", "1")
    assert status == 2
    assert len(lines) == 1
    assert "--batch-size 1 gives 1 image per process" in lines[0]
    assert "pass at least 2" in lines[0]


def test_cli_help_mentions_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mocov3.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for command in ("probe --checkpoint", "knn --checkpoint", "export --checkpoint"):
        assert command in text


@pytest.mark.parametrize("command, option", [
    ("probe", "--probe-bn"), ("knn", "--knn-k"), ("export", "--out")])
def test_cli_subcommand_help(capsys, command, option):
    with pytest.raises(SystemExit) as exit_info:
        mocov3.main([command, "--help"])
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Pretrain a tiny ViT for one epoch on 256 Fashion-MNIST images; return its folder."""
    out = tmp_path_factory.mktemp("pretrain")
    result = run_cli("--subset", 256, "--batch-size", 64, "--epochs", 1, "--eval-subset", 200,
                     "--workers", 0, "--no-progress", "--dim", 32, "--depth", 2, "--heads", 2,
                     "--mlp-dim", 64, "--data-root", "/nonexistent", "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out


@needs_fashion_mnist
def test_cli_knn_matches_training_monitor(pretrained, tmp_path):
    result = run_cli("knn", "--checkpoint", pretrained / "checkpoint-epoch0001.pth",
                     "--workers", 0, "--data-root", "/nonexistent", "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "kNN top-1" in result.stdout
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    monitor = [r for r in records if "knn_top1" in r][-1]
    assert monitor["epoch"] == 1
    (record,) = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert record["eval_subset"] == 200  # the checkpoint's, by default
    assert record["seed"] == 0
    assert record["knn_top1"] == monitor["knn_top1"]


@needs_fashion_mnist
def test_cli_probe_end_to_end(pretrained, tmp_path):
    result = run_cli("probe", "--checkpoint", pretrained / "checkpoint-epoch0001.pth",
                     "--subset", 256, "--test-subset", 200, "--epochs", 2, "--batch-size", 64,
                     "--probe-bn", "--workers", 0, "--no-progress", "--data-root", "/nonexistent",
                     "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "probe epoch 2/2" in result.stdout
    assert "linear probe top-1" in result.stdout
    (record,) = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert record["train_images"] == 256
    assert record["test_images"] == 200
    assert record["probe_bn"] is True
    assert record["lr"] == mocov3.PROBE_CPU_DEFAULTS["lr"]
    # 10 classes: a probe on even weak features beats chance (10%)
    assert record["probe_top1"] > 10.0


# ------------------------------------------------------------------ baselines: pixels, init

@needs_fashion_mnist
def test_cli_knn_random_init_equals_epoch0(pretrained, tmp_path):
    result = run_cli("knn", "--checkpoint", pretrained / "checkpoint-epoch0001.pth",
                     "--random-init", "--workers", 0, "--data-root", "/nonexistent",
                     "--output-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    (monitor,) = [r for r in records if r.get("epoch") == 0 and "knn_top1" in r]
    (record,) = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert record["weights"] == "random-init"
    assert record["knn_top1"] == monitor["knn_top1"]


@needs_fashion_mnist
def test_cli_knn_pixels_ignores_weights(tmp_path, capsys):
    """Raw-pixel kNN: the same result for two checkpoints, equal to kNN on flattened images."""
    results = []
    for seed in (0, 1):
        write_checkpoint(tmp_path / f"checkpoint{seed}.pth", config_overrides=dict(seed=seed))
        status = mocov3.main(["knn", "--checkpoint", str(tmp_path / f"checkpoint{seed}.pth"),
                              "--pixels", "--seed", "0", "--eval-subset", "300", "--knn-k", "20",
                              "--workers", "0", "--data-root", "/nonexistent",
                              "--output-dir", str(tmp_path)])
        assert status == 0
    records = [json.loads(line) for line in (tmp_path / "knn.jsonl").read_text().splitlines()]
    assert [r["weights"] for r in records] == ["pixels", "pixels"]
    assert records[0]["knn_top1"] == records[1]["knn_top1"]

    args = argparse.Namespace(data="fashion-mnist", data_root="/nonexistent", image_size=28,
                              eval_subset=300, seed=0)
    splits, normalization = mocov3.load_datasets(args)
    eval_sets = mocov3.build_eval_data(args, splits, normalization)
    flat = {}
    for split, dataset in eval_sets.items():
        images, labels = zip(*[dataset[i] for i in range(len(dataset))])
        flat[split] = F.normalize(torch.stack(images).flatten(1), dim=1), torch.tensor(labels)
    predictions = mocov3.knn_predict(*flat["train"], flat["test"][0], 10, k=20)
    expected = 100.0 * (predictions == flat["test"][1]).float().mean().item()
    assert records[0]["knn_top1"] == pytest.approx(expected, abs=1e-4)
    assert records[0]["knn_top1"] > 50  # pixels alone classify Fashion-MNIST well above chance


def test_cli_knn_rejects_two_baselines(tmp_path, capsys):
    write_checkpoint(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit) as exit_info:
        mocov3.main(["knn", "--checkpoint", str(tmp_path / "checkpoint.pth"), "--pixels",
                     "--random-init"])
    assert exit_info.value.code == 2
    assert "--pixels and --random-init" in capsys.readouterr().err


@needs_fashion_mnist
def test_cli_probe_random_init_uses_initial_weights(tmp_path, capsys, monkeypatch):
    """probe --random-init: the backbone is the one pretraining with that seed started from."""
    trained = write_checkpoint(tmp_path / "checkpoint.pth", config_overrides=dict(seed=3))
    perturb(trained, seed=5)  # the weights saved differ from any initialisation
    config = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["config"]
    torch.save(dict(model=trained.state_dict(), epoch=1, step=0, config=config),
               tmp_path / "checkpoint.pth")
    seen = {}

    def fake_probe(backbone, train_set, test_set, num_classes, args, device):
        seen["backbone"] = backbone
        return 12.5, None

    monkeypatch.setattr(mocov3, "linear_probe", fake_probe)
    status = mocov3.main(["probe", "--checkpoint", str(tmp_path / "checkpoint.pth"),
                          "--random-init", "--data-root", "/nonexistent",
                          "--output-dir", str(tmp_path)])
    assert status == 0
    args = mocov3.parse_args(["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
                              "--seed", "3"])
    initial = mocov3.build_model(args, torch.device("cpu")).base_encoder.state_dict()
    for key, value in seen["backbone"].state_dict().items():
        assert torch.equal(value, initial[key]), key
    (record,) = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    assert record["weights"] == "random-init"
    assert "random-init" in capsys.readouterr().out
