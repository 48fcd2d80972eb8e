"""Decoder language models (transformers `*ForCausalLM`) pruned as transformers holds them.

Why not torch-pruning's dependency graph: in a Llama-style block the rotary embedding computes
q·cos + rotate_half(q)·sin, where rotate_half slices the head features in two halves and
concatenates them swapped. The graph traces that slice-and-concatenate as an operation on the
channels and it forms a cycle (q → slice → cat → mul → add ← mul ← q); torch-pruning's concat
index mapping adds the offset of the second half (32 for q of width 64) each time round the cycle and
nothing subtracts it, so the indices it propagates grow without end (0–31, 32–63, 64–95, …) and
`get_pruning_group`, which stops only at an index list it has seen before, never returns (each
step also scans the whole growing group: it slows down quadratically). GPT-2's projections are
`Conv1D` modules, which torch-pruning does not know as layers at all. So the groups of the
structures below are numbered here, from the modules' names and weight shapes, in milliseconds.

Recognised blocks (a decoder layer whose children are):
- Llama style (Llama, Mistral, Qwen2, Qwen3, …): `self_attn` with Linear q/k/v/o_proj, an int
  `head_dim` and `num_key_value_groups` (query heads per key/value head), and `mlp` with Linear
  gate/up/down_proj (down(act(gate(x))·up(x))). Qwen3's q_norm/k_norm act on one head's features
  and are shared by all heads, so they keep their size.
- GPT-2 style: `attn` with Conv1D c_attn (q, k and v side by side in its columns) and c_proj, ints
  `num_heads`, `head_dim`, `split_size`, and `mlp` with Conv1D c_fc and c_proj. A Conv1D's weight is
  (in, out): its out-features are columns.

Groups, numbered like the paper's from the output (group 0: the last block's MLP, 1: the last
block's attention, 2: the MLP of the block before, …). Attention and MLP of a block are separate
groups: they share no channel (each reads and writes the residual stream, which is left whole as
for the ViT: embeddings, norms and every output projection's out-features keep the hidden size).
- MLP: one unit per neuron: the gate/up rows (c_fc columns) and the down-projection's column
  (c_proj row). Scored, fused by the transport map and repaired like a CNN's channels.
- Attention: one unit per key/value head and its `num_key_value_groups` query heads (one head
  without GQA): k/v rows of the KV head, q rows of its query heads, o_proj columns of those; for
  GPT-2 the head's q, k and v columns of c_attn and c_proj's rows. Whole units go, so every
  reshape into heads stays valid and the query heads per KV head stay the same. Heads are pruned
  the default way also for Intra-Fusion (see attention.py: averaging heads does not average
  softmax(q·kᵀ)·v, and a head's features are only defined up to rotations). A sound variant would
  keep each kept head's q/k (its attention pattern A_h) and fold a pruned head's value/output map
  W_v,i·W_o,i (rank ≤ head_dim) into a kept head's: exact only when the two heads attend alike
  (A_i = A_j), and the sum has rank up to 2·head_dim, so it must be truncated back (an SVD) to fit
  one head; with rotary embeddings the q/k bases are tied to the rotation frequencies as well.
  Not implemented, not measured.

A unit's score averages, over the group's slots and the unit's positions in each, the criterion's
per-position value (l1: Σ|w|, l2: Σw², l_inf: max|w| along the other axis; taylor: Σ|w·∂L/∂w|
for the next-token loss on the calibration batches, measured once on the unpruned model, whose
positions stay valid until the group is pruned because every layer belongs to one group only).
For one neuron this is torch-pruning's group score (mean over layers); for a head, the mean of
its channels' scores (as attention.py).

Fusing a SwiGLU neuron: gate and up rows are fused with the same out map and the down-projection
columns with the in map, the project's rule for a layer and its consumer (fusion.fusion_maps).
With the mean rule this is exact when the neurons mapped together are identical (same gate and
up rows: the same activation, and their down columns add up); otherwise it is an approximation
twice over: the activation is not linear and silu(ḡ·x)·(ū·x) is not the average of the products.

Repair: pruning MLP neurons leaves the kept neurons of that block as they were, but fusing
changes their rows (an average of several rows has less variance) and every later block sees a
changed residual stream. Each kept neuron's activation (the down-projection's input) is rescaled
so that its root mean square over the calibration tokens is the unpruned network's for the same
original neuron, block after block in execution order, by scaling the down-projection's column (an
exact rescaling of the neuron's contribution). Only the scale, not the mean: the Llama family has
no bias there, and adding one would change the architecture that from_pretrained rebuilds.

Reconstruction (methods with `reconstruct`): after pruning (and repair), the MLP down-projection
of every block from the first changed one on is refit by ridge regression toward its current
weights (reconstruct.refit_linear) on every calibration token, so that the block's output matches
the unpruned block's: the target is the unpruned block output minus the pruned residual stream
entering the MLP's add, so each block also corrects the error the stream carries from the blocks
before it. Attention output projections are not refit.

Widths afterwards: GPT-2's Conv1D `nf`/`nx` and its attention's `num_heads`/`split_size` follow
the weights (Llama-style attention reads the number of heads from the weights' reshape, and the
query heads per KV head do not change). The config follows the weights where every layer has the
same widths: intermediate_size (GPT-2: n_inner), num_attention_heads, num_key_value_heads and
head_dim, so that save_pretrained / from_pretrained rebuild the pruned model. Layers of different
widths, GPT-2 with heads pruned (its config derives the head size from the hidden size) or head
counts that transformers' config rejects cannot be described by the config: such a model is saved
with intrafusion.save and loaded with intrafusion.load(path, model=<a model of the unpruned
config>), which calls `sync_widths`.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .allocation import (LADDER, CostModel, HeldOutLoss, global_ranking, measure_profile, plan_of, snap, solve,
                         uniform)
from .errors import IntraFusionError
from .fusion import Slot
from .groups import FusionSettings, check_sparsity, fuse_channels, kept_count
from .methods import Method
from .models.decoders import Block, decoder_blocks, is_causal_lm, is_conv1d, is_transformers_model, positive_int
from .reconstruct import RIDGE, NormalEquations, linear_rows, refit_linear

LM_CRITERIA = ("l1", "l2", "l_inf", "taylor", "random")
LM_ALLOCATIONS = ("uniform", "global", "sensitivity")


@dataclass(frozen=True)
class LMGroup:
    """A prunable group: paper number, kind ("mlp" or "attention"), its block and the names of
    the layers whose weights it changes."""

    index: int
    kind: str
    block: Block
    layers: tuple[str, ...]


@dataclass
class Transposed:
    """A Conv1D seen as a Linear: weight (out, in), a view of the Conv1D's (in, out) weight, so that
    fusion.fuse_slots' writes land in the Conv1D; the same bias."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def decoder_groups(model: nn.Module) -> list[LMGroup]:
    """The groups of a causal LM in paper order (module docstring); IntraFusionError for a
    causal LM with no recognised block."""
    blocks = decoder_blocks(model)
    if not blocks:
        raise IntraFusionError(f"{type(model).__name__}: no decoder block of a recognised structure "
                               "(Llama-style q/k/v/o_proj + gate/up/down_proj, or GPT-2 c_attn/c_proj "
                               "+ c_fc/c_proj); its groups cannot be numbered")
    names = {"llama": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
             "gpt2": (("c_fc", "c_proj"), ("c_attn", "c_proj"))}
    groups = []
    for block in reversed(blocks):
        mlp, attention = names[block.family]
        for kind, parent, layers in (("mlp", block.mlp, mlp), ("attention", block.attention, attention)):
            groups.append(LMGroup(len(groups), kind, block, tuple(f"{parent}.{n}" for n in layers)))
    return groups


def _matrix(module):
    """`module` as (weight (out, in), bias): a Linear itself, a Conv1D through Transposed."""
    return Transposed(module.weight.T, module.bias) if is_conv1d(module) else module


def _runs(n: int, size: int, offset: int = 0) -> torch.Tensor:
    """(n, size): row u holds positions offset + u·size … offset + (u+1)·size − 1."""
    return torch.arange(n * size).view(n, size) + offset


def group_slots(model: nn.Module, group: LMGroup) -> list[Slot]:
    """The group's slots (fusion.Slot, in Linear orientation) at the model's current widths;
    slot.index (units, m) holds each unit's m positions in that layer."""
    get = model.get_submodule
    if group.kind == "mlp":
        if group.block.family == "llama":
            gate, up, down = (get(n) for n in group.layers)
            n = gate.out_features
            return [Slot(group.layers[0], gate, True, _runs(n, 1)),
                    Slot(group.layers[1], up, True, _runs(n, 1)),
                    Slot(group.layers[2], down, False, _runs(n, 1))]
        fc, proj = (get(n) for n in group.layers)
        n = fc.nf
        return [Slot(group.layers[0], _matrix(fc), True, _runs(n, 1)),
                Slot(group.layers[1], _matrix(proj), False, _runs(n, 1))]
    attn = get(group.block.attention)
    d = attn.head_dim
    if group.block.family == "llama":
        q, k, v, o = (get(n) for n in group.layers)
        units, rep = k.out_features // d, attn.num_key_value_groups
        return [Slot(group.layers[0], q, True, _runs(units, rep * d)),
                Slot(group.layers[1], k, True, _runs(units, d)),
                Slot(group.layers[2], v, True, _runs(units, d)),
                Slot(group.layers[3], o, False, _runs(units, rep * d))]
    c_attn, c_proj = (get(n) for n in group.layers)
    width = c_proj.weight.shape[0]
    units = width // d
    qkv = [Slot(group.layers[0], _matrix(c_attn), True, _runs(units, d, i * width)) for i in range(3)]
    return [*qkv, Slot(group.layers[1], _matrix(c_proj), False, _runs(units, d))]


def _positions(slot: Slot, w: torch.Tensor) -> torch.Tensor:
    """(units, m, along): each unit's rows (out slot) or columns (in slot) of w (out, in)."""
    return w[slot.index] if slot.out else w[:, slot.index].permute(1, 2, 0)


def score_units(slots: list[Slot], criterion: str, gradients: dict | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(units,) importance of every unit of a group (module docstring); higher is more important.
    gradients: {slot name: ∂L/∂weight in Linear orientation} for taylor."""
    n = len(slots[0].index)
    if criterion == "random":
        return torch.rand(n, generator=generator)
    per_slot = []
    for s in slots:
        w = _positions(s, s.module.weight.detach().float())
        if criterion == "l1":
            values = w.abs().sum(-1)
        elif criterion == "l2":
            values = w.square().sum(-1)
        elif criterion == "l_inf":
            values = w.abs().amax(-1)
        else:
            values = (w * _positions(s, gradients[s.name].float())).abs().sum(-1)
        per_slot.append(values.mean(1))
    return torch.stack(per_slot).mean(0)


def _token_batch(batch, what: str) -> dict:
    """{"input_ids": (B, L) integer tensor[, "attention_mask"]} from a tensor or a dict."""
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        if "input_ids" not in batch:
            raise IntraFusionError(f"{what} batches are dicts without input_ids")
        out = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    elif torch.is_tensor(batch):
        out = {"input_ids": batch}
    else:
        raise IntraFusionError(f"{what}: pass token ids (B, L) as tensors or dicts with input_ids, "
                               f"got {type(batch).__name__}")
    ids = out["input_ids"]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        kind = f"{ids.dtype} of shape {tuple(ids.shape)}" if torch.is_tensor(ids) else type(ids).__name__
        raise IntraFusionError(f"{what}: token ids must be an integer tensor (batch, length), got {kind}")
    return out


def token_batches(calibration, vocab: int) -> list[dict]:
    """The calibration data (an iterable of token-id tensors or dicts with input_ids), checked
    against the vocabulary size."""
    batches = [_token_batch(b, "calibration") for b in (calibration or ())]
    for b in batches:
        _check_vocab(b["input_ids"], vocab, "calibration")
    return batches


def _check_vocab(ids: torch.Tensor, vocab: int, what: str) -> None:
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise IntraFusionError(f"{what}: token ids must lie in [0, {vocab}), got "
                               f"{int(ids.min())}..{int(ids.max())}")


def _run(model: nn.Module, batch: dict):
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)


def lm_gradients(model: nn.Module, batches: list[dict], names) -> dict[str, torch.Tensor]:
    """{layer name: mean ∂(next-token cross-entropy)/∂weight, in Linear orientation} of the named
    layers over the calibration batches, model in eval mode; its parameters are left untouched."""
    modules = [model.get_submodule(n) for n in names]
    total = [torch.zeros_like(m.weight) for m in modules]
    device = modules[0].weight.device
    with torch.enable_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["input_ids"]
            if "attention_mask" in batch:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels, use_cache=False).loss
            for t, g in zip(total, torch.autograd.grad(loss, [m.weight for m in modules])):
                t.add_(g)
    return {n: (t.T if is_conv1d(m) else t) / max(len(batches), 1) for n, m, t in zip(names, modules, total)}


@torch.no_grad()
def remove_units(slots: list[Slot], modules: dict[str, nn.Module], pruned: torch.Tensor) -> None:
    """Delete the positions of the `pruned` units (indices into slot.index) from every slot's
    layer (rows and bias of an out slot, columns of an in slot), in place; widths updated."""
    drop: dict[tuple[str, bool], list] = {}
    for s in slots:
        drop.setdefault((s.name, s.out), []).append(s.index[pruned].flatten())
    for (name, out), parts in drop.items():
        module = modules[name]
        conv1d = is_conv1d(module)
        axis = int(conv1d) if out else 1 - int(conv1d)
        keep = torch.ones(module.weight.shape[axis], dtype=torch.bool)
        keep[torch.cat(parts)] = False
        kept = keep.nonzero().flatten()
        w = module.weight
        module.weight = nn.Parameter(w.index_select(axis, kept).clone(), requires_grad=w.requires_grad)
        if out and module.bias is not None:
            module.bias = nn.Parameter(module.bias[kept].clone(), requires_grad=module.bias.requires_grad)
        if conv1d:
            module.nx, module.nf = module.weight.shape
        elif out:
            module.out_features = len(kept)
        else:
            module.in_features = len(kept)


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def _widths(model: nn.Module, blocks: list[Block]) -> dict[str, list[int]]:
    """Per block: MLP neurons, query heads, KV heads and head size."""
    out = {"intermediate": [], "heads": [], "kv_heads": [], "head_dim": []}
    for b in blocks:
        attn, mlp = model.get_submodule(b.attention), model.get_submodule(b.mlp)
        d = attn.head_dim
        if b.family == "llama":
            out["intermediate"].append(mlp.gate_proj.out_features)
            out["heads"].append(attn.q_proj.out_features // d)
            out["kv_heads"].append(attn.k_proj.out_features // d)
        else:
            out["intermediate"].append(mlp.c_fc.nf)
            out["heads"].append(attn.c_proj.weight.shape[0] // d)
            out["kv_heads"].append(attn.c_proj.weight.shape[0] // d)
        out["head_dim"].append(d)
    return out


def _config_fits(config) -> bool:
    """Whether transformers accepts the config as it is (save_pretrained validates it)."""
    validate = getattr(config, "validate", None)
    if not callable(validate):
        return True
    try:
        copy.deepcopy(config).validate()
    except (ValueError, TypeError):
        return False
    return True


def _sync_gpt2_attributes(model: nn.Module) -> None:
    """Every Conv1D's nx/nf, and every GPT-2-style attention's split_size/num_heads, from the
    weights (they lag behind after intrafusion.load or a pruning step)."""
    for module in model.modules():
        if is_conv1d(module):
            module.nx, module.nf = module.weight.shape
    for module in model.modules():
        proj = getattr(module, "c_proj", None)
        if is_conv1d(proj) and positive_int(module, "head_dim") and positive_int(module, "split_size"):
            module.split_size = proj.weight.shape[0]
            module.num_heads = module.split_size // module.head_dim


@torch.no_grad()
def sync_widths(model: nn.Module) -> bool:
    """Bring the width attributes of `model`'s layers (GPT-2: Conv1D nf/nx, num_heads,
    split_size) and `model.config` in line with the weights, in place; whether save_pretrained /
    from_pretrained can rebuild the model (every layer of the same widths, described by a config
    transformers accepts). The config keeps the fields on which the layers differ. A model
    without recognised blocks is left as it is (True)."""
    _sync_gpt2_attributes(model)
    blocks = decoder_blocks(model)
    config = getattr(model, "config", None)
    if not blocks or config is None:
        return not blocks
    widths = {k: _uniform(v) for k, v in _widths(model, blocks).items()}
    gpt2 = blocks[0].family == "gpt2"
    fields = ({"intermediate": "n_inner"} if gpt2 else
              {"intermediate": "intermediate_size", "heads": "num_attention_heads",
               "kv_heads": "num_key_value_heads", "head_dim": "head_dim"})
    for key, field in fields.items():
        if widths[key] is not None:
            setattr(config, field, widths[key])
    if None in widths.values() or (gpt2 and widths["heads"] != config.n_head):
        return False
    return _config_fits(config)


# ---- costs -----------------------------------------------------------------------------------

def _unit_costs(model: nn.Module, group: LMGroup, tokens: int, length: int) -> tuple[float, float]:
    """(MACs, parameters) of one unit of the group: its weights (and out biases), its projections'
    MACs for `tokens` tokens, and for attention its q·kᵀ and attention·v products over sequences of
    `length` (2·length·head_dim per query head and token)."""
    params = macs = 0.0
    for s in group_slots(model, group):
        along = s.module.weight.shape[1 if s.out else 0]
        m = s.index.shape[1]
        params += m * along + (m if s.out and s.module.bias is not None else 0)
        macs += tokens * m * along
    if group.kind == "attention":
        attn = model.get_submodule(group.block.attention)
        heads = getattr(attn, "num_key_value_groups", 1)
        macs += tokens * 2 * length * attn.head_dim * heads
    return macs, params


def lm_cost_model(model: nn.Module, groups: list[LMGroup], example: dict) -> CostModel:
    """An exact CostModel (allocation.CostModel) of the decoder blocks: parameters of the blocks
    (embeddings and the LM head excluded) and MACs of their matrix products for the example
    input, both linear in each group's kept units; widths in units."""
    batch, length = example["input_ids"].shape
    widths, terms, scaled = [], [], 0.0
    for g in groups:
        n = len(group_slots(model, g)[0].index)
        macs, params = _unit_costs(model, g, batch * length, length)
        widths.append(n)
        terms.append((macs * n, params * n, ((g.index, (0.0, 1.0, 0.0), (0.0, 1.0, 0.0)),)))
        scaled += params * n
    blocks = {g.block.name for g in groups}
    total = sum(p.numel() for b in blocks for p in model.get_submodule(b).parameters())
    return CostModel(tuple(widths), tuple(terms), (0.0, float(total - scaled)))


# ---- repair ------------------------------------------------------------------------------------

def _down(model: nn.Module, block: Block) -> nn.Module:
    mlp = model.get_submodule(block.mlp)
    return mlp.down_proj if block.family == "llama" else mlp.c_proj


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer it measures has run."""


def _run_hooked(model: nn.Module, batches, handles) -> None:
    """Run `model` on each batch with the hooks `handles` in place (a hook may end a pass early
    by raising _Stop), then remove them."""
    try:
        for batch in batches:
            try:
                _run(model, batch)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_power(model: nn.Module, blocks: list[Block], batches: list[dict], stop: bool = False
                     ) -> dict[str, torch.Tensor]:
    """{block name: (neurons,) mean square, float64, of each MLP neuron's activation (the
    down-projection's input) over every token of the batches}; stop: end each pass after the
    last named block (its later layers are not needed)."""
    sums: dict[str, list] = {b.name: [0, 0.0] for b in blocks}
    last = blocks[-1].name

    def hook(name):
        def record(_module, inputs):
            h = inputs[0].detach().double()
            sums[name][0] += h.numel() // h.shape[-1]
            sums[name][1] = sums[name][1] + h.square().sum(tuple(range(h.dim() - 1)))
            if stop and name == last:
                raise _Stop
        return record

    _run_hooked(model, batches, [_down(model, b).register_forward_pre_hook(hook(b.name)) for b in blocks])
    return {name: total / max(count, 1) for name, (count, total) in sums.items()}


@torch.no_grad()
def repair_mlps(model: nn.Module, blocks: list[Block], reference: dict[str, torch.Tensor],
                neuron_map: dict[str, torch.Tensor], batches: list[dict]) -> None:
    """Rescale each kept neuron of the given blocks so that its activation's mean square equals
    reference[block][neuron_map[block]] (the unpruned network's at the same original neuron),
    block after block in execution order (a block is measured after the ones before it were
    repaired), through the down-projection's columns; a dead neuron keeps its scale."""
    for block in blocks:
        power = activation_power(model, [block], batches, stop=True)[block.name]
        target = reference[block.name][neuron_map[block.name]]
        scale = torch.where(power > 1e-30, (target / power.clamp_min(1e-30)).sqrt(), torch.ones_like(power))
        down = _down(model, block)
        w = down.weight
        shape = (-1, 1) if is_conv1d(down) else (1, -1)
        w.mul_(scale.to(w).view(shape))


def _as_linear(layer: nn.Module) -> nn.Linear:
    """`layer` itself, or a Linear copy (weight (out, in)) of a Conv1D for the refit."""
    if not is_conv1d(layer):
        return layer
    linear = nn.Linear(layer.nx, layer.nf, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.weight.T)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


@torch.no_grad()
def _block_tensors(model: nn.Module, block: Block, batch: dict) -> dict[str, torch.Tensor]:
    """One forward pass of `batch`, stopped at the end of `block`: its output ("block") and its
    MLP down-projection's input ("in") and output ("out")."""
    got: dict[str, torch.Tensor] = {}

    def at_down(_module, inputs, out):
        got["in"], got["out"] = inputs[0], out

    def at_block(_module, _inputs, out):
        got["block"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    _run_hooked(model, [batch], [_down(model, block).register_forward_hook(at_down),
                                 model.get_submodule(block.name).register_forward_hook(at_block)])
    return got


@torch.no_grad()
def reconstruct_mlps(reference: nn.Module, model: nn.Module, blocks: list[Block], batches: list[dict],
                     alpha: float = RIDGE) -> list[float]:
    """Refit the MLP down-projection of each block, in execution order, on every calibration
    token (module docstring): features the pruned `model`'s input to it, target the unpruned
    `reference`'s block output minus the pruned residual stream entering the MLP's add (as
    reconstruct.py fits a ResNet block at its add). The relative error of each fit."""
    errors = []
    for block in blocks:
        layer = _down(model, block)
        linear, equations = _as_linear(layer), NormalEquations()
        for batch in batches:
            target = _block_tensors(reference, block, batch)["block"]
            got = _block_tensors(model, block, batch)
            wanted = target - got["block"] + got["out"]
            equations.add(linear_rows(linear, got["in"]), wanted.reshape(-1, 1, wanted.shape[-1]))
        errors.append(refit_linear(linear, equations, alpha))
        if linear is not layer:
            layer.weight.copy_(linear.weight.T)
            if layer.bias is not None:
                layer.bias.copy_(linear.bias)
    return errors


# ---- the pruner --------------------------------------------------------------------------------

class DecoderPruner:
    """A causal LM (changed in place) with its numbered groups; prunes them one at a time.

    neuron_map[block name]: the original index of every current MLP neuron of that block (for
    the repair); ignored: names of layers whose groups are left out."""

    def __init__(self, model: nn.Module, ignored=()):
        self.model = model.eval()
        groups = decoder_groups(model)
        skipped = set(ignored)
        kept = [g for g in groups if not skipped & set(g.layers)]
        self.groups = [LMGroup(i, g.kind, g.block, g.layers) for i, g in enumerate(kept)]
        self.blocks = decoder_blocks(model)
        self.neuron_map = {g.block.name: torch.arange(len(group_slots(model, g)[0].index))
                           for g in self.groups if g.kind == "mlp"}
        self.notices: set[str] = set()

    def copy(self) -> "DecoderPruner":
        """An independent copy (the model deep-copied) to prune a variant of this network."""
        twin = copy.copy(self)
        twin.model = copy.deepcopy(self.model)
        twin.neuron_map = dict(self.neuron_map)
        return twin

    def keeping_distances(self):
        """What the CNN Pruner's cache of channel distances is to the sensitivity profile
        (allocation.measure_profile); here nothing is kept: the distances are measured per copy."""
        return contextlib.nullcontext()

    def check_group(self, index) -> LMGroup:
        if not isinstance(index, int) or not 0 <= index < len(self.groups):
            raise IntraFusionError(f"group index {index} out of range: the model has {len(self.groups)} "
                                   f"groups (0..{len(self.groups) - 1})")
        return self.groups[index]

    def width(self, index: int) -> int:
        """Current units (neurons, or KV groups / heads) of group `index`."""
        return len(group_slots(self.model, self.check_group(index))[0].index)

    def check_prunable(self, index: int, sparsity: float) -> int:
        """The units `sparsity` keeps of group `index`; IntraFusionError when none would remain."""
        check_sparsity(sparsity)
        n = self.width(index)
        k = kept_count(n, sparsity)
        if k < 1:
            group = self.groups[index]
            what = "neuron" if group.kind == "mlp" else "head"
            raise IntraFusionError(f"sparsity {sparsity} would leave group {index} ({group.kind} of "
                                   f"{group.block.name}, {n} {what} units) with none")
        return k

    def prune_group(self, index: int, sparsity: float, fuse: bool, scores: torch.Tensor,
                    fusion: FusionSettings = FusionSettings()) -> None:
        """Prune group `index` at `sparsity`, in place: the lowest-scored units go (scores
        (units,), ties: lower index first); MLP neurons are fused into the kept ones first when
        `fuse`; attention units are always pruned whole, the default way."""
        group = self.groups[index]
        k = self.check_prunable(index, sparsity)
        slots = group_slots(self.model, group)
        order = torch.argsort(scores.cpu().float(), stable=True)
        n = len(order)
        pruned, keep = order[: n - k].sort().values, order[n - k:].sort().values
        if fuse and group.kind == "mlp":
            fuse_channels(slots, keep, scores.cpu().float(), fusion)
        elif fuse and "heads" not in self.notices:
            self.notices.add("heads")
            warnings.warn("intra_fusion: attention heads of decoder LMs are pruned whole, the default "
                          "way (averaging heads does not average softmax(q·kᵀ)·v; see "
                          "intrafusion/attention.py)", stacklevel=3)
        if len(pruned):
            remove_units(slots, dict(self.model.named_modules()), pruned)
            if group.kind == "mlp":
                self.neuron_map[group.block.name] = self.neuron_map[group.block.name][keep]
        sync_widths(self.model)


def _check_options(method: Method, criterion, allocation: str, batches: list, held_out) -> None:
    if not isinstance(criterion, str) or criterion not in LM_CRITERIA:
        raise IntraFusionError(f"criterion {criterion!r} is not available for decoder language models; "
                               f"choose one of {', '.join(LM_CRITERIA)}")
    if criterion == "taylor" and not batches:
        raise IntraFusionError("criterion 'taylor' needs calibration data: pass calibration= (token ids)")
    if allocation not in LM_ALLOCATIONS:
        raise IntraFusionError(f"allocation {allocation!r} is not available for decoder language models; "
                               f"choose one of {', '.join(LM_ALLOCATIONS)}")
    if method.needs_data and not batches:
        raise IntraFusionError(f"method {method.name!r} needs calibration data: pass calibration= "
                               "(token ids)")
    if allocation == "sensitivity" and held_out is None:
        raise IntraFusionError("allocation 'sensitivity' needs held-out token windows: pass held_out= "
                               "(token ids (N, L) never used for calibration, nor the test set)")


def method_pruner(pruner: DecoderPruner, method: Method, criterion: str, gradients: dict | None,
                  batches: list[dict], fusion: FusionSettings, seed: int = 0):
    """prune(variant, plan): `method` applied at the {group: sparsity} plan to `variant` (pruner
    itself, or a copy of it while pruner stays unpruned): units scored by `criterion` (taylor:
    with the unpruned network's `gradients`), MLP neurons fused when the method fuses, then
    repaired and reconstructed against pruner's unpruned network, measured on the calibration
    `batches` once for all variants."""
    model = pruner.model
    mlp_blocks = [b for b in pruner.blocks if any(g.block == b and g.kind == "mlp" for g in pruner.groups)]
    power = activation_power(model, mlp_blocks, batches) if method.repair and mlp_blocks else None
    reference = copy.deepcopy(model) if method.reconstruct else None

    def prune(variant: DecoderPruner, plan: dict[int, float]) -> None:
        generator = torch.Generator().manual_seed(seed)
        for g, sparsity in plan.items():
            scores = score_units(group_slots(variant.model, variant.groups[g]), criterion, gradients, generator)
            variant.prune_group(g, sparsity, method.fuse, scores, method.fusion(fusion))
        pruned = {variant.groups[g].block for g in plan}
        if power is not None:
            repair_mlps(variant.model, [b for b in mlp_blocks if b in pruned], power, variant.neuron_map, batches)
        if reference is not None and plan:
            first = min(variant.blocks.index(b) for b in pruned)
            reconstruct_mlps(reference, variant.model, variant.blocks[first:], batches)
    return prune


def lm_plan(pruner: DecoderPruner, indices: list[int], budget: tuple[str, float], allocation: str,
            example: dict, scores, round_to: int | None, prune=None, held_out=None) -> dict[int, float]:
    """{group index: sparsity} meeting `budget` (kind, value) with `allocation` (uniform: one
    sparsity everywhere; global: every unit ranked by its score over its group's mean score;
    sensitivity: each group pruned alone by prune(variant, plan) at the ladder's sparsities, the
    increase of the mean token NLL on the `held_out` windows (N, L) measured by the data-major
    evaluator, and the plan of least predicted increase solved); round_to: keep each pruned
    group's width (in its units) a multiple of it."""
    kind, value = budget
    if kind == "sparsity" and allocation == "uniform" and not round_to:
        for g in indices:
            pruner.check_prunable(g, value)
        return dict.fromkeys(indices, value)
    model = lm_cost_model(pruner.model, pruner.groups, example)
    if kind == "sparsity" and allocation == "uniform":
        kept = {g: snap(model.widths[g], kept_count(model.widths[g], value), round_to) for g in indices}
    elif allocation == "uniform":
        kept = uniform(model, indices, kind, value, round_to)
    elif allocation == "global":
        normalized = {}
        for g in indices:
            s = scores(g).clamp_min(0)
            normalized[g] = s / s.mean().clamp_min(1e-12)
        kept = global_ranking(model, normalized, kind, value, round_to)
    else:
        windows = _token_batch(held_out, "held_out")["input_ids"]
        _check_vocab(windows, pruner.model.get_input_embeddings().num_embeddings, "held_out")
        loss = HeldOutLoss(pruner, windows, windows)
        profile = measure_profile(pruner, prune, loss, indices, LADDER)
        kept = solve(model, profile, kind, value, round_to)
    return plan_of(model, kept)


def compress_lm(model: nn.Module, example_inputs, budget: tuple[str, float], method: Method,
                criterion="l1", calibration=None, groups=None, allocation: str = "uniform",
                round_to: int | None = None, ignored_layers=(), fusion: FusionSettings = FusionSettings(),
                seed: int = 0, held_out=None) -> nn.Module:
    """A pruned copy of the causal LM `model` (left untouched), the same class, smaller; see the
    module docstring for what is pruned and how, and api.compress for the arguments (budget: the
    (kind, value) of allocation.one_budget; params / macs are fractions of the decoder blocks').
    example_inputs: token ids (B, L) or a dict with input_ids; calibration: an iterable of them;
    held_out: token windows (N, L) for the sensitivity allocation (its profiles are not cached).
    Warns when the result cannot be saved with save_pretrained (then use intrafusion.save)."""
    example = _token_batch(example_inputs, "example_inputs")
    vocab = model.get_input_embeddings().num_embeddings
    _check_vocab(example["input_ids"], vocab, "example_inputs")
    batches = token_batches(calibration, vocab)
    _check_options(method, criterion, allocation, batches, held_out)
    names = {m: n for n, m in model.named_modules()}
    if any(m not in names for m in ignored_layers):
        raise IntraFusionError("an ignored layer is not a module of the model")
    ignored = [names[m] for m in ignored_layers]
    pruner = DecoderPruner(copy.deepcopy(model), ignored)
    indices = list(range(len(pruner.groups))) if groups is None else list(groups)
    if not indices:
        raise IntraFusionError("no group given: pass groups=None for every group, or indices")
    for g in indices:
        pruner.check_group(g)
    gradients = (lm_gradients(pruner.model, batches, [n for g in pruner.groups for n in g.layers])
                 if criterion == "taylor" else None)
    prune = method_pruner(pruner, method, criterion, gradients, batches, fusion, seed)
    generator = torch.Generator().manual_seed(seed)

    def scores(g: int) -> torch.Tensor:
        return score_units(group_slots(pruner.model, pruner.groups[g]), criterion, gradients, generator)

    plan = lm_plan(pruner, indices, budget, allocation, example, scores, round_to, prune, held_out)
    prune(pruner, plan)
    if not sync_widths(pruner.model):
        warnings.warn(f"the config of the pruned {type(model).__name__} cannot describe its widths "
                      "(layers of different widths, GPT-2 attention with heads removed, or head counts "
                      "transformers rejects): save it with intrafusion.save and load it with "
                      "intrafusion.load(path, model=<the unpruned architecture>), not save_pretrained",
                      stacklevel=2)
    return pruner.model


def route(model: nn.Module) -> bool:
    """Whether api.compress hands `model` to compress_lm (a transformers causal LM); an
    IntraFusionError, at once, for a model that torch-pruning's dependency graph cannot number:
    another transformers model passed unwrapped (its forward returns a ModelOutput, not a tensor)
    or a wrapper around decoder-LM blocks (the graph never returns on rotary embeddings and does
    not know GPT-2's Conv1D; see the module docstring)."""
    if is_causal_lm(model):
        return True
    name = type(model).__name__
    if is_transformers_model(model):
        raise IntraFusionError(f"{name} is a transformers model whose forward returns a ModelOutput, not a "
                               "tensor: wrap it so that model(x) returns the logits (as "
                               "intrafusion.models.hf.HFClassifier does); causal LMs are passed as they are")
    blocks = decoder_blocks(model)
    if blocks:
        raise IntraFusionError(f"{name} wraps decoder-LM blocks ({blocks[0].name}, ...): pass the "
                               "transformers *ForCausalLM itself, unwrapped; torch-pruning's dependency "
                               "graph cannot number these blocks' groups")
    return False
