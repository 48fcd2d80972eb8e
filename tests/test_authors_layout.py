"""The ResNet family loads the authors' checkpoint layout (a bias on every convolution) as well as
the bias-free one of the shipped checkpoints, and both compute the same pruned networks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import read_rows, save_checkpoint
from intrafusion.cli import main
from intrafusion.evaluation import accuracy
from intrafusion.experiments.checkpoints import model_from_state
from intrafusion.experiments.data import load_dataset
from intrafusion.groups import Pruner
from intrafusion.models import build_model

BLOCKS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def authors_layout(name: str, classes: int = 10) -> dict[str, tuple]:
    """Key → shape of the authors' CIFAR ResNet state dict, written out from their definition:
    3×3 stem conv with bias, four stages of blocks whose convs (and 1×1 shortcut conv) all have
    biases, a linear head."""
    kind, counts = BLOCKS[name]
    expansion = 1 if kind == "basic" else 4
    keys: dict[str, tuple] = {}

    def conv_bn(conv: str, bn: str, out: int, inp: int, k: int):
        keys[f"{conv}.weight"], keys[f"{conv}.bias"] = (out, inp, k, k), (out,)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{bn}.{stat}"] = (out,)
        keys[f"{bn}.num_batches_tracked"] = ()

    conv_bn("conv1", "bn1", 64, 3, 3)
    inp = 64
    for stage, (planes, stride, count) in enumerate(zip((64, 128, 256, 512), (1, 2, 2, 2), counts), 1):
        for m in range(count):
            p, s = f"layer{stage}.{m}", stride if m == 0 else 1
            if kind == "basic":
                conv_bn(f"{p}.conv1", f"{p}.bn1", planes, inp, 3)
                conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
            else:
                conv_bn(f"{p}.conv1", f"{p}.bn1", planes, inp, 1)
                conv_bn(f"{p}.conv2", f"{p}.bn2", planes, planes, 3)
                conv_bn(f"{p}.conv3", f"{p}.bn3", planes * expansion, planes, 1)
            if s != 1 or inp != planes * expansion:
                conv_bn(f"{p}.shortcut.0", f"{p}.shortcut.1", planes * expansion, inp, 1)
            inp = planes * expansion
    keys["linear.weight"], keys["linear.bias"] = (classes, inp), (classes,)
    return keys


def authors_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the authors' layout with random He-scaled weights and non-zero conv biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in authors_layout(name).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) > 1:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            state[key] = torch.randn(shape, generator=g) * (2 / fan_in) ** 0.5
        else:   # biases, BN shifts and means; BN scales around 1
            state[key] = torch.randn(shape, generator=g) * 0.1 + key.endswith(".weight")
    return state


def calibrated(model: nn.Module, data_dir) -> nn.Module:
    """Measure every BN's statistics on the data, so predictions vary with the input."""
    ds = load_dataset("cifar10", data_dir, download=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(ds.normalize(torch.cat([ds.train_images, ds.test_images])))
    return model.eval()


def conv_biases_absorbed(state: dict) -> dict:
    """The bias-free equivalent of an authors'-layout state: each conv bias b is dropped and
    subtracted from the running mean of the BN after it (μ' = μ − b), so BN(Wx) = BN(Wx + b)."""
    out = {k: v.clone() for k, v in state.items()}
    for key in [k for k in state if k.endswith(".bias") and ("conv" in k or "shortcut.0" in k)]:
        layer = key[: -len(".bias")]
        bn = layer.replace("shortcut.0", "shortcut.1").rsplit(".", 1)
        bn = ".".join(bn[:-1] + [bn[-1].replace("conv", "bn")])
        out[f"{bn}.running_mean"] -= out.pop(key)
    return out


@pytest.fixture(scope="module")
def checkpoints(grid_files, tmp_path_factory):
    """Calibrated resnet18 and resnet50 checkpoints in the authors' layout, and the bias-free
    equivalent of the resnet18 one (data: the session's tiny CIFAR-10 folder)."""
    data = grid_files[0]
    root = tmp_path_factory.mktemp("authors")
    paths = {}
    for name in BLOCKS:
        model = calibrated(model_from_state(name, 10, authors_state(name), "authors"), data)
        paths[name] = save_checkpoint(model, root / f"{name}.checkpoint")
    state = torch.load(paths["resnet18"], weights_only=True)["model_state_dict"]
    torch.save({"model_state_dict": conv_biases_absorbed(state), "test_accuracy": 10.0, "epoch": 1},
               root / "resnet18_nobias.checkpoint")
    paths["resnet18_nobias"] = root / "resnet18_nobias.checkpoint"
    return data, paths


@pytest.mark.parametrize("name", list(BLOCKS))
def test_built_model_has_exactly_the_authors_keys_and_shapes(name):
    built = {k: tuple(v.shape) for k, v in build_model(name).state_dict().items()}
    assert built == authors_layout(name)
    assert list(built) == list(authors_layout(name))   # same order as their definition


def test_a_bias_free_state_still_builds_the_bias_free_model():
    state = conv_biases_absorbed(authors_state("resnet18"))
    model = model_from_state("resnet18", 10, state, "ours")
    assert model.conv1.bias is None and model.layer2[0].shortcut[0].bias is None
    assert set(model.state_dict()) == set(state)


def test_a_mix_of_layouts_is_refused_naming_the_key():
    state = authors_state("resnet18")
    del state["layer3.1.conv2.bias"]
    with pytest.raises(ValueError, match="key 'layer3.1.conv2.bias' missing"):
        model_from_state("resnet18", 10, state, "mixed")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BLOCKS))
def test_authors_checkpoint_runs_a_grid_cell(checkpoints, tmp_path, name):
    data, paths = checkpoints
    out = tmp_path / "res.csv"
    assert main(["--model-name", name, "--data-dir", str(data), "--checkpoint", str(paths[name]),
                 "--group_idxs", "1", "--sparsities", "0.5", "--out", str(out), "--quiet"]) == 0
    rows = read_rows(out)
    assert [r["method"] for r in rows] == ["none", "default", "intra_fusion"]
    model = model_from_state(name, 10, torch.load(paths[name], weights_only=True)["model_state_dict"], name)
    x, y = load_dataset("cifar10", data, download=False).test_tensors()
    assert float(rows[0]["accuracy"]) == pytest.approx(accuracy(model.eval(), x, y), abs=1e-9)
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert int(rows[1]["params"]) < int(rows[0]["params"])


def test_absorbed_biases_give_the_same_folded_network(checkpoints):
    data, paths = checkpoints
    x = load_dataset("cifar10", data, download=False).test_tensors()[0]
    outputs = []
    for key in ("resnet18", "resnet18_nobias"):
        state = torch.load(paths[key], weights_only=True)["model_state_dict"]
        model = model_from_state("resnet18", 10, state, key).eval()
        assert (model.conv1.bias is None) == (key == "resnet18_nobias")
        with torch.no_grad():
            unfolded = model(x)
        folded_model = Pruner(model, x[:1]).model
        with torch.no_grad():
            folded = folded_model(x)
        torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)
        outputs.append(folded)
    assert outputs[0].abs().max() > 0.1   # not a trivially constant network
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_absorbed_biases_give_the_same_grid_accuracies(checkpoints, tmp_path):
    data, paths = checkpoints
    accuracies = []
    for key in ("resnet18", "resnet18_nobias"):
        out = tmp_path / f"{key}.csv"
        assert main(["--model-name", "resnet18", "--data-dir", str(data), "--checkpoint", str(paths[key]),
                     "--group_idxs", "1", "3", "--sparsities", "0.3", "0.7", "--out", str(out),
                     "--quiet"]) == 0
        accuracies.append([(r["group"], r["sparsity"], r["method"], r["accuracy"]) for r in read_rows(out)])
    assert len(accuracies[0]) == 9 and accuracies[0] == accuracies[1]
    assert len({a for *_, a in accuracies[0]}) > 1   # pruning changed some predictions
