"""Training the language model (intrafusion.experiments.lm_training) on a small fake corpus:
the schedule, perplexity against a hand computation, a tiny run that learns, resumes to the
same result and writes a folder that loads back."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from intrafusion.errors import IntraFusionError
from intrafusion.experiments import corpus as c
from intrafusion.experiments import lm_training as lm
from intrafusion.models.lm import llama_gqa

from helpers import ROOT
from test_corpus import write_fake_corpus

TINY = lm.LMSettings(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=300, context=16, batch_size=4, steps=12,
                     lr=1e-2, warmup_steps=2)


def quiet(_line):
    pass


class Bigram(nn.Module):
    """logits[b, t] = table[ids[b, t]]: the next token depends on the current one only, so
    the perplexity of a split does not depend on how it is cut into windows."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, ids):
        return SimpleNamespace(logits=self.table[ids])


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    s = dataclasses.replace(TINY, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert [lm.lr_factor(i, s) for i in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lm.lr_factor(60, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lm.lr_factor(110, s) == pytest.approx(0.1)
    factors = [lm.lr_factor(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_split_perplexity_is_exp_of_the_mean_token_nll():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7, 7, generator=g)
    tokens = torch.randint(0, 7, (45,), generator=g)
    log_p = torch.log_softmax(table, dim=1)
    by_hand = math.exp(-sum(float(log_p[a, b]) for a, b in zip(tokens[:-1], tokens[1:])) / 44)
    for context, batch in ((8, 2), (44, 1), (100, 3)):
        assert lm.split_perplexity(Bigram(table), tokens, context, batch) == pytest.approx(by_hand, rel=1e-5)
    uniform = Bigram(torch.zeros(7, 7))
    assert lm.split_perplexity(uniform, tokens, 8) == pytest.approx(7.0, rel=1e-6)
    with pytest.raises(IntraFusionError, match="fewer than two tokens"):
        lm.split_perplexity(uniform, tokens[:1], 8)


def test_llama_gqa_is_a_causal_lm_with_grouped_query_attention():
    torch.manual_seed(0)
    model = llama_gqa(300, context=16, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, num_hidden_layers=1)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.zeros(2, 5, dtype=torch.long)).logits.shape == (2, 5, 300)


def test_bad_settings_are_refused():
    with pytest.raises(IntraFusionError, match="--steps"):
        dataclasses.replace(TINY, steps=0)
    with pytest.raises(IntraFusionError, match="--warmup-steps"):
        dataclasses.replace(TINY, warmup_steps=12)
    with pytest.raises(IntraFusionError, match="key/value heads"):
        dataclasses.replace(TINY, num_key_value_heads=3)


@pytest.fixture()
def fake_root(tmp_path):
    root = tmp_path / "lib"
    write_fake_corpus(root)
    return root


def test_training_lowers_the_loss_and_ships_a_folder_that_loads(fake_root, tmp_path):
    out = tmp_path / "models" / "lm"
    settings = dataclasses.replace(TINY, steps=30)
    metrics = lm.train_language_model(settings, out, fake_root, command="python train_lm.py x",
                                      log_every=5, eval_every=1000, log=quiet)
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert losses[-1] < losses[0] - 1.0
    assert metrics["test_perplexity"] < settings.vocab_size / 4
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test_perplexity"] == pytest.approx(metrics["test_perplexity"])
    assert on_disk["command"] == "python train_lm.py x" and on_disk["tokens_trained"] == 30 * 4 * 16
    model, tokenizer, loaded = lm.load_language_model(out)
    assert not model.training and loaded["corpus_digest"] == c.load_corpus(fake_root).digest
    tokens = lm.split_tokens(tokenizer, "test", fake_root, loaded["corpus_digest"])
    assert lm.split_perplexity(model, tokens, settings.context) == pytest.approx(metrics["test_perplexity"], rel=1e-5)
    with pytest.raises(IntraFusionError, match="not the one the model was trained on"):
        lm.split_tokens(tokenizer, "test", fake_root, "0" * 64)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(fake_root, tmp_path):
    whole = lm.train_language_model(TINY, tmp_path / "a", fake_root, log=quiet)
    assert lm.train_language_model(TINY, tmp_path / "b", fake_root, stop_after=5, log=quiet) is None
    assert (tmp_path / "b.state").is_file() and not (tmp_path / "b").exists()
    with pytest.raises(IntraFusionError, match="other training settings"):
        lm.train_language_model(dataclasses.replace(TINY, lr=2e-2), tmp_path / "b", fake_root, log=quiet)
    resumed = lm.train_language_model(TINY, tmp_path / "b", fake_root, log=quiet)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert resumed["test_perplexity"] == pytest.approx(whole["test_perplexity"], rel=1e-6)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_a_missing_or_foreign_folder_is_refused(tmp_path):
    with pytest.raises(IntraFusionError, match="not a trained language model"):
        lm.load_language_model(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "metrics.json").write_text('{"dataset": "cifar10"}')
    with pytest.raises(IntraFusionError, match="does not describe"):
        lm.load_language_model(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"dataset": c.DATASET}))
    with pytest.raises(IntraFusionError, match="not a tokenizer.json"):
        lm.load_language_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text(c.train_tokenizer(["x = 1\n"] * 3, 260).to_str())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(IntraFusionError, match="no loadable Llama checkpoint"):
        lm.load_language_model(tmp_path)


def test_train_lm_script_trains_with_its_flags_and_records_the_command(fake_root, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_lm", ROOT / "train_lm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flags = ["--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads", "4",
             "--intermediate-size", "64", "--vocab-size", "300", "--context", "16", "--steps", "6",
             "--warmup-steps", "1", "--threads", "1", "--corpus-root", str(fake_root),
             "--out", str(tmp_path / "m")]
    assert script.main(flags) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["settings"]["num_key_value_heads"] == 2 and metrics["steps"] == 6
    assert metrics["command"].startswith("python train_lm.py --hidden-size 32 ")
    assert "test perplexity" in capsys.readouterr().out
    assert script.main([*flags[:-4], "--corpus-root", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
