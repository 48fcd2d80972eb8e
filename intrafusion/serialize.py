"""Save a pruned network and rebuild it later, from a file that holds only tensors and plain data.

A plain `state_dict` does not fit a freshly constructed model once pruning has changed widths,
and `torch.save(model)` is a pickle that runs code when loaded. `save` writes, with `torch.save`,
a dict of tensors, strings and numbers only:

    {"format": "intrafusion.pruned-model", "version": 1,
     "builtin": {"name": "resnet18", "num_classes": 10} or None,
     "modules": {module name: {"type": class name, "attributes": {"out_channels": 32, ...}}},
     "state_dict": {key: tensor}}

`load` reads it with `torch.load(weights_only=True)` (no code from the file ever runs), checks
that the model it is given (or the built-in model the file names) has the same modules, gives
every parameter and buffer the saved shape (creating those the pruned network gained, like the
bias BN folding adds to a conv built with bias=False), sets the width attributes (in/out channels,
groups, features, normalized_shape, ...) and loads the state dict strictly. A decoder language
model's other width attributes and config then follow its weights (decoder.sync_widths).
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from .decoder import sync_widths
from .errors import IntraFusionError
from .models import MODEL_NAMES, build_model
from .storage import atomic_write, first_non_finite, load_tensors

FORMAT = "intrafusion.pruned-model"
VERSION = 1

# Module attributes that pruning changes: torch's conv, linear, norm, PReLU and embedding layers
# (and any user module using these names) keep their widths here.
WIDTH_ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features",
                    "num_features", "normalized_shape", "num_channels", "num_groups",
                    "num_parameters", "num_embeddings", "embedding_dim")


def _is_width(value) -> bool:
    """An int, or a tuple of ints (normalized_shape): the only attribute values a file may set."""
    if isinstance(value, tuple):
        return all(_is_width(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module by name, shared ones under each of their names (as state_dict lists them)."""
    return dict(model.named_modules(remove_duplicate=False))


def _describe(module: nn.Module) -> dict:
    """{"type": class name, "attributes": the module's width attributes (ints, int tuples)}."""
    attributes = {a: getattr(module, a) for a in WIDTH_ATTRIBUTES
                  if _is_width(getattr(module, a, None))}
    return {"type": type(module).__qualname__, "attributes": attributes}


def _structure(model: nn.Module) -> dict[str, str]:
    return {name: type(m).__qualname__ for name, m in _modules(model).items()}


def builtin_spec(model: nn.Module) -> dict | None:
    """{"name", "num_classes"} of the registry model (intrafusion.models.MODEL_NAMES) that `model`
    is a (possibly pruned) instance of, recognised by its modules' names and types; None for any
    other model. Only instances of the zoo's classes are compared; candidates are built on the
    meta device (no weights), each with one class so that its classifier stands out."""
    if not type(model).__module__.startswith(build_model.__module__):
        return None
    structure = _structure(model)
    for name in MODEL_NAMES:
        try:
            with torch.device("meta"):
                candidate = build_model(name, 1)
        except IntraFusionError:        # a builder whose optional package is missing
            continue
        if _structure(candidate) == structure:
            heads = [n for n, m in candidate.named_modules()
                     if isinstance(m, nn.Linear) and m.out_features == 1]
            return {"name": name, "num_classes": model.get_submodule(heads[-1]).out_features}
    return None


def save(model: nn.Module, path: Path | str) -> None:
    """Write `model` (pruned or not) to `path` so that `load` rebuilds it; a built-in model is
    recorded by registry name and class count, so that `load(path)` needs no model. The write
    is atomic: a failure leaves an existing file as it was."""
    record = {"format": FORMAT, "version": VERSION, "builtin": builtin_spec(model),
              "modules": {name: _describe(m) for name, m in _modules(model).items()},
              "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    buffer = io.BytesIO()
    torch.save(record, buffer)
    atomic_write(path, buffer.getvalue(), "free space or choose another path, then save again")


def _read(path: Path) -> dict:
    """The checked record of file `path` (see the module docstring)."""
    if not path.is_file():
        raise IntraFusionError(f"model file {path} not found")
    data = load_tensors(path, "pass a file written by intrafusion.save")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise IntraFusionError(f"{path} is not a model file written by intrafusion.save")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise IntraFusionError(f"{path} has model format version {version!r}; this intrafusion "
                               f"reads versions up to {VERSION}: upgrade intrafusion")
    modules, state = data.get("modules"), data.get("state_dict")
    if (not isinstance(modules, dict) or not isinstance(state, dict)
            or not all(isinstance(v, dict) and isinstance(v.get("type"), str)
                       and isinstance(v.get("attributes"), dict) for v in modules.values())):
        raise IntraFusionError(f"{path} is a damaged intrafusion model file (bad module table)")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise IntraFusionError(f"{path}: state entry {key!r} is a {type(value).__name__}, "
                                   "not a tensor")
    bad = first_non_finite(state)
    if bad is not None:
        raise IntraFusionError(f"{path}: tensor {bad!r} holds NaN or infinite values")
    return data


def _model_of(data: dict, path: Path) -> nn.Module:
    """A fresh instance of the built-in model the file names."""
    spec = data.get("builtin")
    if spec is None:
        raise IntraFusionError(f"{path} holds a model that is not built in: pass a freshly "
                               "constructed instance of its architecture, load(path, model)")
    if (not isinstance(spec, dict) or not isinstance(spec.get("name"), str)
            or not _is_width(spec.get("num_classes")) or spec["num_classes"] < 1):
        raise IntraFusionError(f"{path} is a damaged intrafusion model file "
                               "(bad built-in model entry)")
    return build_model(spec["name"], spec["num_classes"], state=data["state_dict"])


def _check_structure(saved: dict, model: nn.Module, path: Path) -> None:
    """IntraFusionError naming the first module whose name or type differs."""
    here = _structure(model)
    for name, info in saved.items():
        if name not in here:
            raise IntraFusionError(f"{path} does not fit the model: module {name!r} of the file "
                                   "is not in the model (different architecture?)")
        if info["type"] != here[name]:
            raise IntraFusionError(f"{path} does not fit the model: module {name!r} is a "
                                   f"{info['type']} in the file but a {here[name]} in the model "
                                   "(different architecture?)")
    for name in here:
        if name not in saved:
            raise IntraFusionError(f"{path} does not fit the model: module {name!r} of the model "
                                   "is not in the file (different architecture?)")


def _set_attributes(module: nn.Module, name: str, attributes: dict, path: Path) -> None:
    for attr, value in attributes.items():
        current = getattr(module, attr, None)
        if (attr not in WIDTH_ATTRIBUTES or not _is_width(value) or not _is_width(current)
                or isinstance(value, tuple) != isinstance(current, tuple)):
            raise IntraFusionError(f"{path} does not fit the model: attribute {attr}={value!r} "
                                   f"of module {name!r} does not apply to it")
        setattr(module, attr, value)


def _resize(module: nn.Module, prefix: str, state: dict, path: Path) -> set[str]:
    """Give each parameter and persistent buffer of `module` (itself, not its children) the shape
    of its saved tensor, creating a missing one (a bias added by BN folding); returns the keys.
    The module's own slot tables are read because an absent bias is a slot holding None."""
    keys = set()
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values())
               if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    for kind, slots in (("parameter", module._parameters), ("buffer", module._buffers)):
        for local, current in list(slots.items()):
            key = prefix + local
            if kind == "buffer" and local in module._non_persistent_buffers_set:
                continue
            if key not in state:
                if current is None:
                    continue
                raise IntraFusionError(f"{path} does not fit the model: {kind} {key!r} is missing "
                                       "from the file (different architecture?)")
            saved = state[key]
            keys.add(key)
            if current is not None and current.dim() != saved.dim():
                raise IntraFusionError(f"{path} does not fit the model: {key!r} has shape "
                                       f"{tuple(saved.shape)} in the file, {tuple(current.shape)} "
                                       "in the model (different architecture?)")
            if current is not None and current.shape == saved.shape:
                continue
            like = saved if current is None else current
            fresh = torch.empty(saved.shape, dtype=like.dtype, device=device)
            if kind == "parameter":
                grad = True if current is None else current.requires_grad
                module.register_parameter(local, nn.Parameter(fresh, requires_grad=grad))
            else:
                module.register_buffer(local, fresh)
    return keys


def _expected_shapes(module: nn.Module) -> dict[str, tuple]:
    """The shapes that torch's own layers require of their tensors, given their width attributes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        c_in, c_out, g = module.in_channels, module.out_channels, module.groups
        lead = (c_in, c_out // g) if module.transposed else (c_out, c_in // g)
        return {"weight": (*lead, *module.kernel_size), "bias": (c_out,)}
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return dict.fromkeys(("weight", "bias", "running_mean", "running_var"),
                             (module.num_features,))
    if isinstance(module, nn.LayerNorm):
        return {"weight": tuple(module.normalized_shape), "bias": tuple(module.normalized_shape)}
    if isinstance(module, nn.GroupNorm):
        return {"weight": (module.num_channels,), "bias": (module.num_channels,)}
    return {}


def _check_fits(module: nn.Module, name: str, path: Path) -> None:
    """IntraFusionError when a saved tensor does not fit its layer's attributes (e.g. a conv
    kernel of another size, or groups that do not divide a conv's channels)."""
    if isinstance(module, nn.modules.conv._ConvNd) and (module.in_channels % module.groups
                                                        or module.out_channels % module.groups):
        raise IntraFusionError(f"{path} does not fit the model: conv {name!r} has groups="
                               f"{module.groups}, which does not divide its {module.in_channels} "
                               f"in- and {module.out_channels} out-channels")
    for local, shape in _expected_shapes(module).items():
        tensor = getattr(module, local, None)
        if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != shape:
            raise IntraFusionError(f"{path} does not fit the model: {name + '.' if name else ''}"
                                   f"{local} has shape {tuple(tensor.shape)}, but the layer needs "
                                   f"{shape} (different architecture?)")


def load(path: Path | str, model: nn.Module | None = None) -> nn.Module:
    """The network saved at `path`, rebuilt into `model` (a freshly constructed, unpruned instance
    of its architecture, changed in place and returned) or, when `model` is None, into a new
    instance of the built-in model the file names. Reads only tensors and plain data; every
    problem (not such a file, another architecture, a missing key, non-finite weights) is an
    IntraFusionError. The train/eval mode is the model's own (a new built-in one: train mode)."""
    path = Path(path)
    data = _read(path)
    model = _model_of(data, path) if model is None else model
    saved, state = data["modules"], data["state_dict"]
    _check_structure(saved, model, path)
    used = set()
    for name, module in _modules(model).items():
        _set_attributes(module, name, saved[name]["attributes"], path)
        used |= _resize(module, f"{name}." if name else "", state, path)
        _check_fits(module, name, path)
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise IntraFusionError(f"{path} does not fit the model: unexpected key {unexpected[0]!r} "
                               "in the file (different architecture?)")
    model.load_state_dict(state, strict=True)
    sync_widths(model)
    return model
