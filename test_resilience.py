"""Resuming exactly, never losing a checkpoint, and failing clearly on bad input."""

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

import mocov3

HERE = Path(__file__).resolve().parent

needs_fashion_mnist = pytest.mark.skipif(
    not mocov3.DEBIAN_FASHION_MNIST.is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

# 128 images in batches of 32: 4 steps an epoch, small enough for several runs per test.
QUICK = ["--subset", 128, "--batch-size", 32, "--eval-subset", 64, "--workers", 0,
         "--no-progress", "--log-every", 1, "--keep-checkpoints", 10, "--epochs", 2,
         "--data-root", "/nonexistent-data-root", "--dim", 32, "--depth", 2, "--heads", 2,
         "--mlp-dim", 64]


def command(*args):
    return [sys.executable, str(HERE / "mocov3.py"), *map(str, args)]


def run_cli(*args, timeout=600):
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=timeout)


def losses(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return {(r["epoch"], r["step"]): r["loss"] for r in map(json.loads, lines) if "loss" in r}


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A two-epoch run with every checkpoint kept: the reference for the resume tests."""
    if not mocov3.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(*QUICK, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    return out


# ------------------------------------------------------------------------------ resume exactly

@needs_fashion_mnist
def test_resume_after_epoch_is_bit_exact(uninterrupted, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    start = uninterrupted / "checkpoint-epoch0001.pth"
    result = run_cli(*QUICK, "--output-dir", out, "--resume", start)
    assert result.returncode == 0, result.stderr
    assert_same_weights(weights(out / "checkpoint-epoch0002.pth"),
                        weights(uninterrupted / "checkpoint-epoch0002.pth"))
    reference = losses(uninterrupted)
    for key, loss in losses(out).items():
        assert loss == reference[key], key


@needs_fashion_mnist
def test_sigterm_mid_epoch_then_resume_is_bit_exact(uninterrupted, tmp_path):
    out = tmp_path / "stopped"
    process = subprocess.Popen(command(*QUICK, "--output-dir", out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    # Wait for the second step of epoch 0, then ask the run to stop.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and (0, 2) in losses(out):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by signal" in stdout
    stopped = mocov3.list_checkpoints(out)
    assert len(stopped) == 1
    checkpoint = torch.load(stopped[0], weights_only=True)
    assert checkpoint["epoch"] == 0
    assert 2 <= checkpoint["step"] < 4

    result = run_cli(*QUICK, "--output-dir", out, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert_same_weights(weights(out / "checkpoint-epoch0002.pth"),
                        weights(uninterrupted / "checkpoint-epoch0002.pth"))
    assert losses(out) == losses(uninterrupted)  # every step once, with the same loss


@needs_fashion_mnist
def test_resume_runs_interrupted_evaluation(uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    final = json.loads(lines[-1])
    assert final["epoch"] == 2
    assert "knn_top1" in final
    # As if the run had been stopped during its last evaluation, after the last checkpoint
    metrics.write_text("".join(line + "\n" for line in lines[:-1]))
    result = run_cli(*QUICK, "--output-dir", out, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert metrics.read_text().splitlines() == lines
    # Nothing left to do: a second resume evaluates nothing again
    result = run_cli(*QUICK, "--output-dir", out, "--resume", "auto")
    assert result.returncode == 0, result.stderr
    assert metrics.read_text().splitlines() == lines


def test_resume_auto_starts_fresh_in_empty_folder(tmp_path):
    args = mocov3.parse_args(["--output-dir", str(tmp_path / "new"), "--resume", "auto"])
    mocov3.prepare_output_dir(args)
    assert args.resume is None


def test_resume_auto_picks_latest(tmp_path):
    for name in ("checkpoint-epoch0002.pth", "checkpoint-epoch0010.pth",
                 "checkpoint-epoch0010-step000005.pth", "checkpoint-epoch0009-step000100.pth"):
        (tmp_path / name).write_bytes(b"")
    args = mocov3.parse_args(["--output-dir", str(tmp_path), "--resume", "auto"])
    mocov3.prepare_output_dir(args)
    assert Path(args.resume).name == "checkpoint-epoch0010-step000005.pth"


# ------------------------------------------------------------------------------- checkpoints

def saved_checkpoint(tmp_path, epoch, keep=1):
    torch.manual_seed(0)
    args = mocov3.parse_args(["--keep-checkpoints", str(keep), "--dim", "32", "--depth", "1",
                              "--heads", "2", "--mlp-dim", "16"])
    moco = mocov3.build_model(args, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    path = mocov3.checkpoint_path(tmp_path, epoch, 0)
    mocov3.save_checkpoint(path, moco, optimizer, scaler, epoch, 0, args)
    return path, (moco, optimizer, scaler, args)


def test_crash_during_write_keeps_previous(tmp_path, monkeypatch):
    first, (moco, optimizer, scaler, args) = saved_checkpoint(tmp_path, epoch=1)

    def crash(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    second = mocov3.checkpoint_path(tmp_path, 2, 0)
    with pytest.raises(OSError):
        mocov3.save_checkpoint(second, moco, optimizer, scaler, 2, 0, args)
    assert not second.exists()
    assert mocov3.list_checkpoints(tmp_path) == [first]
    assert mocov3.load_checkpoint(first)["epoch"] == 1


def test_keeps_newest_checkpoints(tmp_path):
    for epoch in range(1, 5):
        saved_checkpoint(tmp_path, epoch, keep=2)
    assert [p.name for p in mocov3.list_checkpoints(tmp_path)] == [
        "checkpoint-epoch0003.pth", "checkpoint-epoch0004.pth"]


def test_checkpoint_loads_with_weights_only(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["arch"] == "vit_nano_cpu"
    assert all(isinstance(v, (str, int, float, bool, type(None)))
               for v in checkpoint["config"].values())


def test_rejects_output_dir_with_checkpoints(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    args = mocov3.parse_args(["--output-dir", str(tmp_path)])
    with pytest.raises(mocov3.UsageError, match="--resume auto.*--overwrite"):
        mocov3.prepare_output_dir(args)
    assert path.exists()
    args = mocov3.parse_args(["--output-dir", str(tmp_path), "--overwrite"])
    output_dir = mocov3.prepare_output_dir(args)
    assert path.exists()  # nothing is deleted until the new run has loaded
    mocov3.create_output_dir(output_dir, args)
    assert not path.exists()


def test_resume_of_older_checkpoint_needs_overwrite(tmp_path):
    older, _ = saved_checkpoint(tmp_path, epoch=1, keep=2)
    newer, _ = saved_checkpoint(tmp_path, epoch=2, keep=2)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 2, "knn_top1": 50.0}\n')
    args = mocov3.parse_args(["--output-dir", str(tmp_path), "--resume", str(older)])
    with pytest.raises(mocov3.UsageError, match="the latest checkpoint-epoch0002.pth"):
        mocov3.prepare_output_dir(args)
    assert newer.exists()
    args = mocov3.parse_args(["--output-dir", str(tmp_path), "--resume", str(older),
                              "--overwrite"])
    output_dir = mocov3.prepare_output_dir(args)
    mocov3.create_output_dir(output_dir, args)
    assert mocov3.list_checkpoints(tmp_path) == [older]  # the resumed one stays
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_auto_with_overwrite_keeps_log(tmp_path):
    latest, _ = saved_checkpoint(tmp_path, epoch=1)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "knn_top1": 50.0}\n')
    args = mocov3.parse_args(["--output-dir", str(tmp_path), "--resume", "auto", "--overwrite"])
    mocov3.create_output_dir(mocov3.prepare_output_dir(args), args)
    assert mocov3.list_checkpoints(tmp_path) == [latest]
    assert (tmp_path / "metrics.jsonl").exists()


def test_failed_overwrite_keeps_earlier_run(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    result = run_cli("--output-dir", tmp_path, "--overwrite", "--data", tmp_path / "missing")
    assert_one_line_error(result, "missing")
    assert path.exists()


def test_failed_run_creates_no_output_dir(tmp_path):
    result = run_cli("--output-dir", tmp_path / "out", "--data", tmp_path / "missing")
    assert_one_line_error(result, "missing")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ fail clearly

def make_image_folder(root, classes=2, per_class=3, size=28):
    from PIL import Image
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), (40 * c, 10 * i, 100)).save(folder / f"{i}.png")
    return root


def test_error_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("--data", tmp_path / "empty", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "empty"), "class")


def test_error_folder_without_class_subfolders(tmp_path):
    from PIL import Image
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (28, 28)).save(flat / "a.png")
    result = run_cli("--data", flat, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(flat), "subfolder")


@pytest.mark.parametrize("workers", [0, 1])
def test_error_names_corrupt_image(tmp_path, workers):
    root = make_image_folder(tmp_path / "images", per_class=8)
    broken = root / "class1" / "5.png"
    broken.write_bytes(broken.read_bytes()[:40])  # truncated
    result = run_cli("--data", root, "--batch-size", 8, "--epochs", 1, "--workers", workers,
                     "--no-progress", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(broken), "delete or replace")


def test_error_non_image_file_with_image_name(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=8)
    fake = root / "class0" / "notes.jpg"
    fake.write_text("not an image")
    result = run_cli("--data", root, "--batch-size", 8, "--epochs", 1, "--workers", 0,
                     "--no-progress", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, str(fake))


def test_error_fewer_images_than_batch(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=3)
    result = run_cli("--data", root, "--batch-size", 8, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "6 training images", "--batch-size 8")


@pytest.mark.parametrize("args, fragments", [
    (["--arch", "resnet50"], ["resnet50", "vit_small"]),
    (["--image-size", "30"], ["--image-size 30", "patch size 4"]),
    (["--dim", "130", "--heads", "2"], ["--dim 130", "divisible by 4"]),
    (["--dim", "128", "--heads", "3"], ["--dim 128", "--heads 3"]),
    (["--epochs", "-1"], ["--epochs -1"]),
    (["--batch-size", "0"], ["--batch-size 0"]),
    (["--lr", "-0.1"], ["--lr -0.1"]),
    (["--lr", "nan"], ["--lr nan", "finite"]),
    (["--weight-decay", "-5"], ["--weight-decay -5"]),
    (["--seed", "99999999999999999999"], ["--seed 99999999999999999999"]),
    (["--device", "foo"], ["--device foo"]),
])
def test_error_bad_configuration(tmp_path, args, fragments):
    result = run_cli(*args, "--output-dir", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_error_checkpoint_missing(tmp_path):
    result = run_cli("--resume", tmp_path / "nope.pth", "--output-dir", tmp_path / "out")
    assert_one_line_error(result, "nope.pth", "no such file")


def test_error_checkpoint_truncated(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(mocov3.UsageError, match="not a readable checkpoint"):
        mocov3.load_checkpoint(path)


def test_error_checkpoint_damaged_inside(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    # Invert 64 bytes in the middle of the largest tensor's data. torch.load would read them
    # without complaint, because the archive and its pickle stay intact.
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    header = entry.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    middle = header + 30 + name_length + extra_length + entry.file_size // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(mocov3.UsageError, match=f"entry {entry.filename} fails its CRC check"):
        mocov3.load_checkpoint(path)


def test_error_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(mocov3.UsageError, match="notes.pth"):
        mocov3.load_checkpoint(text)
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(mocov3.UsageError, match="not a mocov3.py checkpoint"):
        mocov3.load_checkpoint(other)


def test_error_checkpoint_of_other_width(tmp_path):
    path, _ = saved_checkpoint(tmp_path, epoch=1)
    args = mocov3.parse_args(["--dim", "64", "--depth", "1", "--heads", "2", "--mlp-dim", "16"])
    moco = mocov3.build_model(args, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in moco.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(mocov3.UsageError) as error:
        mocov3.restore(mocov3.load_checkpoint(path), path, moco, optimizer, scaler, args)
    message = str(error.value)
    assert "base_encoder.cls_token (1, 1, 32) in the file, (1, 1, 64) here" in message
    assert "dim=32" in message


def test_error_pickled_code_rejected(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(mocov3.UsageError, match="not a readable checkpoint"):
        mocov3.load_checkpoint(path)


@needs_fashion_mnist
def test_non_finite_loss_stops_and_keeps_checkpoint(uninterrupted, tmp_path, monkeypatch,
                                                    capsys):
    out = tmp_path / "nan"
    out.mkdir()
    good = out / "checkpoint-epoch0001.pth"
    good.write_bytes((uninterrupted / "checkpoint-epoch0001.pth").read_bytes())

    forward = mocov3.MoCo.forward
    monkeypatch.setattr(mocov3.MoCo, "forward",
                        lambda self, x1, x2, m: forward(self, x1, x2, m) * math.nan)
    status = mocov3.main([str(a) for a in QUICK] + ["--output-dir", str(out),
                                                     "--resume", "auto"])
    assert status == 1
    message = capsys.readouterr().err
    assert "loss is nan at epoch 1, step 1" in message
    assert mocov3.list_checkpoints(out) == [good]
    assert torch.load(good, weights_only=True)["epoch"] == 1


@needs_fashion_mnist
@pytest.mark.parametrize("args, fragments", [
    (["--batch-size", "1"], ["--batch-size 1", "at least 2"]),
    (["--subset", "10000000"], ["--subset 10000000", "60000"]),
])
def test_error_batch_and_subset_sizes(tmp_path, args, fragments):
    result = run_cli(*args, "--data-root", "/nonexistent-data-root", "--output-dir",
                     tmp_path / "out")
    assert_one_line_error(result, *fragments)


@needs_fashion_mnist
def test_error_output_dir_under_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_cli(*QUICK, "--output-dir", blocker / "run")
    assert_one_line_error(result, str(blocker / "run"))


def test_resume_from_elsewhere_into_occupied_folder(tmp_path):
    (tmp_path / "other").mkdir()
    other, _ = saved_checkpoint(tmp_path / "other", epoch=1)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    kept, _ = saved_checkpoint(occupied, epoch=3)
    args = mocov3.parse_args(["--output-dir", str(occupied), "--resume", str(other)])
    with pytest.raises(mocov3.UsageError, match="already contains checkpoints"):
        mocov3.prepare_output_dir(args)
    assert kept.exists()


def test_resume_with_other_data_rejected(tmp_path):
    path, (moco, optimizer, scaler, _) = saved_checkpoint(tmp_path, epoch=1)
    args = mocov3.parse_args(["--data", "cifar10", "--dim", "32", "--depth", "1", "--heads", "2",
                              "--mlp-dim", "16"])
    with pytest.raises(mocov3.UsageError, match="--data fashion-mnist \\(now cifar10\\)"):
        mocov3.restore(mocov3.load_checkpoint(path), path, moco, optimizer, scaler, args)


def test_error_test_classes_differ(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=3)
    make_image_folder(tmp_path / "data" / "val", classes=2)
    with pytest.raises(mocov3.UsageError, match="class folders of val/ and train/ differ"):
        mocov3.load_image_folder(tmp_path / "data")


def test_sixteen_bit_png_keeps_its_gray(tmp_path):
    import numpy as np
    from PIL import Image
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(path)
    pixels = np.asarray(mocov3.load_image(path))
    assert pixels.shape == (4, 4, 3)
    assert abs(int(pixels.mean()) - 127) <= 1


@needs_fashion_mnist
def test_sigint_during_first_evaluation_stops_at_once(tmp_path):
    process = subprocess.Popen(command("--eval-subset", 10000, "--workers", 0, "--no-progress",
                                       "--data-root", "/nonexistent-data-root",
                                       "--output-dir", tmp_path / "out"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("MoCo v3")  # the kNN evaluation starts now
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "outside training" in stderr


@needs_fashion_mnist
def test_ctrl_c_with_workers_one_line(tmp_path):
    # Ctrl-C on a terminal signals the whole process group: the main process and the workers.
    process = subprocess.Popen(command("--eval-subset", 10000, "--workers", 2, "--no-progress",
                                       "--data-root", "/nonexistent-data-root",
                                       "--output-dir", tmp_path / "out"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    assert process.stdout.readline().startswith("MoCo v3")  # the kNN evaluation starts now
    time.sleep(3)  # the workers are decoding images by now
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "outside training" in stderr


def test_sigterm_during_error_keeps_report(monkeypatch, capsys):
    """Once one process fails, torchrun sends SIGTERM to the others, which may be reporting the
    lost peer already. That report and its status stay, and the handlers are restored."""
    def deliver_sigterm():
        handler = signal.getsignal(signal.SIGTERM)
        assert handler is signal.SIG_IGN or callable(handler)  # SIG_DFL would end the process
        if callable(handler):
            handler(signal.SIGTERM, None)

    def train_losing_its_peer(args):
        signal.signal(signal.SIGTERM, mocov3.request_stop)
        try:
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500")
        finally:
            deliver_sigterm()  # while the error unwinds

    monkeypatch.setattr(mocov3, "train", train_losing_its_peer)
    monkeypatch.setattr(mocov3, "_STOP_SIGNAL", [])
    # The signal comes again while the process group closes, after the report.
    monkeypatch.setattr(mocov3.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(mocov3.dist, "destroy_process_group", deliver_sigterm)
    before = signal.getsignal(signal.SIGTERM)

    assert mocov3.main(["--epochs", "1"]) == 1
    assert "rank 0 stopped: another process failed" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
