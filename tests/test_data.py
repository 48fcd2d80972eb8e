import gzip
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import write_cifar
from intrafusion.experiments import data
from intrafusion.experiments.data import augment, load_dataset, train_batches
from intrafusion.errors import IntraFusionError


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickles_load_as_uint8_tensors(tmp_path, name, classes):
    write_cifar(tmp_path, n_train=40, n_test=20, classes=classes, name=name)
    ds = load_dataset(name, tmp_path, download=False)
    assert ds.train_images.shape == (40, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (20, 3, 32, 32) and ds.test_labels.shape == (20,)
    assert ds.num_classes == classes and int(ds.train_labels.max()) < classes
    x, y = ds.test_tensors()
    mean = torch.tensor(data.CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (ds.test_images.float() / 255 - mean) / std)


def test_cifar_pixel_layout_is_channel_major(tmp_path):
    folder = write_cifar(tmp_path)
    import pickle
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"]
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.test_images[3, 1, 2, 5] == raw[3, 1024 + 2 * 32 + 5]


def test_cifar_archive_with_bad_checksum_is_refused(tmp_path):
    src = tmp_path / "src"
    write_cifar(src)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(IntraFusionError, match="checksum"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_cifar_offline_names_where_to_put_it(tmp_path):
    with pytest.raises(IntraFusionError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path, download=False)


def test_corrupt_cifar_batch(tmp_path):
    folder = write_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(IntraFusionError, match="corrupt dataset file"):
        load_dataset("cifar10", tmp_path, download=False)


def test_unknown_dataset():
    with pytest.raises(IntraFusionError, match="unknown dataset"):
        load_dataset("mnist3d")


needs_fmnist = pytest.mark.skipif(not data.SYSTEM_FASHION_MNIST.is_dir(),
                                  reason="apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fashion_mnist_is_padded_normalized_and_three_channel(tmp_path):
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.train_images.shape == (60000, 1, 32, 32) and ds.test_images.shape == (10000, 1, 32, 32)
    assert (ds.test_images[:, :, :2] == 0).all() and (ds.test_images[:, :, :, -2:] == 0).all()
    assert torch.bincount(ds.test_labels).tolist() == [1000] * 10
    x, _ = ds.test_tensors(limit=5)
    assert x.shape == (5, 3, 32, 32)
    torch.testing.assert_close(x[:, 0], x[:, 2])
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor((0 - 0.2860) / 0.3530))


@needs_fmnist
def test_corrupt_fashion_mnist_file_in_data_dir(tmp_path):
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0" * 10008))
    with pytest.raises(IntraFusionError, match="checksum"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_missing_fashion_mnist_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(IntraFusionError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_augment_crops_and_flips_within_padding():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).view(2, 1, 8, 8)
    out = augment(images, g, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    same = torch.Generator().manual_seed(0)
    torch.testing.assert_close(augment(images, same, padding=2), out)
    zero = augment(images, torch.Generator().manual_seed(1), padding=0)
    for a, b in zip(zero, images):
        assert torch.equal(a, b) or torch.equal(a, b.flip(2))


def test_train_batches_cover_the_set_once(tmp_path):
    write_cifar(tmp_path, n_train=40)
    ds = load_dataset("cifar10", tmp_path, download=False)
    batches = list(train_batches(ds, 16, torch.Generator().manual_seed(0), augmented=False))
    assert [len(y) for _, y in batches] == [16, 16, 8]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(ds.train_labels.tolist())


def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    """A pickle naming any global but numpy's array pieces is refused; its payload never runs."""
    import pickle
    folder = write_cifar(tmp_path)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}))
    with pytest.raises(IntraFusionError, match="corrupt dataset file .*data_batch_2.*refused global"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()
