"""intrafusion.serialize: pruned networks saved as tensors and plain data, rebuilt into fresh
models."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import randomize_batchnorms
from intrafusion.errors import IntraFusionError
from intrafusion.groups import Pruner
from intrafusion.importance import Scorer
from intrafusion.models import build_model
from intrafusion.models.extra import MLPMixerSmall, MobileNetV2Small, pruner_options
from intrafusion.serialize import FORMAT, VERSION, builtin_spec, load, save

TESTS = Path(__file__).parent


class ResidualConcatNet(nn.Module):
    """A network the library was not written for: a stem conv built without bias (BN folding
    gives it one), a residual block, two branches concatenated, BN, a Linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.left = nn.Conv2d(8, 6, 1)
        self.right = nn.Sequential(nn.Conv2d(8, 10, 3, padding=1, bias=False), nn.BatchNorm2d(10))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(x.mean((2, 3)))


def pruned_user_net() -> nn.Module:
    torch.manual_seed(0)
    model = randomize_batchnorms(ResidualConcatNet())
    pruner = Pruner(model, torch.randn(1, 3, 12, 12))
    pruner.prune(range(len(pruner.groups)), 0.5, "intra_fusion", Scorer("l1"))
    return pruner.model


def pruned_builtin(name: str) -> nn.Module:
    """`name` with random weights and BN statistics, its first and last group pruned at 0.5."""
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model(name, 10))
    pruner = Pruner(model, torch.randn(1, 3, 32, 32))
    pruner.prune([0, len(pruner.groups) - 1], 0.5, "default", Scorer("l1"))
    return pruner.model


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    model = pruned_user_net()
    path = tmp_path_factory.mktemp("serialize") / "user.pt"
    save(model, path)
    return model, path


def widths(model: nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_file_holds_only_tensors_and_plain_data(user_file):
    model, path = user_file
    data = torch.load(path, weights_only=True)

    def leaves(x):
        if isinstance(x, dict):
            return [leaf for k, v in x.items() for leaf in [k, *leaves(v)]]
        if isinstance(x, (list, tuple)):
            return [leaf for v in x for leaf in leaves(v)]
        return [x]

    assert {type(v) for v in leaves(data)} <= {str, int, torch.Tensor, type(None)}
    assert data["format"] == FORMAT and data["version"] == VERSION and data["builtin"] is None
    assert data["modules"]["right.0"]["attributes"]["out_channels"] == 5
    assert set(data["state_dict"]) == set(model.state_dict())


def test_rebuilds_a_user_model_into_a_fresh_instance(user_file):
    model, path = user_file
    fresh = ResidualConcatNet()
    assert fresh.stem[0].bias is None
    loaded = load(path, fresh)
    assert loaded is fresh and widths(loaded) == widths(model)
    assert loaded.stem[0].bias is not None                     # gained by BN folding, restored
    assert loaded.stem[0].out_channels == loaded.stem[1].num_features == 4
    assert (loaded.left.out_channels, loaded.right[0].out_channels) == (3, 5)
    assert loaded.head.in_features == 8
    x = torch.randn(3, 3, 12, 12)
    assert torch.equal(loaded.eval()(x), model(x))


def test_loaded_model_trains(user_file):
    _, path = user_file
    model = load(path, ResidualConcatNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    assert not torch.equal(after["stem.0.weight"], before["stem.0.weight"])
    assert not torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])


def test_new_process_rebuilds_user_and_builtin_models(user_file, tmp_path):
    """The user model, loaded into a fresh instance, and pruned vgg11_bn and resnet18, loaded with
    no model at all, compute in a new Python process exactly what they computed before saving."""
    model, user_path = user_file
    x_user, x_image = torch.randn(3, 3, 12, 12), torch.randn(2, 3, 32, 32)
    expected = {"user": model(x_user)}
    for name in ("vgg11_bn", "resnet18"):
        pruned = pruned_builtin(name)
        save(pruned, tmp_path / f"{name}.pt")
        expected[name] = pruned(x_image)
    torch.save({"user": x_user, "image": x_image}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import intrafusion.serialize as s; "
        "from test_serialize import ResidualConcatNet; d = sys.argv[2]; "
        "x = torch.load(d + '/inputs.pt', weights_only=True); "
        "out = {'user': s.load(sys.argv[3], ResidualConcatNet()).eval()(x['user'])}; "
        "out.update({n: s.load(f'{d}/{n}.pt').eval()(x['image']) "
        "            for n in ('vgg11_bn', 'resnet18')}); "
        "torch.save({k: v.detach() for k, v in out.items()}, d + '/outputs.pt')")
    subprocess.run([sys.executable, "-c", script, str(TESTS), str(tmp_path), str(user_path)],
                   check=True, cwd=TESTS.parent, timeout=120)
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    assert set(outputs) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(outputs[key], value, atol=1e-6, rtol=0), key


@pytest.mark.filterwarnings("ignore:intra_fusion")
@pytest.mark.parametrize("make", [MobileNetV2Small, MLPMixerSmall])
def test_depthwise_and_layernorm_models_round_trip(make, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorms(make())
    pruner = Pruner(model, torch.randn(1, 3, 32, 32), **pruner_options(model))
    pruner.prune(range(len(pruner.groups)), 0.5, "intra_fusion", Scorer("l1"))
    save(pruner.model, tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    for loaded in (load(tmp_path / "m.pt"), load(tmp_path / "m.pt", make())):
        assert type(loaded) is make and widths(loaded) == widths(pruner.model)
        assert torch.allclose(loaded.eval()(x), pruner.model(x), atol=1e-6, rtol=0)
    if make is MobileNetV2Small:
        depthwise = load(tmp_path / "m.pt").features[4].block[3]
        assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == 32
    else:
        assert load(tmp_path / "m.pt").norm.normalized_shape == (16,)


def test_builtin_models_are_recognised(tmp_path):
    assert builtin_spec(build_model("vgg11_bn", 7)) == {"name": "vgg11_bn", "num_classes": 7}
    assert builtin_spec(build_model("vgg11", 10)) == {"name": "vgg11", "num_classes": 10}
    assert builtin_spec(build_model("resnet34", 100)) == {"name": "resnet34", "num_classes": 100}
    assert builtin_spec(MLPMixerSmall(num_classes=3)) == {"name": "mixer", "num_classes": 3}
    assert builtin_spec(MobileNetV2Small(blocks=((1, 16, 1),))) is None      # not the registry's
    assert builtin_spec(ResidualConcatNet()) is None
    assert builtin_spec(nn.Conv2d(3, 3, 1)) is None
    bias_free = build_model("resnet18", 4, state={}).eval()                # the shipped layout
    assert bias_free.conv1.bias is None
    save(bias_free, tmp_path / "r.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load(tmp_path / "r.pt").eval()(x), bias_free(x))


def test_compressed_user_model_round_trips(tmp_path):
    import intrafusion
    torch.manual_seed(0)
    model = randomize_batchnorms(ResidualConcatNet())
    small = intrafusion.compress(model, torch.randn(1, 3, 12, 12), sparsity=0.5)
    intrafusion.save(small, tmp_path / "small.pt")
    loaded = intrafusion.load(tmp_path / "small.pt", ResidualConcatNet())
    assert widths(loaded) == widths(small) and widths(loaded) != widths(model)
    x = torch.randn(4, 3, 12, 12)
    assert torch.equal(loaded.eval()(x), small(x))
    loaded.train()
    assert torch.equal(loaded(x), small.train()(x))             # same BN statistics in train mode
    with pytest.raises(IntraFusionError, match="not built in"):
        intrafusion.load(tmp_path / "small.pt")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_pickled_code_is_refused_and_never_runs(user_file, tmp_path):
    _, path = user_file
    data = torch.load(path, weights_only=True)
    marker = tmp_path / "payload-ran"
    data["state_dict"]["stem.0.weight"] = Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(data, evil)
    torch.load(evil, weights_only=False)            # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(IntraFusionError, match="objects other than tensors"):
        load(evil, ResidualConcatNet())
    with pytest.raises(IntraFusionError, match="objects other than tensors"):
        load(evil)
    assert not marker.exists()


def one_line_error(path, model=None) -> str:
    with pytest.raises(IntraFusionError) as info:
        load(path, model)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unreadable_files_give_one_line_errors(user_file, tmp_path):
    _, path = user_file
    raw = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    assert "not a readable checkpoint" in one_line_error(tmp_path / "truncated.pt",
                                                         ResidualConcatNet())
    for seed in range(5):
        noise = tmp_path / f"noise{seed}.pt"
        generator = torch.Generator().manual_seed(seed)
        noise.write_bytes(torch.randint(0, 256, (4096,), generator=generator,
                                        dtype=torch.uint8).numpy().tobytes())
        assert "not a readable checkpoint" in one_line_error(noise)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty or truncated" in one_line_error(tmp_path / "empty.pt")
    assert "not found" in one_line_error(tmp_path / "missing.pt")
    torch.save(ResidualConcatNet().state_dict(), tmp_path / "plain.pt")
    assert "not a model file written by intrafusion.save" in one_line_error(tmp_path / "plain.pt")


def edited_file_error(path: Path, tmp_path: Path, edit) -> str:
    """The error of loading a copy of the saved file at `path`, with `edit(data)` applied, into a
    fresh ResidualConcatNet."""
    data = torch.load(path, weights_only=True)
    edit(data)
    torch.save(data, tmp_path / "edited.pt")
    return one_line_error(tmp_path / "edited.pt", ResidualConcatNet())


def test_models_that_do_not_fit_give_one_line_errors(user_file):
    _, path = user_file
    assert "module '' is a ResidualConcatNet in the file but a Sequential" in one_line_error(
        path, nn.Sequential())
    extra, fewer, other = ResidualConcatNet(), ResidualConcatNet(), ResidualConcatNet()
    extra.extra = nn.ReLU()
    assert "module 'extra' of the model is not in the file" in one_line_error(path, extra)
    del fewer.right
    assert "module 'right' of the file is not in the model" in one_line_error(path, fewer)
    other.left = nn.Linear(8, 6)
    assert "module 'left' is a Conv2d in the file but a Linear" in one_line_error(path, other)
    assert "not built in" in one_line_error(path)


def test_damaged_files_give_one_line_errors(user_file, tmp_path):
    _, path = user_file

    def error(edit):
        return edited_file_error(path, tmp_path, edit)

    def set_tensor(key, value):
        return lambda data: data["state_dict"].__setitem__(key, value)

    def poison(data):
        data["state_dict"]["head.bias"][1] = float("nan")

    assert "'block.0.bias' is missing" in error(lambda d: d["state_dict"].pop("block.0.bias"))
    assert "unexpected key 'head.extra'" in error(set_tensor("head.extra", torch.zeros(1)))
    assert ("block.0.weight has shape (4, 4, 5, 5), but the layer needs (4, 4, 3, 3)"
            in error(set_tensor("block.0.weight", torch.zeros(4, 4, 5, 5))))
    assert ("'head.weight' has shape (5,) in the file, (5, 16) in the model"
            in error(set_tensor("head.weight", torch.zeros(5))))
    assert "'head.bias' holds NaN" in error(poison)
    assert "groups=3, which does not divide" in error(
        lambda d: d["modules"]["left"]["attributes"].update(groups=3))
    assert "attribute kernel_size=(3, 3) of module 'left'" in error(
        lambda d: d["modules"]["left"]["attributes"].update(kernel_size=(3, 3)))
    assert "version 99" in error(lambda d: d.update(version=99))
    assert "bad module table" in error(lambda d: d["modules"].update(left="Conv2d"))
