"""MLX-format checkpoints: save and load quantized torch models exactly as mlx-lm does.

Layout (mlx_lm/utils.py `save_model`, `save_config`, `load_model`): safetensors files `model.safetensors` or
`model-0000i-of-0000n.safetensors` with metadata {"format": "mlx"} and a `model.safetensors.index.json`; tensors
named by module path (`<p>.weight` uint32 codes, `<p>.scales`, `<p>.biases` for affine, `<p>.global_scale`,
`<p>.bias`); `config.json` with the `quantization` block (global group_size / bits / mode plus per-layer entries)
mirrored to `quantization_config`. Loading globs `model*.safetensors` (a copied index can be stale) and decides
each layer as mlx-lm does: its entry in the quantization block if it has one, else quantized exactly when
`<p>.scales` is present, with group size, bits and mode read off the tensors.

Mixture-of-experts blocks are written and read under mlx-lm's names: transformers' stacked
`<block>.experts.gate_up_proj` (gate rows, then up rows) and `.down_proj` are mlx-lm's
`<block>.switch_mlp.{gate,up,down}_proj`, and a QuantizedRouter (transformers' bare-weight router, quantized) is
mlx-lm's quantized `<block>.gate` linear, so `mlx_lm.load` reads what `save_quantized` writes. The config gets the
keys mlx-lm reads where transformers 5 writes others (`_with_mlx_lm_keys`).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import ops
from ..nn import (
    QQLinear, QuantizedEmbedding, QuantizedExperts, QuantizedLinear, QuantizedRouter, QuantizedSwitchLinear,
    SwitchLinear, TiedHead,
)
from ..nn.quantize_model import quantizable
from ..nn.router import is_bare_router
from ..nn.switch import is_stacked_experts

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """mlx-lm's make_shards: fill a shard in order until the next tensor would pass the limit."""
    shards: list[dict] = []
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if not shards or size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_quantized(model: nn.Module, path: str | Path, quantization: dict, config: dict | None = None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `model`'s tensors and config.json (with `quantization`, as quantize_model returned it) to `path`.

    `config` is the model's own config (for a transformers model: `model.config.to_dict()`); it is written with the
    keys mlx-lm reads added (`_with_mlx_lm_keys`) and the quantization block mirrored to `quantization_config`, keys
    sorted, as mlx-lm's save_config does. Stacked experts are written as mlx-lm's `switch_mlp` (their quantization
    entries too), quantized routers as mlx-lm's quantized gate linear, and a layer the model holds float whose
    entry says quantized is recorded False, so mlx-lm keeps it float: `mlx_lm.load` computes with exactly the
    weights `model` holds.
    """
    training = [p for p, m in model.named_modules() if isinstance(m, QQLinear) and m.weight.is_floating_point()]
    if training:
        raise ValueError(f"[save_quantized] {', '.join(training)} hold float weights (QQLinear in training mode); "
                         f"call model.eval() to quantize them first.")
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    experts = _switch_mlp_paths(model)
    tensors = _to_switch_mlp(tensors, experts)
    quantization = _mlx_lm_quantization(quantization, experts, tensors)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        name = pattern.format(i + 1, len(shards))
        save_file(shard, str(path / name), metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    config = {k: v for k, v in _with_mlx_lm_keys(config or {}).items() if k != "_name_or_path"}
    config["quantization"] = quantization
    config["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def _with_mlx_lm_keys(config: dict) -> dict:
    """`config` with the keys mlx-lm 0.32.2's model args read added where transformers 5 writes them elsewhere, so
    that `mlx_lm.load` builds the model transformers describes. Without them qwen3_moe's args fail to build
    (`num_experts`, `rope_theta` and `head_dim` are required), and llama, qwen2(_moe) or mixtral silently take their
    own default rope_theta and drop the rope scaling. Added when missing (or None), derived from transformers' keys:
    `num_experts` from `num_local_experts`, `rope_theta` from `rope_parameters`, `rope_scaling` = `rope_parameters`
    for a rope type other than default (llama3, yarn, ...), `head_dim` = hidden_size // num_attention_heads
    (transformers' default). Present keys are never overwritten and transformers' keys stay, so transformers reads
    the config as before."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    derived = {
        "num_experts": config.get("num_local_experts"),
        "rope_theta": rope.get("rope_theta"),
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "head_dim": hidden // heads if hidden and heads else None,
    }
    for key, value in derived.items():
        if config.get(key) is None and value is not None:
            config[key] = value
    return config


def _switch_mlp_path(experts_path: str) -> str:
    """mlx-lm's name for the stacked experts transformers calls `<block>.experts`: `<block>.switch_mlp`."""
    block = experts_path.rpartition(".")[0]
    return f"{block}.switch_mlp" if block else "switch_mlp"


def _switch_mlp_paths(model: nn.Module) -> dict[str, str]:
    """{experts path: switch_mlp path} for the model's stacked experts, quantized or kept float."""
    return {path: _switch_mlp_path(path) for path, module in model.named_modules()
            if isinstance(module, QuantizedExperts) or is_stacked_experts(module)}


def _gate_and_up(name: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up_proj's rows (dim 1 of (E, 2I, ...)) split in half: gate's rows, then up's. Quantization groups run
    along rows, so each half holds exactly the codes and scales of its own projection; a per-expert tensor scale
    (E,) covers both and is copied to each."""
    if t.ndim == 1:
        return t, t.clone()
    rows = t.shape[1]
    if rows % 2:
        raise ValueError(f"[save_quantized] {name} has an odd number of rows ({rows}, shape {tuple(t.shape)}): it "
                         f"cannot be split into mlx-lm's switch_mlp gate_proj and up_proj halves.")
    gate, up = t.split(rows // 2, dim=1)
    return gate.contiguous(), up.contiguous()


def _to_switch_mlp(tensors: dict[str, torch.Tensor], experts: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of `_from_switch_mlp`: `<experts>.gate_up_proj.<t>` becomes `<switch_mlp>.gate_proj.<t>` and
    `.up_proj.<t>` (rows split in half) and `.down_proj.<t>` moves under switch_mlp; float experts' bare
    parameters become `.weight`. Other tensors keep their names and order."""
    renamed = {}
    for name, t in tensors.items():
        experts_path = next((p for p in experts if name.startswith(f"{p}.")), "")
        part, _, suffix = name[len(experts_path) + 1:].partition(".") if experts_path else ("", "", "")
        if part not in ("gate_up_proj", "down_proj"):
            renamed[name] = t
            continue
        switch, suffix = experts[experts_path], suffix or "weight"
        if part == "down_proj":
            renamed[f"{switch}.down_proj.{suffix}"] = t
        else:
            gate, up = _gate_and_up(name, t)
            renamed[f"{switch}.gate_proj.{suffix}"] = gate
            renamed[f"{switch}.up_proj.{suffix}"] = up
    return renamed


def _mlx_lm_quantization(quantization: dict, experts: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict:
    """The quantization block as mlx-lm records it for the tensors written: an experts entry becomes one entry
    per switch_mlp projection (mlx-lm's quantize_model records each SwitchLinear, e.g. with global_scale), and a
    per-layer dict for a layer written float (a bare weight loaded dequantized) is False, which mlx-lm's loader
    reads as "keep float" (it would otherwise expect `<p>.scales`)."""
    block = {}
    for key, entry in quantization.items():
        weight = tensors.get(f"{key}.weight")
        if key in experts:
            block.update({f"{experts[key]}.{proj}": entry for proj in ("gate_proj", "up_proj", "down_proj")})
        elif isinstance(entry, dict) and weight is not None and weight.is_floating_point():
            block[key] = False
        else:
            block[key] = entry
    return block


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the `model*.safetensors` files in `path` (globbed, as mlx-lm does)."""
    files = sorted(glob.glob(str(Path(path) / "model*.safetensors")))
    if not files:
        raise FileNotFoundError(f"No model*.safetensors files in {path}.")
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def read_config(path: str | Path) -> dict:
    config_file = Path(path) / "config.json"
    return json.loads(config_file.read_text()) if config_file.exists() else {}


def _inferred_params(path: str, tensors: dict, input_dims: int) -> dict:
    """mlx-lm's infer_quant_config: group size and bits from the tensors' shapes, the mode from the scales' dtype."""
    scales, weight = tensors[f"{path}.scales"], tensors[f"{path}.weight"]
    group_size = input_dims // scales.shape[-1]
    bits = weight.shape[-1] * 32 // input_dims
    if scales.dtype != torch.uint8:
        return {"group_size": group_size, "bits": bits, "mode": "affine"}
    modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    if (bits, group_size) not in modes:
        raise ValueError(f"[load_quantized] Cannot infer the quantization mode of {path}: {bits} bits with group "
                         f"size {group_size}.")
    return {"group_size": group_size, "bits": bits, "mode": modes[(bits, group_size)]}


def _empty_quantized(module: nn.Module, params: dict, path: str, tensors: dict) -> nn.Module:
    """A quantized module of `module`'s shapes, its buffers to be assigned from the checkpoint."""
    if is_stacked_experts(module):
        return _empty_experts(module, path, tensors)
    gs, bits, mode = params["group_size"], params["bits"], params.get("mode", "affine")
    global_scale = bool(params.get("global_scale")) or f"{path}.global_scale" in tensors
    if is_bare_router(module):
        return QuantizedRouter(module, gs, bits, mode, global_scale)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim, gs, bits, mode,
                                  dtype=module.weight.dtype if module.weight.dtype.is_floating_point else None)
    if isinstance(module, nn.Linear) and params.get("quantize_input"):
        return QQLinear(module.in_features, module.out_features, gs, bits, mode, bias=module.bias is not None)
    if isinstance(module, nn.Linear):
        return QuantizedLinear(module.in_features, module.out_features, module.bias is not None, gs, bits, mode,
                               global_scale=global_scale)
    if isinstance(module, SwitchLinear):
        e, n, k = module.weight.shape
        return QuantizedSwitchLinear(k, n, e, module.bias is not None, gs, bits, mode, global_scale)
    raise TypeError(f"not a quantizable module: {type(module).__name__}")


def _empty_experts(module: nn.Module, path: str, tensors: dict) -> QuantizedExperts:
    """Stacked experts: gate_up_proj and down_proj each with the parameters their tensors show (mixed-precision
    recipes give down_proj more bits)."""
    e, two_inter, hidden = module.gate_up_proj.shape
    parts = []
    for name, (k, n) in (("gate_up_proj", (hidden, two_inter)), ("down_proj", (two_inter // 2, hidden))):
        p = _inferred_params(f"{path}.{name}", tensors, k)
        parts.append(QuantizedSwitchLinear(k, n, e, False, p["group_size"], p["bits"], p["mode"],
                                           f"{path}.{name}.global_scale" in tensors))
    return QuantizedExperts(*parts, module.act_fn)


def _from_switch_mlp(model: nn.Module, tensors: dict) -> None:
    """mlx-lm names a block's stacked experts `<block>.switch_mlp.{gate,up,down}_proj`; transformers holds
    `<block>.experts.gate_up_proj` (gate rows, then up rows) and `.down_proj`. Rename to the model's names,
    concatenating gate's and up's rows (quantization groups run along rows, so the codes are unchanged); float
    experts (no scales) load into transformers' bare parameters."""
    for path, module in model.named_modules():
        if not is_stacked_experts(module):
            continue
        switch = _switch_mlp_path(path)
        if f"{switch}.gate_proj.weight" not in tensors or f"{path}.gate_up_proj" in tensors:
            continue
        quantized = f"{switch}.gate_proj.scales" in tensors or f"{switch}.up_proj.scales" in tensors
        for suffix in ("weight", "scales", "biases", "global_scale"):
            gate = tensors.pop(f"{switch}.gate_proj.{suffix}", None)
            up = tensors.pop(f"{switch}.up_proj.{suffix}", None)
            down = tensors.pop(f"{switch}.down_proj.{suffix}", None)
            tail = f".{suffix}" if quantized else ""  # float experts are transformers' bare parameters
            if down is not None:
                tensors[f"{path}.down_proj{tail}"] = down
            if gate is None and up is None:
                continue
            if gate is None or up is None or (suffix == "global_scale" and not torch.equal(gate, up)):
                raise ValueError(f"[load_quantized] {switch}.gate_proj and up_proj must be quantized alike to load "
                                 f"into {path}.gate_up_proj; their {suffix} differ.")
            tensors[f"{path}.gate_up_proj{tail}"] = gate if suffix == "global_scale" else torch.cat([gate, up], -2)


def _dequantize_into_float(model: nn.Module, tensors: dict, quantization: dict) -> None:
    """Quantized tensors whose module stays float in the torch model (a bare weight parameter that is no router
    quantize_model converts, where mlx-lm has a quantized linear) are loaded as their dequantized weight: the exact
    values the quantized layer computes with."""
    parameters = dict(model.named_parameters())
    for name in [k for k in tensors if k.endswith(".scales")]:
        path = name[: -len(".scales")]
        target = parameters.get(f"{path}.weight")
        if target is None or not target.is_floating_point() or tensors[f"{path}.weight"].dtype != torch.uint32:
            continue
        entry = quantization.get(path)
        params = {"mode": "affine", **entry} if isinstance(entry, dict) else \
            _inferred_params(path, tensors, target.shape[-1])
        tensors[f"{path}.weight"] = ops.dequantize(
            tensors[f"{path}.weight"], tensors.pop(name), tensors.pop(f"{path}.biases", None), params["group_size"],
            params["bits"], params["mode"], tensors.pop(f"{path}.global_scale", None), target.dtype)


def _tied_heads(model: nn.Module, tensors: dict) -> dict[str, str]:
    """{head path: embedding path} for the linears that share their weight with a quantized embedding and have no
    tensors in the checkpoint (mlx-lm writes none for tied models): they become TiedHeads. A head tied to a float
    embedding gets the embedding's table."""
    embeddings = {id(m.weight): p for p, m in model.named_modules() if isinstance(m, nn.Embedding)}
    ties = {}
    for path, module in model.named_modules():
        embedding = embeddings.get(id(module.weight)) if isinstance(module, nn.Linear) else None
        if embedding is None or f"{path}.weight" in tensors:
            continue
        if f"{embedding}.scales" in tensors:
            ties[path] = embedding
        elif f"{embedding}.weight" in tensors:
            tensors[f"{path}.weight"] = tensors[f"{embedding}.weight"]
    return ties


def load_quantized(model: nn.Module, path: str | Path, strict: bool = True) -> dict:
    """Make `model` (the float architecture, e.g. a transformers model built from the checkpoint's config) hold
    the checkpoint in `path`: its quantized layers become lowbit modules and every tensor is assigned as stored
    (dtypes kept). mlx-lm's names for stacked experts (`switch_mlp`) load into transformers' `experts`, quantized
    routers that transformers keeps as bare weights become QuantizedRouters (routers recorded False stay float),
    and tied heads follow their embedding.
    Returns the checkpoint's config."""
    config = read_config(path)
    tensors = load_tensors(path)
    quantization = config.get("quantization") or config.get("quantization_config") or {}
    if "quant_method" in quantization:
        raise ValueError(f"[load_quantized] {path} holds a {quantization['quant_method']!r} checkpoint; lowbit "
                         f"loads MLX-format quantization blocks (group_size / bits / mode).")
    _from_switch_mlp(model, tensors)
    ties = _tied_heads(model, tensors)
    candidates = [(p, m) for p, m in model.named_modules() if quantizable(m, p)]
    for p, module in candidates:
        entry = quantization.get(p)
        if entry is False or p in ties:
            continue
        if is_stacked_experts(module):
            if f"{p}.gate_up_proj.scales" not in tensors:
                continue
            params = {}  # (each part's parameters are read off its tensors)
        elif isinstance(entry, dict):
            params = {"mode": "affine", **entry}  # a per-layer dict without mode means affine (mlx-lm)
        elif f"{p}.scales" in tensors:
            params = _inferred_params(p, tensors, module.weight.shape[-1])  # linears, embeddings, switch
        else:
            continue
        parent, _, name = p.rpartition(".")
        setattr(model.get_submodule(parent), name, _empty_quantized(module, params, p, tensors))
    for head, embedding in ties.items():
        parent, _, name = head.rpartition(".")
        setattr(model.get_submodule(parent), name, TiedHead(model.get_submodule(embedding)))
    _dequantize_into_float(model, tensors, quantization)
    model.load_state_dict(tensors, strict=strict, assign=True)
    return config
