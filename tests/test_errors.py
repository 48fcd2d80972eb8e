"""Every mistake a person can make gets one line naming the problem and what to do, exit code
2, no traceback, and no output file."""
import datetime
import gzip
import os
import random
import tarfile

import pytest
import torch

from helpers import calibrated_model, narrow_vggs, read_rows, save_checkpoint, write_cifar
from intrafusion.experiments import data as data_module
from intrafusion.storage import load_tensors
from intrafusion.cli import main, train_main
from intrafusion.errors import IntraFusionError
from intrafusion.models import build_model


@pytest.fixture(scope="module")
def env(grid_files, tmp_path_factory):
    """Data, a good checkpoint and a set of broken ones (of the narrow vgg11_bn, see conftest)."""
    with narrow_vggs():
        return broken_checkpoints(*grid_files, tmp_path_factory.mktemp("errors"))


def broken_checkpoints(data, ckpt, root):
    """(data, ckpt, {name: path}): files under `root` that are not, or do not fit, a checkpoint."""
    good = ckpt.read_bytes()
    bad = {"random": random.Random(0).randbytes(4096), "truncated": good[: len(good) // 2], "empty": b""}
    paths = {name: root / f"{name}.ckpt" for name in bad}
    for name, content in bad.items():
        paths[name].write_bytes(content)
    torch.save({"weights": {}}, paths.setdefault("no_state", root / "no_state.ckpt"))
    torch.save({"model_state_dict": {**build_model("vgg11_bn").state_dict(), "extra.weight": torch.ones(1)}},
               paths.setdefault("extra_key", root / "extra_key.ckpt"))
    torch.save({"model_state_dict": build_model("resnet18").state_dict()},
               paths.setdefault("resnet", root / "resnet.ckpt"))
    save_checkpoint(calibrated_model("vgg11_bn", data, classes=100), paths.setdefault("c100", root / "c100.ckpt"))
    torch.save({"model_state_dict": build_model("resnet18", 100).state_dict()},
               paths.setdefault("resnet_c100", root / "resnet_c100.ckpt"))
    torch.save({"model_state_dict": {"features.0.weight": "not a tensor"}},
               paths.setdefault("not_tensor", root / "not_tensor.ckpt"))
    torch.save({"model_state_dict": {"x": datetime.date(2024, 1, 1)}},  # not allowed by weights_only
               paths.setdefault("pickled", root / "pickled.ckpt"))
    return data, ckpt, paths


def fails(capsys, args, message, out):
    """main(args) exits 2 with one line containing `message` and writes nothing at `out`."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob("*.png"))
    return err.strip()


@pytest.mark.parametrize("size", [1, 7, 64, 4096])
def test_arbitrary_bytes_are_never_a_traceback(tmp_path, size):
    """Unpickling random bytes fails with IndexError, struct.error, UnpicklingError, ...: each
    becomes the same IntraFusionError."""
    path = tmp_path / "garbage.ckpt"
    for seed in range(150):
        path.write_bytes(random.Random(seed * 10_000 + size).randbytes(size))
        with pytest.raises(IntraFusionError, match=r"is not a readable checkpoint \((not a file saved by "
                                            r"torch.save|the file is empty or truncated)"):
            load_tensors(path, "hint")


@pytest.fixture()
def base(env, grid_env, tmp_path):
    data, ckpt, _ = env
    out = tmp_path / "out" / "res.csv"
    return ["--data-dir", str(data), "--checkpoint", str(ckpt), "--group_idxs", "7",
            "--sparsities", "0.5", "--out", str(out), "--plot"], out


@pytest.mark.parametrize("args,message", [
    (["--model-name", "vgg12"], "unknown model name 'vgg12'; choose one of vgg11, vgg11_bn"),
    (["--importance_criteria", "l3"], "unknown criterion 'l3'; choose one of l1, l2"),
    (["--target", "nearest"], "unknown target 'nearest'; choose one of most_important, cluster_centroid"),
    (["--source_prob", "softmax"], "unknown source marginal 'softmax'; choose one of uniform, importance"),
    (["--target_prob", "x"], "unknown target marginal 'x'"),
    (["--fusion-rule", "sum"], "unknown fusion rule 'sum'; choose one of fork, mean"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; choose one of cifar10, cifar100, fashion-mnist"),
    (["--methods", "magic"], "unknown method 'magic'"),
    (["--sparsities", "1.0"], "sparsity 1.0 outside [0, 1)"),
    (["--sparsities", "-0.1"], "sparsity -0.1 outside [0, 1)"),
    (["--sparsities", "nan"], "sparsity nan outside [0, 1)"),
    (["--sparsities", "0.99"], "sparsity 0.99 would leave group 7 (8 channels) with no channel"),
    (["--group_idxs", "8"], "group index 8 out of range: the model has 8 groups (0..7)"),
    (["--group_idxs", "-1"], "group index -1 out of range: the model has 8 groups"),
    (["--group_idxs"], "no group given: pass at least one index to --group_idxs"),
    (["--sparsities"], "no sparsity given: pass at least one value to --sparsities"),
    (["--sparsities", "half"], "argument --sparsities: invalid float value: 'half' (see main.py --help)"),
    (["--p", "0"], "p must be positive"),
    (["--checkpoint", "missing.checkpoint"], "checkpoint missing.checkpoint not found: train one"),
])
def test_bad_settings(capsys, base, args, message):
    fails(capsys, base[0] + args, message, base[1])


@pytest.mark.parametrize("name,message", [
    ("random", "is not a readable checkpoint (not a file saved by torch.save"),
    ("truncated", "is not a readable checkpoint (the file is truncated or corrupted)"),
    ("empty", "is not a readable checkpoint (the file is empty or truncated)"),
    ("pickled", "holds objects other than tensors"),
    ("no_state", "is not a checkpoint: expected a dict with 'model_state_dict'"),
    ("extra_key", "does not match the model: unexpected key 'extra.weight'"),
    ("resnet", "does not match the model: key 'features.0.weight' missing (wrong architecture?)"),
    ("c100", "key 'classifier.weight' has shape (100, 64), expected (10, 64)"),
    ("not_tensor", "key 'features.0.weight' is a str, not a tensor"),
])
def test_broken_checkpoints(capsys, env, base, name, message):
    err = fails(capsys, base[0] + ["--checkpoint", str(env[2][name])], message, base[1])
    assert "weights_only" not in err


def test_class_count_of_a_resnet_names_the_linear_layer(capsys, env, base):
    fails(capsys, base[0] + ["--model-name", "resnet18", "--checkpoint", str(env[2]["resnet_c100"])],
          "key 'linear.weight' has shape (100, 512), expected (10, 512)", base[1])


def test_checkpoints_are_loaded_with_weights_only(env, monkeypatch):
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("weights_only")) or real(*a, **k))
    from intrafusion.experiments.checkpoints import read_checkpoint
    read_checkpoint(env[1])
    assert seen == [True]


def test_dataset_missing_offline_says_where_to_put_it(capsys, base, tmp_path, monkeypatch):
    def offline(url, target):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data_module, "_download", offline)
    args = base[0] + ["--data-dir", str(tmp_path / "empty")]
    err = fails(capsys, args, "cifar10 not found and download failed", base[1])
    assert f"in {tmp_path / 'empty'}/ (unpacked to {tmp_path / 'empty' / 'cifar-10-batches-py'}/)" in err
    monkeypatch.setattr(data_module, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    err = fails(capsys, args + ["--dataset", "fashion-mnist"], "fashion-mnist file", base[1])
    assert "apt-get install dataset-fashion-mnist" in err and str(tmp_path / "empty") in err


def test_corrupt_dataset_files(capsys, env, base, tmp_path):
    bad_batch = tmp_path / "batch"
    folder = write_cifar(bad_batch)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:500])
    fails(capsys, base[0] + ["--data-dir", str(bad_batch)], "corrupt dataset file", base[1])

    bad_archive = tmp_path / "archive"
    write_cifar(tmp_path / "src")
    bad_archive.mkdir()
    with tarfile.open(bad_archive / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    fails(capsys, base[0] + ["--data-dir", str(bad_archive)], "md5 checksum mismatch; delete it",
          base[1])

    bad_size = tmp_path / "fmnist"
    bad_size.mkdir()
    (bad_size / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0" * 1000))
    fails(capsys, base[0] + ["--data-dir", str(bad_size), "--dataset", "fashion-mnist"],
          "size or sha256 checksum mismatch", base[1])

    bad_stream = bytearray(gzip.compress(b"\0" * 1000))
    bad_stream[10] = 0xFF  # first deflate block header: reserved block type, a zlib.error
    (bad_size / "train-images-idx3-ubyte.gz").write_bytes(bytes(bad_stream))
    fails(capsys, base[0] + ["--data-dir", str(bad_size), "--dataset", "fashion-mnist"],
          "corrupt dataset file", base[1])


def test_gpu_id_without_a_gpu(capsys, base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(capsys, base[0] + ["--gpu_id", "0"], "--gpu_id 0 given but no such CUDA GPU is available; "
          "use --gpu_id -1 for the CPU", base[1])


def test_output_place_not_writable(capsys, base, tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "res.csv"
    args = base[0] + ["--out", str(out)]
    fails(capsys, args, f"cannot write {out}: {tmp_path / 'a_file'} is not a directory", out)
    fails(capsys, base[0] + ["--out", str(tmp_path)], "it is a directory", base[1])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_without_permission(capsys, base, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    fails(capsys, base[0] + ["--out", str(locked / "res.csv")], "is not writable (Permission denied)",
          locked / "res.csv")


def test_disk_full_while_writing_keeps_whole_rows(capsys, base, monkeypatch):
    args, out = base
    args = args + ["--sparsities", "0.3", "0.5", "0.7"]
    real, rows = os.write, []

    def fills_up(fd, data):
        if bytes(data).startswith(b"vgg11_bn,"):
            rows.append(data)
            if len(rows) == 3:
                real(fd, bytes(data)[:20])
                raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", fills_up)
    assert main(args) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err == (f"error: disk full while writing {out} (No space left on device): free some "
                   "space, then rerun the same command to resume\n")
    assert out.read_bytes().endswith(b"\n") and len(read_rows(out)) == 2
    assert not out.with_suffix(".png").exists()
    assert main(args) == 0
    assert [r["sparsity"] for r in read_rows(out)] == ["0.0", "0.3", "0.3", "0.5", "0.5", "0.7", "0.7"]


def test_training_errors_are_one_line(capsys, env, narrow_vgg, tmp_path, monkeypatch):
    data = env[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        (["--model-name", "vgg12"], "argument --model-name: invalid choice: 'vgg12'"),
        (["--epochs", "0"], "--epochs, --batch-size and --lr must be positive"),
        (["--lr", "nan"], "--epochs, --batch-size and --lr must be positive"),
        (["--momentum", "0"], "--momentum must lie in (0, 1)"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--gpu_id", "0"], "no such CUDA GPU"),
        (["--out", str(tmp_path)], "it is a directory"),
    ]
    for args, message in cases:
        assert train_main(["--dataset", "cifar10", "--data-dir", str(data), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    state = tmp_path / "m.checkpoint.state"
    state.write_bytes(b"garbage")
    assert train_main(["--dataset", "cifar10", "--data-dir", str(data), "--model-name", "vgg11",
                       "--out", str(tmp_path / "m.checkpoint"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "m.checkpoint.state is not a readable checkpoint" in err and "delete it to start training over" in err
    assert not (tmp_path / "m.checkpoint").exists()


def test_training_progress_is_quiet_off_a_terminal(capsys, env, narrow_vgg, tmp_path):
    assert train_main(["--dataset", "cifar10", "--data-dir", str(env[0]), "--model-name", "vgg11",
                       "--epochs", "1", "--batch-size", "20", "--out", str(tmp_path / "m.ckpt")]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "epoch 1/1" in captured.out and "saved" in captured.out
