"""quantize_model: replace a torch model's linears, embeddings and stacked experts by quantized modules, in place.

Per layer, the first that speaks decides (mlx-lm's conventions where it has them):
1. `config`: a module path, or a regex written "re:<pattern>" (full match, tried in order), mapped to a dict of
   parameters or to False (keep float);
2. `predicate(path, module)`: True (the global parameters), False (keep float) or a dict of parameters;
3. routers (`router`; by default paths ending in `gate`, `router`, `shared_expert_gate` or `router.proj`, which pick
   the experts) get 8-bit affine, group 64, as mlx-lm: a 4-bit router picks the wrong experts. Routers that are
   linears become QuantizedLinear; transformers' routers holding a bare weight (Qwen3-MoE's `mlp.gate`) become
   QuantizedRouter, which keeps their forward (softmax, top-k) and projects with the quantized weight;
4. otherwise the global `group_size`, `bits`, `mode`.
A dict holds the layer's whole parameters, as in mlx-lm configs: without "mode" it means affine, and a missing
group_size or bits is the mode's default. Layers whose input size is not a multiple of their group size stay float
and are reported. An output head tied to an embedding (the same weight) and quantized alike becomes a TiedHead of the
quantized embedding, as mlx-lm's tied models. The returned dict is mlx-lm's `quantization` block: the global
parameters, a full entry for every layer quantized differently, and False for every layer kept float.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable

from torch import nn

from ..formats import resolve_params
from .embedding import QuantizedEmbedding, TiedHead
from .linear import ACTIVATION_MODES, QQLinear, QuantizedLinear
from .router import QuantizedRouter, is_bare_router
from .switch import QuantizedExperts, SwitchLinear, is_stacked_experts
from .weights import QuantizedWeight

ROUTER_PARAMS = {"group_size": 64, "bits": 8, "mode": "affine"}
ROUTER_PATH = re.compile(r"(^|.*\.)(gate|router|shared_expert_gate|router\.proj)")

Predicate = Callable[[str, nn.Module], "bool | dict"]


def _full_params(op: str, params: dict, path: str) -> dict:
    """A per-layer dict completed as mlx-lm reads it (mode affine, the mode's defaults), checked."""
    unknown = set(params) - {"group_size", "bits", "mode", "global_scale", "quantize_input"}
    if unknown:
        raise ValueError(f"[{op}] The parameters for {path!r} hold unknown keys {sorted(unknown)}; expected "
                         f"group_size, bits, mode, global_scale, quantize_input.")
    mode = params.get("mode", "affine")
    _, gs, bits = resolve_params(op, mode, params.get("group_size"), params.get("bits"))
    if params.get("global_scale") and mode != "nvfp4":
        raise ValueError(f"[{op}] {path!r}: global_scale needs mode 'nvfp4' but got {mode!r}.")
    if params.get("quantize_input") and mode not in ACTIVATION_MODES:
        raise ValueError(f"[{op}] {path!r}: quantize_input needs a mode in {ACTIVATION_MODES}, got {mode!r}.")
    return {**params, "group_size": gs, "bits": bits, "mode": mode}


def _input_dims(module: nn.Module) -> int:
    if is_stacked_experts(module):
        return min(module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
    return module.weight.shape[-1]


def quantizable(module: nn.Module, path: str = "") -> bool:
    """A layer quantize_model converts: linears, embeddings, expert stacks, and bare-weight routers at a router
    path."""
    if isinstance(module, QuantizedWeight):
        return False
    if is_bare_router(module):
        return ROUTER_PATH.fullmatch(path) is not None
    return isinstance(module, (nn.Linear, nn.Embedding, SwitchLinear)) or is_stacked_experts(module)


def _convert(module: nn.Module, params: dict) -> nn.Module:
    gs, bits, mode = params["group_size"], params["bits"], params["mode"]
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding.from_embedding(module, gs, bits, mode)
    global_scale = bool(params.get("global_scale"))
    if isinstance(module, nn.Linear):
        if params.get("quantize_input"):
            return QQLinear.from_linear(module, gs, bits, mode)
        return QuantizedLinear.from_linear(module, gs, bits, mode, global_scale)
    if isinstance(module, SwitchLinear):
        return module.to_quantized(gs, bits, mode, global_scale)
    if is_bare_router(module):
        return QuantizedRouter.from_router(module, gs, bits, mode, global_scale)
    return QuantizedExperts.from_experts(module, gs, bits, mode, global_scale)


def quantize_model(
    model: nn.Module,
    group_size: int | None = None,
    bits: int | None = None,
    mode: str = "affine",
    *,
    predicate: Predicate | None = None,
    config: dict | None = None,
    router: dict | None = ROUTER_PARAMS,
    quantize_input: bool = False,
    global_scale: bool = False,
) -> dict:
    """Quantize `model` in place; returns the mlx-lm `quantization` dict describing what was done.

    `quantize_input` turns linears into QQLinear (activations quantized on the fly; nvfp4, mxfp8, mxfp4).
    `global_scale` (nvfp4) gives stacked experts one tensor scale per expert, as mlx-lm. `router=None` treats
    router layers (linears and bare-weight routers alike) like any other.
    """
    op = "quantize_model"
    if not isinstance(model, nn.Module):
        raise ValueError(f"[{op}] model must be a torch.nn.Module but got {type(model).__name__}.")
    defaults = {"group_size": group_size, "bits": bits, "mode": mode}
    _full_params(op, {**defaults, "global_scale": global_scale, "quantize_input": quantize_input}, "every layer")
    _, gs, b = resolve_params(op, mode, group_size, bits)
    defaults = {"group_size": gs, "bits": b, "mode": mode}
    config = dict(config or {})
    patterns = [(re.compile(key[3:]), value) for key, value in config.items() if key.startswith("re:")]
    quantization: dict = dict(defaults)
    kept_float: list[str] = []

    def decide(path: str, module: nn.Module):
        if path in config:
            return config[path]
        for pattern, value in patterns:
            if pattern.fullmatch(path):
                return value
        if predicate is not None:
            return predicate(path, module)
        if router is not None and (isinstance(module, nn.Linear) or is_bare_router(module)) \
                and ROUTER_PATH.fullmatch(path):
            return dict(router)
        return True

    if quantizable(model):
        raise ValueError(f"[{op}] model is itself a {type(model).__name__}, which cannot be replaced in place; use "
                         f"QuantizedLinear.from_linear / QuantizedEmbedding.from_embedding, or pass its parent.")
    candidates = []
    for path, module in model.named_modules():
        if any(path.startswith(done + ".") for done, _ in candidates):
            continue  # inside a module already chosen (an experts module's children)
        if quantizable(module, path):
            candidates.append((path, module))

    plan = []  # every decision is made and checked before the first layer changes
    for path, module in candidates:
        choice = decide(path, module)
        if choice is False or choice is None:
            quantization[path] = False
            continue
        if choice is True:
            params = dict(defaults)
            if quantize_input and isinstance(module, nn.Linear):
                params["quantize_input"] = True
            if global_scale and (isinstance(module, SwitchLinear) or is_stacked_experts(module)):
                params["global_scale"] = True  # one tensor scale per expert, as mlx-lm (linears, routers: none)
        elif isinstance(choice, dict):
            params = _full_params(op, choice, path)
            if params.get("quantize_input") and is_bare_router(module):
                raise ValueError(f"[{op}] {path!r}: quantize_input applies to linears, not to a router holding a "
                                 f"bare weight ({type(module).__name__}).")
        else:
            raise ValueError(f"[{op}] The decision for {path!r} must be True, False or a dict but got {choice!r}.")
        if _input_dims(module) % params["group_size"]:
            kept_float.append(f"{path} (input size {_input_dims(module)})")
            quantization[path] = False
            continue
        plan.append((path, module, params))
        if params != defaults:
            quantization[path] = {k: v for k, v in params.items() if k not in ("quantize_input", "global_scale") or v}
    ties = _tied_heads(plan)
    for path, module, params in plan:
        if path not in ties:
            _replace(model, path, _convert(module, params))
    for head, embedding in ties.items():
        _replace(model, head, TiedHead(model.get_submodule(embedding)))
        quantization.pop(head, None)  # (mlx-lm's tied models have no head: it follows the embedding)
    if kept_float:
        warnings.warn(f"[{op}] Kept in float, input size not a multiple of the group size: {', '.join(kept_float)}.",
                      stacklevel=2)
    return quantization


def _tied_heads(plan: list) -> dict[str, str]:
    """{head path: embedding path} for the linears of the plan that share their weight with an embedding of the plan
    and are quantized alike (no bias): they become TiedHeads of the quantized embedding, as mlx-lm's tied models."""
    embeddings = {id(module.weight): (path, params) for path, module, params in plan
                  if isinstance(module, nn.Embedding)}
    ties = {}
    for path, module, params in plan:
        tied = embeddings.get(id(module.weight)) if isinstance(module, nn.Linear) else None
        if tied is not None and module.bias is None and params == tied[1]:
            ties[path] = tied[0]
    return ties


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)


def model_bits_per_weight(model: nn.Module) -> float:
    """Bits of storage per weight (mlx-lm's measure): all parameter and buffer bytes over the parameter count,
    where a quantized module counts the weights it stands for."""
    total_bytes, count = 0, 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total_bytes += t.numel() * t.element_size()
        if isinstance(module, QuantizedWeight):
            count += module.weight.numel() * 32 // module.bits
            count += 0 if getattr(module, "bias", None) is None else module.bias.numel()
        else:
            count += sum(p.numel() for p in module.parameters(recurse=False))
    return 8 * total_bytes / max(count, 1)

