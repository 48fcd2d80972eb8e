"""main.py with the methods beyond the paper: repair, varfix, whole-network pruning, fine-tuning."""
import pytest

from helpers import narrow_vggs
from intrafusion.cli import main
from intrafusion.groups import FusionSettings
from intrafusion.methods import METHOD_NAMES, get_method
from intrafusion.experiments.results import read_table


@pytest.fixture(scope="module")
def run(grid_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    data, ckpt = grid_files
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--checkpoint", str(ckpt),
            "--group_idxs", "1", "all", "--sparsities", "0.5", "--repair-batches", "1",
            "--finetune-epochs", "2", "--quiet", "--out", str(tmp / "r.csv"), "--methods",
            "default", "intra_fusion_repair", "intra_fusion_varfix"]
    with narrow_vggs():
        assert main(args) == 0
    return tmp, args


def test_rows_for_every_method_group_and_finetuning_epoch(run):
    tmp, _ = run
    _, rows = read_table(tmp / "r.csv")
    cells = {(r["group"], r["method"], r["epoch"]) for r in rows}
    methods = ("default", "intra_fusion_repair", "intra_fusion_varfix")
    expected = {(-1, "none", 0)} | {(g, m, 0) for g in (1, "all") for m in methods}
    expected |= {(g, m + "+ft", e) for g in (1, "all") for m in methods for e in (1, 2)}
    assert cells == expected and len(rows) == len(expected)
    base = next(r for r in rows if r["method"] == "none")
    for r in rows:
        assert 0 <= r["accuracy"] <= 1
        if r["method"] != "none":
            assert r["macs"] < base["macs"] and r["params"] < base["params"]
    whole = next(r for r in rows if r["group"] == "all" and r["method"] == "default")
    one = next(r for r in rows if r["group"] == 1 and r["method"] == "default")
    assert whole["macs"] < one["macs"]


def test_rerun_adds_nothing(run, narrow_vgg, capsys):
    tmp, args = run
    before = (tmp / "r.csv").read_bytes()
    assert main(args) == 0
    assert (tmp / "r.csv").read_bytes() == before
    assert "epoch 2" in capsys.readouterr().out


def test_method_descriptions():
    fusion = FusionSettings(rule="mean")
    described = {n: (get_method(n).pruning, get_method(n).fusion(fusion).rule, get_method(n).repair)
                 for n in METHOD_NAMES}
    assert described == {"default": ("default", "mean", False),
                         "intra_fusion": ("intra_fusion", "mean", False),
                         "default_repair": ("default", "mean", True),
                         "intra_fusion_repair": ("intra_fusion", "mean", True),
                         "intra_fusion_varfix": ("intra_fusion", "varfix", False),
                         "intra_fusion_varfix_repair": ("intra_fusion", "varfix", True),
                         "default_reconstruct": ("default", "mean", False),
                         "intra_fusion_reconstruct": ("intra_fusion", "mean", False)}
    assert {n for n in METHOD_NAMES if get_method(n).reconstruct} == {"default_reconstruct",
                                                                       "intra_fusion_reconstruct"}


def test_unknown_method_and_group_are_one_line_errors(run, narrow_vgg, capsys):
    tmp, args = run
    assert main(args[:-3] + ["foo"]) == 2
    assert main(args[:args.index("--group_idxs") + 1] + ["first"] + args[args.index("--sparsities"):]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown method 'foo'" in err[0] and "first" in err[1]
