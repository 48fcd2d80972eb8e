"""Decoder language models (transformers *ForCausalLM from tiny configs, random weights): compress
as they are -> forward, generate with the KV cache, save_pretrained / from_pretrained and
intrafusion.save / load; what is pruned (MLP neurons, whole heads and KV groups), the fusion
invariants of the MLP groups, repair and reconstruction, budgets, and the refusals."""
import copy
import time
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import intrafusion  # noqa: E402
from intrafusion import decoder  # noqa: E402
from intrafusion.decoder import (DecoderPruner, activation_power, decoder_groups, group_slots,  # noqa: E402
                                 lm_cost_model, repair_mlps, score_units)
from intrafusion.errors import IntraFusionError  # noqa: E402
from intrafusion.fusion import channel_features, fusion_maps  # noqa: E402
from intrafusion.groups import FusionSettings  # noqa: E402
from intrafusion.transport import transport_map  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:intra_fusion. attention heads of decoder LMs")

VOCAB = 61
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  max_position_embeddings=64, num_attention_heads=4, bos_token_id=None,
                  eos_token_id=None, pad_token_id=None)


def build(kind: str, seed: int = 0, **changes) -> nn.Module:
    """A tiny causal LM of family `kind`, random weights, eval mode."""
    torch.manual_seed(seed)
    t = transformers
    if kind == "gpt2":
        config = t.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                        n_inner=48, bos_token_id=None, eos_token_id=None), **changes})
        return t.GPT2LMHeadModel(config).eval()
    classes = {"llama": (t.LlamaForCausalLM, t.LlamaConfig, 4),
               "llama_gqa": (t.LlamaForCausalLM, t.LlamaConfig, 2),
               "mistral": (t.MistralForCausalLM, t.MistralConfig, 2),
               "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config, 2),
               "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config, 2)}
    model_class, config_class, kv = classes[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    config = config_class(**{**LLAMA_LIKE, "num_key_value_heads": kv, **extra, **changes})
    return model_class(config).eval()


KINDS = ("llama", "llama_gqa", "mistral", "qwen2", "qwen3", "gpt2")


def ids(batch=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x, use_cache=False).logits


def block_params(model) -> int:
    blocks = decoder.decoder_blocks(model)
    return sum(p.numel() for b in blocks for p in model.get_submodule(b.name).parameters())


def quiet_compress(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return intrafusion.compress(*args, **kwargs)


def uniform_groups(kind, model):
    """Every group for the Llama family; GPT-2's MLPs only (its config cannot describe fewer
    heads: the head size is derived from the hidden size)."""
    groups = decoder_groups(model)
    return None if kind != "gpt2" else [g.index for g in groups if g.kind == "mlp"]


@pytest.mark.parametrize("kind", KINDS)
def test_compress_generate_save_pretrained_and_load(kind, tmp_path):
    model = build(kind)
    x = ids()
    small = quiet_compress(model, x, sparsity=0.5, method="intra_fusion", groups=uniform_groups(kind, model))
    assert type(small) is type(model)
    assert block_params(small) < block_params(model)
    out = logits(small, x)
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()
    prompt = x[:1, :4]
    cached = small.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = small.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, plain)
    small.save_pretrained(tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(logits(again, x), out, rtol=0, atol=1e-5)
    intrafusion.save(small, tmp_path / "small.pt")
    loaded = intrafusion.load(tmp_path / "small.pt", model=build(kind, seed=5))
    torch.testing.assert_close(logits(loaded.eval(), x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_non_uniform_result_warns_and_round_trips_through_intrafusion_save(kind, tmp_path):
    model = build(kind)
    x = ids()
    with pytest.warns(UserWarning, match="intrafusion.save"):
        small = intrafusion.compress(model, x, sparsity=0.5, method="default", groups=[0, 1])
    widths = decoder._widths(small, decoder.decoder_blocks(small))
    assert len(set(widths["intermediate"])) == 2 and len(set(widths["heads"])) == 2
    out = logits(small, x)
    intrafusion.save(small, tmp_path / "small.pt")
    loaded = intrafusion.load(tmp_path / "small.pt", model=build(kind, seed=5)).eval()
    torch.testing.assert_close(logits(loaded, x), out, rtol=0, atol=1e-6)
    cached = loaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, loaded.generate(x[:1, :4], max_new_tokens=5, do_sample=False, use_cache=False))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,rule", [("default", "fork"), ("intra_fusion", "fork"), ("intra_fusion", "mean"),
                                         ("intra_fusion_varfix", "fork")])
def test_sparsity_zero_changes_nothing(kind, method, rule):
    model, x = build(kind), ids()
    small = quiet_compress(model, x, sparsity=0.0, method=method, rule=rule)
    torch.testing.assert_close(logits(small, x), logits(model, x), rtol=0, atol=1e-6)


def zero_units(model, group, pruned):
    """A copy of `model` whose group units `pruned` contribute nothing: their down-projection
    columns (MLP) or output-projection columns (attention) zeroed."""
    copy_ = copy.deepcopy(model)
    slot = next(s for s in group_slots(copy_, group) if not s.out)
    with torch.no_grad():
        slot.module.weight[:, slot.index[pruned].flatten()] = 0
    return copy_


@pytest.mark.parametrize("kind", KINDS)
def test_default_pruning_removes_whole_units(kind):
    """Default pruning of a unit (a neuron, a head, a KV group with its query heads) computes
    what the unpruned model computes with that unit's contribution zeroed."""
    model, x = build(kind), ids()
    expected = model
    for group in decoder_groups(model)[:2]:
        order = torch.argsort(score_units(group_slots(model, group), "l1"), stable=True)
        expected = zero_units(expected, group, order[: len(order) // 2])
    small = quiet_compress(model, x, sparsity=0.5, method="default", groups=[0, 1])
    torch.testing.assert_close(logits(small, x), logits(expected, x), rtol=1e-4, atol=1e-5)


def test_heads_and_kv_groups_leave_with_their_rows():
    model, x = build("llama_gqa"), ids()      # 4 query heads of 8 features sharing 2 KV heads
    attn = model.model.layers[1].self_attn
    q, k, v, o = (attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(),
                  attn.o_proj.weight.detach())
    small = quiet_compress(model, x, sparsity=0.5, method="default", groups=[1])
    new = small.model.layers[1].self_attn
    assert (new.q_proj.out_features, new.k_proj.out_features, new.v_proj.out_features,
            new.o_proj.in_features) == (16, 8, 8, 16)
    kept = next(j for j in range(2) if torch.equal(new.k_proj.weight, k[8 * j:8 * j + 8]))
    torch.testing.assert_close(new.v_proj.weight, v[8 * kept:8 * kept + 8], rtol=0, atol=0)
    torch.testing.assert_close(new.q_proj.weight, q[16 * kept:16 * kept + 16], rtol=0, atol=0)
    torch.testing.assert_close(new.o_proj.weight, o[:, 16 * kept:16 * kept + 16], rtol=0, atol=0)
    assert new.num_key_value_groups == 2
    untouched = small.model.layers[0].self_attn
    assert untouched.q_proj.out_features == 32 and untouched.k_proj.out_features == 16


def query_columns(c_attn_weight, head):
    """Head `head`'s 8 query columns of a GPT-2 c_attn weight (in, 3·width)."""
    return c_attn_weight[:, 8 * head:8 * head + 8]


def test_gpt2_heads_leave_with_their_qkv_columns():
    model, x = build("gpt2"), ids()
    attn = model.transformer.h[1].attn
    c_attn, c_proj = attn.c_attn.weight.detach(), attn.c_proj.weight.detach()
    small = quiet_compress(model, x, sparsity=0.5, method="default", groups=[1])
    new = small.transformer.h[1].attn
    assert (new.num_heads, new.split_size, new.c_attn.nf, new.c_proj.nx) == (2, 16, 48, 16)
    heads = [next(h for h in range(4) if torch.equal(query_columns(new.c_attn.weight, j), query_columns(c_attn, h)))
             for j in range(2)]
    assert heads[0] < heads[1]
    cols = torch.cat([torch.arange(8 * h, 8 * h + 8) for h in heads])
    for part in range(3):
        torch.testing.assert_close(new.c_attn.weight[:, 16 * part:16 * part + 16], c_attn[:, 32 * part + cols])
    torch.testing.assert_close(new.c_proj.weight, c_proj[cols])


def test_groups_are_numbered_from_the_output_mlp_and_attention_apart():
    groups = decoder_groups(build("llama_gqa"))
    assert [(g.index, g.kind, g.block.name) for g in groups] == [
        (0, "mlp", "model.layers.1"), (1, "attention", "model.layers.1"),
        (2, "mlp", "model.layers.0"), (3, "attention", "model.layers.0")]
    assert groups[0].layers == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                "model.layers.1.mlp.down_proj")


def make_duplicates(model, block: int, k: int):
    """Neurons k..2k−1 of the block's MLP become exact copies of neurons 0..k−1 (gate and up rows);
    their down-projection columns are random, so the pair's contributions add up."""
    mlp = model.model.layers[block].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[k:2 * k] = mlp.gate_proj.weight[:k]
        mlp.up_proj.weight[k:2 * k] = mlp.up_proj.weight[:k]


def first_half_scores(n):
    return torch.cat([torch.full((n // 2,), 2.0), torch.ones(n // 2)])


def test_mean_rule_is_exact_when_pruned_neurons_duplicate_kept_ones():
    model, x = build("llama"), ids()
    make_duplicates(model, 1, 24)
    expected = logits(model, x)
    pruner = DecoderPruner(copy.deepcopy(model))
    pruner.prune_group(0, 0.5, True, first_half_scores(48), FusionSettings(rule="mean"))
    assert pruner.model.model.layers[1].mlp.down_proj.in_features == 24
    torch.testing.assert_close(logits(pruner.model, x), expected, rtol=1e-4, atol=1e-5)
    default = DecoderPruner(copy.deepcopy(model))
    default.prune_group(0, 0.5, False, first_half_scores(48))
    assert not torch.allclose(logits(default.model, x), expected, atol=1e-3)


def test_fork_rule_doubles_duplicated_rows():
    model = build("llama")
    make_duplicates(model, 1, 24)
    gate = model.model.layers[1].mlp.gate_proj.weight.detach().clone()
    pruner = DecoderPruner(copy.deepcopy(model))
    pruner.prune_group(0, 0.5, True, first_half_scores(48), FusionSettings(rule="fork"))
    torch.testing.assert_close(pruner.model.model.layers[1].mlp.gate_proj.weight, 2 * gate[:24])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fusion_writes_T_rows_and_T_columns(kind):
    """gate/up rows (c_fc columns) become A_out @ rows and the down-projection's columns (c_proj
    rows) cols @ A_inᵀ, with T the transport map of the group's features."""
    model = build(kind)
    group = decoder_groups(model)[0]
    slots = group_slots(model, group)
    before = [s.module.weight.detach().clone() for s in slots]
    bias = slots[0].module.bias.detach().clone() if slots[0].module.bias is not None else None
    scores = score_units(slots, "l1")
    keep = torch.sort(torch.argsort(scores, descending=True)[:24]).values
    T = transport_map(channel_features(slots), keep, scores)
    for rule in ("fork", "mean"):
        pruner = DecoderPruner(copy.deepcopy(model))
        pruner.prune_group(0, 0.5, True, scores, FusionSettings(rule=rule))
        a_out, a_in = fusion_maps(T, rule)
        after = group_slots(pruner.model, pruner.groups[0])
        for s, w in zip(after, before):
            expected = a_out @ w if s.out else w @ a_in.T
            torch.testing.assert_close(s.module.weight, expected)
        if bias is not None:
            torch.testing.assert_close(after[0].module.bias, a_out @ bias)


def test_intra_fusion_differs_from_default():
    model, x = build("llama_gqa"), ids()
    fused = quiet_compress(model, x, sparsity=0.5, method="intra_fusion")
    default = quiet_compress(model, x, sparsity=0.5, method="default")
    assert not torch.allclose(logits(fused, x), logits(default, x), atol=1e-4)


def down_columns(model, group):
    """(hidden, neurons): the MLP down-projection's weight in Linear orientation."""
    return next(s for s in group_slots(model, group) if not s.out).module.weight.detach()


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
def test_repair_restores_each_kept_neurons_activation_scale(kind):
    """After repair, each kept neuron's activation times the scale repair gave its
    down-projection column has the unpruned neuron's mean square (measured with every earlier
    block repaired, as the repair does block after block)."""
    model, batches = build(kind), [{"input_ids": ids(4, 16, seed=s)} for s in (2, 3)]
    pruner = DecoderPruner(copy.deepcopy(model))
    blocks = pruner.blocks
    reference = activation_power(pruner.model, blocks, batches)
    for g in range(len(pruner.groups)):
        pruner.prune_group(g, 0.5, True, score_units(group_slots(pruner.model, pruner.groups[g]), "l1"))
    mlps = {g.block.name: g for g in pruner.groups if g.kind == "mlp"}
    before = {b: down_columns(pruner.model, g).clone() for b, g in mlps.items()}
    unrepaired = activation_power(pruner.model, blocks, batches)
    repair_mlps(pruner.model, blocks, reference, pruner.neuron_map, batches)
    after = activation_power(pruner.model, blocks, batches)
    for b in blocks:
        scale = (down_columns(pruner.model, mlps[b.name]) / before[b.name])[0].double()
        target = reference[b.name][pruner.neuron_map[b.name]]
        assert not torch.allclose(unrepaired[b.name], target, rtol=1e-2)
        torch.testing.assert_close(after[b.name] * scale.square(), target, rtol=1e-4, atol=1e-12)


def test_data_methods_take_token_batches_and_dicts():
    model, x = build("llama_gqa"), ids()
    batches = [ids(4, 16, seed=2), {"input_ids": ids(4, 16, seed=3), "attention_mask": torch.ones(4, 16)}]
    for method, criterion in (("default_repair", "taylor"), ("intra_fusion_repair", "l2"),
                              ("intra_fusion_reconstruct", "l_inf")):
        small = quiet_compress(model, x, sparsity=0.5, method=method, criterion=criterion, calibration=batches)
        assert torch.isfinite(logits(small, x)).all()
    with pytest.raises(IntraFusionError, match="calibration"):
        quiet_compress(model, x, sparsity=0.5, method="default_repair")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reconstruction_brings_the_logits_back_on_calibration_data(kind):
    model = build(kind)
    batches = [ids(8, 16, seed=s) for s in (2, 3, 4)]
    mlps = [g.index for g in decoder_groups(model) if g.kind == "mlp"]
    errors = {}
    for method in ("default", "default_reconstruct"):
        small = quiet_compress(model, batches[0], sparsity=0.5, method=method, groups=mlps, calibration=batches)
        errors[method] = sum(float((logits(small, b) - logits(model, b)).square().mean()) for b in batches)
    assert errors["default_reconstruct"] < 0.8 * errors["default"]


@pytest.mark.parametrize("kind", ["llama_gqa", "gpt2"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_parameter_budget_counts_the_blocks(kind, allocation):
    model, x = build(kind), ids()
    cost = lm_cost_model(model, decoder_groups(model), {"input_ids": x})
    assert cost.base("params") == block_params(model)
    small = quiet_compress(model, x, params=0.8, allocation=allocation, method="default")
    assert 0.6 < block_params(small) / block_params(model) <= 0.8
    pruned = lm_cost_model(small, decoder_groups(small), {"input_ids": x})
    assert pruned.base("params") == block_params(small)


def test_macs_budget_is_met_with_the_matrix_products_counted():
    model, x = build("llama"), ids()
    cost = lm_cost_model(model, decoder_groups(model), {"input_ids": x})
    # per token and block: q, k, v, o (4·32·32), MLP (3·32·48), scores and values (2·12·32)
    assert cost.base("macs") == 2 * 24 * (4 * 32 * 32 + 3 * 32 * 48 + 2 * 12 * 32)
    small = quiet_compress(model, x, macs=0.6, method="default")
    after = lm_cost_model(small, decoder_groups(small), {"input_ids": x}).base("macs")
    assert 0.4 < after / cost.base("macs") <= 0.6


def test_groups_of_a_12_layer_width_768_model_in_seconds():
    """The structure is read off module names and weight shapes: GPT-2 small's shape (and a
    Llama of the same size with GQA), groups numbered, sliced and scored for every group."""
    t = transformers
    configs = [t.GPT2Config(vocab_size=100, n_embd=768, n_layer=12, n_head=12, n_positions=128,
                            bos_token_id=None, eos_token_id=None),
               t.LlamaConfig(vocab_size=100, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, num_key_value_heads=4)]
    for config, cls in zip(configs, (t.GPT2LMHeadModel, t.LlamaForCausalLM)):
        model = cls(config).eval()
        start = time.perf_counter()
        groups = decoder_groups(model)
        widths = [len(score_units(group_slots(model, g), "l1")) for g in groups]
        seconds = time.perf_counter() - start
        print(f"{cls.__name__} 12 x 768: {len(groups)} groups numbered and scored in {seconds:.3f} s")
        assert len(groups) == 24 and seconds < 30
        assert widths[:2] == ([3072, 12] if cls is t.GPT2LMHeadModel else [3072, 4])


class Wrapped(nn.Module):
    """What the issue passed: a causal LM wrapped so that model(x) returns the logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(x, use_cache=False).logits


class RotateHalf(nn.Module):
    """Not a transformers model: a rotary-style rotate-half, on which torch-pruning's graph walk
    never ends (decoder.py)."""

    def __init__(self):
        super().__init__()
        self.q, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.q(x)
        return self.out(y * 0.5 + torch.cat((-y[..., 8:], y[..., :8]), dim=-1) * 0.25)


@pytest.mark.parametrize("make,match", [
    (lambda: Wrapped(build("llama")), "pass the transformers \\*ForCausalLM itself"),
    (lambda: Wrapped(build("gpt2")), "pass the transformers \\*ForCausalLM itself"),
    (lambda: build("llama").model, "returns a ModelOutput"),
    (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)),
     "returns a ModelOutput"),
])
def test_models_we_cannot_handle_are_refused_at_once(make, match):
    model = make()
    start = time.perf_counter()
    with pytest.raises(IntraFusionError, match=match):
        intrafusion.compress(model, ids(), sparsity=0.5)
    assert time.perf_counter() - start < 5


def test_a_graph_that_never_returns_is_one_error_in_bounded_time(monkeypatch):
    from intrafusion import groups
    monkeypatch.setattr(groups, "GROUPING_SECONDS", 2.0)
    start = time.perf_counter()
    with pytest.raises(IntraFusionError, match="did not return the groups of RotateHalf within 2 s"):
        intrafusion.compress(RotateHalf(), torch.randn(2, 16), sparsity=0.5)
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("options,match", [
    (dict(sparsity=0.9), "with none"),
    (dict(sparsity=0.5, criterion="chip"), "criterion 'chip' is not available"),
    (dict(sparsity=0.5, allocation="sensitivity"), "allocation 'sensitivity' needs held-out token windows"),
    (dict(sparsity=0.5, allocation="bogus"), "allocation 'bogus' is not available"),
    (dict(sparsity=0.5, groups=[7]), "out of range"),
    (dict(sparsity=0.5, calibration=[torch.randn(2, 4)], method="default_repair"), "integer tensor"),
    (dict(sparsity=0.5, calibration=[torch.full((2, 4), VOCAB)], method="default_repair"), "lie in"),
    (dict(sparsity=0.5, calibration=[{"ids": torch.zeros(2, 4, dtype=torch.long)}], method="default_repair"),
     "without input_ids"),
])
def test_bad_options_for_a_language_model(options, match):
    with pytest.raises(IntraFusionError, match=match):
        quiet_compress(build("llama_gqa"), ids(), **options)


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_segments_compose_to_the_logits_bit_for_bit(kind):
    """models.decoders' chain (embeddings, each layer, norm + head) equals the whole forward pass,
    so the data-major evaluator runs variants from their first changed block on."""
    from intrafusion.evaluation import model_segments
    model, x = build(kind), ids(3, 10)
    segments = model_segments(model)
    assert len(segments) == 2 + model.config.num_hidden_layers
    with torch.no_grad():
        h = x
        for _, fn in segments:
            h = fn(model, h)
    assert torch.equal(h, logits(model, x))


def test_sensitivity_allocation_of_a_language_model_profiles_each_group_on_held_out_windows():
    """allocation="sensitivity": every group pruned alone at the ladder's sparsities, the token
    NLL increase measured on the held-out windows by the data-major evaluator (variants from their
    first changed block, the unpruned network once per batch), then the solve; the plan meets
    the budget and the evaluator's perplexities equal a naive whole-forward pass."""
    from types import SimpleNamespace
    from intrafusion import allocation
    from intrafusion.evaluator import GridEvaluator
    model, held_out = build("llama_gqa"), ids(6, 16, seed=3)
    seen = []
    real = allocation.measure_profile

    def spy(base, prune, loss, groups, ladder=allocation.LADDER, **kw):
        profile = real(base, prune, loss, groups, ladder, **kw)
        seen.append((loss.evaluator.segments is not None, dict(loss.evaluator.stats), profile))
        return profile
    decoder.measure_profile = spy
    try:
        small = quiet_compress(model, ids(), params=0.7, allocation="sensitivity", held_out=held_out,
                               method="default")
    finally:
        decoder.measure_profile = real
    (chained, stats, profile), = seen
    assert chained and stats["suffix"] == sum(len(p) for p in profile.values()) and stats["full"] == 0
    assert sorted(profile) == list(range(4)) and all(len(p) >= 2 for p in profile.values())
    blocks = lambda m: sum(p.numel() for layer in m.model.layers for p in layer.parameters())  # noqa: E731
    assert 0.69 <= blocks(small) / blocks(model) <= 0.7 + 1e-9
    fast = GridEvaluator(SimpleNamespace(model=model), held_out, held_out, batch_size=4)
    naive = GridEvaluator(SimpleNamespace(model=model), held_out, held_out, fast=False, batch_size=4)
    variant = SimpleNamespace(model=small)
    assert fast.evaluate([variant], "perplexity")[0] == pytest.approx(
        naive.evaluate([variant], "perplexity")[0], rel=1e-5)
