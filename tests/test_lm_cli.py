"""Language models on the command line: `intrafusion compress` / `evaluate` and main.py's grid for
llama_gqa on the python-stdlib corpus, with a tiny model trained for a few steps on a fake corpus
(tests/test_corpus.write_fake_corpus): the reported perplexities against an independent
computation, the two folder formats, the CSV's perplexity column and resuming, the plot's axis,
the data-major evaluator against the naive one, and the refusals."""
from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytestmark = pytest.mark.filterwarnings("ignore:intra_fusion. attention heads of decoder LMs")

import intrafusion  # noqa: E402
from intrafusion.cli import main, package_main  # noqa: E402
from intrafusion.experiments import corpus as corpus_lib  # noqa: E402
from intrafusion.experiments import lm_training as lm  # noqa: E402
from intrafusion.experiments.lm_data import (PerplexityEvaluator, calibration_windows,  # noqa: E402
                                             held_out_windows, lm_costs, open_language_model)
from intrafusion.experiments.plotting import draw, draw_budgets, plot_all  # noqa: E402
from intrafusion.experiments.results import LM_CSV_COLUMNS, read_table  # noqa: E402
from intrafusion.models.lm import load_llama  # noqa: E402

from test_corpus import write_fake_corpus  # noqa: E402

TINY = lm.LMSettings(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=48, vocab_size=300, context=16, batch_size=4, steps=6, lr=1e-2,
                     warmup_steps=2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(corpus root, trained model folder, its metrics)."""
    root = tmp_path_factory.mktemp("lm_env")
    write_fake_corpus(root / "corpus", per_split=4)
    torch.manual_seed(0)
    metrics = lm.train_language_model(TINY, root / "llama_gqa", root / "corpus", log=lambda _: None)
    return root / "corpus", root / "llama_gqa", metrics


def lm_flags(env) -> list[str]:
    corpus, folder, _ = env
    return ["--model-name", "llama_gqa", "--dataset", "python-stdlib", "--checkpoint", str(folder),
            "--corpus-root", str(corpus)]


def compress(env, out, *flags) -> int:
    return package_main(["compress", *lm_flags(env), "--calibration-batches", "2", "--out", str(out), *flags])


def evaluate_json(env, folder, capsys) -> dict:
    capsys.readouterr()
    assert package_main(["evaluate", str(folder), "--dataset", "python-stdlib", "--corpus-root", str(env[0]),
                         "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def by_hand(model, env) -> float:
    """The test perplexity as lm_training measures it (windows of the context, batch by batch)."""
    corpus, folder, _ = env
    tokenizer = corpus_lib.tokenizer_from_json((folder / "tokenizer.json").read_text(), "tokenizer")
    tokens = corpus_lib.encode(tokenizer, corpus_lib.load_corpus(corpus).texts("test"))
    return lm.split_perplexity(model, tokens, TINY.context, batch_size=3)


def test_compress_then_evaluate_a_uniform_model_saved_for_from_pretrained(env, tmp_path, capsys):
    _, folder, metrics = env
    assert compress(env, tmp_path / "small", "--params", "0.8", "--allocation", "uniform",
                    "--method", "intra_fusion_repair") == 0
    report = json.loads((tmp_path / "small.json").read_text())
    base, small = report["base"], report["compressed"]
    assert base["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert 0.75 <= small["block_params"] / base["block_params"] <= 0.8   # 2 KV groups a block: coarse
    assert small["params"] - small["block_params"] == base["params"] - base["block_params"]  # embeddings kept
    assert report["format"] == "save_pretrained" and report["settings"]["calibration_windows"] == 8
    assert {p.name for p in (tmp_path / "small").iterdir()} >= {"config.json", "metrics.json",
                                                                 "model.safetensors", "tokenizer.json"}
    loaded = load_llama(tmp_path / "small")
    assert by_hand(loaded, env) == pytest.approx(small["perplexity"], rel=1e-5)
    assert evaluate_json(env, tmp_path / "small", capsys) == pytest.approx(
        {**small, "tokens": report["test_tokens"], "window_tokens": TINY.context})
    unpruned = lm.load_language_model(folder)[0]
    assert lm_costs(unpruned, TINY.context)["block_params"] == base["block_params"]


def test_a_model_of_several_widths_is_saved_with_intrafusion_save(env, tmp_path, capsys):
    assert compress(env, tmp_path / "small", "--params", "0.6", "--allocation", "global",
                    "--method", "default_reconstruct") == 0
    report = json.loads((tmp_path / "small.json").read_text())
    assert report["format"] == "intrafusion.save"
    assert (tmp_path / "small" / "model.pt").is_file() and not (tmp_path / "small" / "model.safetensors").exists()
    assert len(set(report["units"]["compressed"][::2])) > 1 or len(set(report["units"]["compressed"][1::2])) > 1
    loaded = lm.load_language_model(tmp_path / "small")[0]
    assert by_hand(loaded, env) == pytest.approx(report["compressed"]["perplexity"], rel=1e-5)
    assert evaluate_json(env, tmp_path / "small", capsys)["perplexity"] == pytest.approx(
        report["compressed"]["perplexity"], rel=1e-9)
    # compressing into the same folder again, uniformly: the stale weights file goes
    assert compress(env, tmp_path / "small", "--sparsity", "0.25", "--allocation", "uniform",
                    "--method", "default") == 0
    assert sorted(p.name for p in (tmp_path / "small").glob("model.*")) == ["model.safetensors"]


def test_sensitivity_uses_held_out_windows_and_meets_the_budget(env, tmp_path):
    assert compress(env, tmp_path / "small", "--params", "0.7", "--allocation", "sensitivity",
                    "--method", "default", "--held-out", "5") == 0
    report = json.loads((tmp_path / "small.json").read_text())
    assert report["settings"]["held_out_windows"] == 5
    assert report["kept"]["block_params"] <= 0.7


def test_windows_come_from_their_own_splits(env):
    corpus, folder, _ = env
    inputs = open_language_model("llama_gqa", folder, corpus)
    train, held = inputs.tokens("train"), inputs.tokens("heldout")
    batches = calibration_windows(train, 3, TINY.context)
    assert [tuple(b.shape) for b in batches] == [(4, TINY.context)] * 3
    text = ",".join(map(str, train.tolist())) + ","
    assert all(",".join(map(str, w.tolist())) + "," in text for b in batches for w in b)
    windows = held_out_windows(held, 3, TINY.context)
    full = corpus_lib.eval_windows(held, TINY.context)[0]
    assert windows.shape == (3, TINY.context + 1)
    assert torch.equal(windows[0], full[0]) and torch.equal(windows[-1], full[-1])
    assert torch.equal(held_out_windows(held, 10 ** 6, TINY.context), full)


def test_data_major_perplexities_equal_the_naive_ones(env):
    corpus, folder, _ = env
    inputs = open_language_model("llama_gqa", folder, corpus)
    windows = corpus_lib.eval_windows(inputs.tokens("test"), TINY.context)
    assert len(windows) == 2   # full windows and a tail
    model = inputs.model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = [intrafusion.compress(model, windows[0][:1], sparsity=0.5, groups=[g], method="intra_fusion")
                    for g in (0, 1, 3)]
    fast, naive = PerplexityEvaluator(model, windows), PerplexityEvaluator(model, windows, fast=False)
    got, expected = fast.perplexities(variants), naive.perplexities(variants)
    assert got == pytest.approx(expected, rel=1e-5)
    assert got == pytest.approx([by_hand(v, env) for v in variants], rel=1e-5)
    assert fast.unpruned() == pytest.approx(naive.unpruned(), rel=1e-6)
    assert fast.stats["passes"] == 2 and fast.stats["full"] == 0 and fast.stats["suffix"] == 6
    assert naive.stats["full"] == 2 * (len(variants) + 1)
    # segments: embeddings, layer 0, layer 1, norm and head; groups 0 and 1 are the last layer's
    starts = [fast.parts[0].route(SimpleNamespace(model=v)).start for v in variants]
    assert starts == [2, 2, 1]


def grid(env, out, *flags) -> int:
    return main([*lm_flags(env), "--repair-batches", "2", "--out", str(out), "--quiet", *flags])


def test_grid_writes_perplexities_resumes_and_plots(env, tmp_path):
    _, _, metrics = env
    out = tmp_path / "grid.csv"
    flags = ["--group_idxs", "0", "all", "--sparsities", "0.5", "--methods", "default", "intra_fusion_repair"]
    assert grid(env, out, *flags) == 0
    header, rows = read_table(out)
    assert header == LM_CSV_COLUMNS and "accuracy" not in header
    assert [r["method"] for r in rows] == ["none"] + ["default", "intra_fusion_repair"] * 2
    assert rows[0]["perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    assert all(r["perplexity"] > 1 and r["block_params"] <= rows[0]["block_params"] for r in rows)
    corpus, folder, _ = env
    inputs = open_language_model("llama_gqa", folder, corpus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = intrafusion.compress(inputs.model, torch.zeros(1, 16, dtype=torch.long), sparsity=0.5,
                                     method="default")
    assert rows[3]["perplexity"] == pytest.approx(by_hand(alone, env), rel=1e-5)
    before = out.read_bytes()
    assert grid(env, out, *flags) == 0
    assert out.read_bytes() == before   # every cell known: nothing computed or written again
    fig = draw(rows)
    assert fig.axes[0].get_ylabel().startswith("test perplexity, lower is better")
    assert plot_all(out) == [out.with_suffix(".png")] and out.with_suffix(".png").stat().st_size > 0


def test_grid_budget_cells_are_drawn_against_the_blocks_parameters(env, tmp_path):
    out = tmp_path / "budgets.csv"
    assert grid(env, out, "--params", "0.8", "0.5", "--allocation", "uniform", "global",
                "--methods", "default", "default_repair") == 0
    _, rows = read_table(out)
    cells = [r for r in rows if r["method"] != "none"]
    assert len(cells) == 8 and {r["allocation"] for r in cells} == {"uniform", "global"}
    assert all(r["block_params"] <= r["budget"] * rows[0]["block_params"] for r in cells)
    assert all(set(json.loads(r["sparsities"])) == {"0", "1", "2", "3"} for r in cells)
    ax = draw_budgets(rows).axes[0]
    assert "parameters of the decoder blocks kept" in ax.get_xlabel()
    assert ax.get_ylabel().startswith("test perplexity, lower is better")


def test_a_perplexity_that_spans_decades_is_drawn_on_a_log_axis():
    rows = [dict(model="m", dataset="python-stdlib", criterion="l1", group=g, sparsity=s, method=m,
                 perplexity=p) for g, s, m, p in ((-1, 0.0, "none", 20.0), (0, 0.5, "default", 900.0),
                                                  (0, 0.25, "default", 40.0), (0, 0.5, "intra_fusion", 30.0),
                                                  (0, 0.25, "intra_fusion", 25.0))]
    ax = draw(rows).axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel().endswith("(log scale)")
    narrow = [dict(r, perplexity=min(r["perplexity"], 30.0)) for r in rows]
    assert draw(narrow).axes[0].get_yscale() == "linear"


@pytest.mark.parametrize("argv,match", [
    (["compress", "--model-name", "llama_gqa", "--dataset", "cifar10", "--params", "0.8", "--out", "x"],
     "llama_gqa is a language model: --dataset must be python-stdlib"),
    (["compress", "--model-name", "vgg11_bn", "--dataset", "python-stdlib", "--params", "0.8", "--out", "x"],
     "python-stdlib is a text corpus for language models"),
    (["compress", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--params", "0.8", "--out", "x",
      "--criterion", "chip"], "criterion 'chip' is not available for language models"),
    (["compress", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--params", "0.8", "--out", "x",
      "--allocation", "sensitivity", "--held-out", "0"], "--held-out must be at least 1"),
    (["compress", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--params", "0.8", "--out", "x",
      "--finetune-epochs", "1"], "--finetune-epochs is not available for language models"),
    (["compress", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--params", "0.8", "--out", "x",
      "--calibration-batches", "0", "--method", "default_repair"], "needs calibration data"),
    (["grid", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--workers", "2"],
     "--workers is not available for language models"),
    (["grid", "--model-name", "llama_gqa", "--dataset", "fashion-mnist"], "--dataset must be python-stdlib"),
    (["grid", "--model-name", "llama_gqa", "--dataset", "python-stdlib", "--allocation", "sensitivity",
      "--params", "0.5", "--held-out", "0"], "--held-out must be at least 1"),
])
def test_refusals_are_one_line_before_any_work(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)   # no model folder here: a refusal must come before loading one
    assert package_main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_evaluate_refuses_a_mismatched_dataset_or_corpus(env, tmp_path, capsys):
    assert compress(env, tmp_path / "small", "--sparsity", "0.25", "--allocation", "uniform", "--method",
                    "default") == 0
    capsys.readouterr()
    assert package_main(["evaluate", str(tmp_path / "small"), "--dataset", "cifar10"]) == 2
    assert "is a folder (a compressed language model?)" in capsys.readouterr().err
    other = tmp_path / "other"
    write_fake_corpus(other, per_split=2)
    assert package_main(["evaluate", str(tmp_path / "small"), "--dataset", "python-stdlib",
                         "--corpus-root", str(other)]) == 2
    assert "is not the one the model was trained on" in capsys.readouterr().err
    assert package_main(["evaluate", str(tmp_path / "small.json"), "--dataset", "python-stdlib"]) == 2
    assert "is not a folder" in capsys.readouterr().err
