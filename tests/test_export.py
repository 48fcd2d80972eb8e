"""ONNX export: onnxruntime gives the torch outputs of pruned networks at any batch size, and a
failed export is one line and leaves no file."""
import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from intrafusion.errors import IntraFusionError  # noqa: E402
from intrafusion.export import export_onnx  # noqa: E402
from intrafusion.groups import Pruner  # noqa: E402
from intrafusion.importance import Scorer  # noqa: E402
from intrafusion.models import build_model, pruner_options  # noqa: E402

from helpers import randomize_batchnorms  # noqa: E402


def pruned(name: str, sparsity: float = 0.5) -> nn.Module:
    """Model `name` with random weights and BN statistics, every group Intra-Fused at `sparsity`."""
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model(name))
    pruner = Pruner(model, torch.randn(1, 3, 32, 32), **pruner_options(model))
    pruner.prune(range(len(pruner.groups)), sparsity, "intra_fusion", Scorer("l1"))
    return pruner.model


def conv_linear_widths(model: nn.Module) -> list[int]:
    return [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def assert_runs_like_torch(model: nn.Module, path, shape=(3, 32, 32)) -> None:
    """The ONNX file at `path` gives the model's outputs to 1e-4 on batches of 16 and 3."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and list(inp.shape[1:]) == list(shape)
    images = torch.randn(16, *shape, generator=torch.Generator().manual_seed(1))
    for batch in (images, images[:3]):
        with torch.inference_mode():
            expected = model(batch)
            expected = getattr(expected, "logits", expected).numpy()
        (got,) = session.run(None, {"input": batch.numpy()})
        assert got.shape == expected.shape == (len(batch), 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18"])
def test_pruned_cnn_matches_torch(name, tmp_path):
    full = conv_linear_widths(build_model(name))
    model = pruned(name)
    widths = conv_linear_widths(model)
    assert sum(widths) < 0.6 * sum(full) and widths[-1] == 10  # pruned; the classifier is kept
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / f"{name}.onnx")
    assert path == tmp_path / f"{name}.onnx" and not list(tmp_path.glob("*.tmp"))
    assert_runs_like_torch(model, path)


@pytest.mark.filterwarnings("ignore:intra_fusion. LayerNorm:UserWarning")
def test_pruned_mixer_matches_torch_and_keeps_modes(tmp_path):
    model = pruned("mixer")
    model.train()
    model.classifier.eval()
    export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "mixer.onnx")
    assert model.training and not model.classifier.training  # every module's mode as it was
    assert_runs_like_torch(model.eval(), tmp_path / "mixer.onnx")


@pytest.mark.filterwarnings("ignore:intra_fusion. :UserWarning")
def test_pruned_vit_exports_its_logits_with_fewer_heads(tmp_path):
    pytest.importorskip("transformers")
    net = pruned("vit_tiny").net  # the transformers model itself: it returns a ModelOutput
    layer = net.vit.layers[0]
    assert net.config.num_attention_heads == 2 and layer.mlp.fc1.out_features == 48  # 4 → 2, 96 → 48
    assert [layer.attention.q_proj.out_features, layer.attention.o_proj.in_features] == [24, 24]
    export_onnx(net, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx")
    assert_runs_like_torch(net, tmp_path / "vit.onnx")


class DictOutput(nn.Module):
    def forward(self, x):
        return {"y": x}


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("model, example, message", [
    (DictOutput(), torch.randn(2, 3), "returns dict, not a tensor nor an output with .logits"),
    (nn.Linear(4, 2), torch.randn(2, 5), "Linear does not run on the example of shape (2, 5): "),
    (DataDependent(), torch.randn(2, 3), "cannot export DataDependent to ONNX: "),
    (nn.Linear(4, 2), [1.0, 2.0], "the example must be a tensor batch"),
])
def test_bad_model_or_example_is_one_line_and_keeps_the_old_file(model, example, message, tmp_path):
    path = tmp_path / "old.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(IntraFusionError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        export_onnx(model, example, path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("where, message", [
    (lambda tmp: tmp, "it is a directory"),
    (lambda tmp: tmp / "file.txt" / "model.onnx", "is not a directory"),
])
def test_unwritable_path_fails_before_exporting(where, message, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(IntraFusionError, match=message):
        export_onnx(nn.Linear(4, 2), torch.randn(1, 4), where(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]



@pytest.fixture
def cli_env(tmp_path):
    """(data folder with tiny generated CIFAR data, a mobilenetv2 checkpoint, compress argv)."""
    from helpers import calibrated_model, save_checkpoint, write_cifar
    data = tmp_path / "data"
    write_cifar(data, n_train=100, n_test=20)
    checkpoint = save_checkpoint(calibrated_model("mobilenetv2", data), tmp_path / "m.checkpoint")
    argv = ["compress", "--model-name", "mobilenetv2", "--dataset", "cifar10", "--data-dir", str(data),
            "--checkpoint", str(checkpoint), "--sparsity", "0.5", "--allocation", "uniform",
            "--method", "intra_fusion", "--calibration-batches", "0", "--out", str(tmp_path / "small.pt")]
    return data, argv


@pytest.mark.slow
def test_compress_command_writes_the_onnx_file_of_the_saved_model(cli_env, tmp_path):
    from intrafusion.cli import package_main
    from intrafusion.serialize import load
    _, argv = cli_env
    assert package_main([*argv, "--onnx", str(tmp_path / "small.onnx")]) == 0
    assert_runs_like_torch(load(tmp_path / "small.pt").eval(), tmp_path / "small.onnx")


def test_compress_command_refuses_an_unwritable_onnx_path_before_any_work(cli_env, tmp_path, capsys):
    from intrafusion.cli import package_main
    _, argv = cli_env
    assert package_main([*argv, "--onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write") and "it is a directory" in err and err.count("\n") == 1
    assert not (tmp_path / "small.pt").exists()
