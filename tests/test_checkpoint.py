"""MLX-format checkpoints against mlx-lm itself: lowbit writes the tensors mlx-lm writes, byte for byte, and loads
what mlx-lm writes into lowbit modules with identical tensors and the same logits as mlx-lm's own model."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.models import load_quantized, load_tensors, read_config, save_quantized

from conftest import mx, same_bits

transformers = pytest.importorskip("transformers")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils") if mx is not None else None
pytestmark = pytest.mark.skipif(mx is None, reason="needs MLX and mlx-lm (the oracle)")

FORMATS = [("affine", 64, 4), ("affine", 32, 3), ("affine", 128, 8), ("mxfp4", 32, 4), ("mxfp8", 32, 8),
           ("nvfp4", 16, 4)]


def _llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, tie_word_embeddings=False, max_position_embeddings=64, torch_dtype=dtype,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def _mlx_checkpoint(float_dir, out_dir, group_size, bits, mode, predicate=None):
    """mlx-lm's own load -> quantize_model -> save_model / save_config."""
    model, config = mlx_lm_utils.load_model(float_dir)
    model, config = mlx_lm_utils.quantize_model(model, config, group_size, bits, mode=mode,
                                                quant_predicate=predicate)
    mlx_lm_utils.save_model(out_dir, model)
    mlx_lm_utils.save_config(config, out_dir / "config.json")
    return model, config


def _assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert same_bits(a[name], b[name]), name


def _assert_fp4_codes_differ_only_at_ties(ours, theirs, float_weights, group_size, bits, mode):
    """Where the codes differ, the float weight lies exactly halfway between the two decoded values (a tie:
    docs/deviations.md #1); the tensors are then made equal for the byte comparison that follows."""
    for name, codes in ours.items():
        if codes.dtype != torch.uint32 or same_bits(codes, theirs[name]):
            continue
        scales = ours[name.replace(".weight", ".scales")]
        a = lowbit.dequantize(codes, scales, None, group_size, bits, mode, dtype=torch.float32).double()
        b = lowbit.dequantize(theirs[name], scales, None, group_size, bits, mode, dtype=torch.float32).double()
        differ = a != b
        w = float_weights[name].double()
        assert torch.equal(w[differ], (a[differ] + b[differ]) / 2), name
        theirs[name] = codes


def _as_read_by_mlx_lm(quantization: dict) -> dict:
    """mlx-lm's per-layer dicts as its loader reads them (no mode: affine); lowbit writes the mode out."""
    return {k: {"mode": "affine", **v} if isinstance(v, dict) else v for k, v in quantization.items()}


def _lm_head_8bit(path, module):
    return {"group_size": 64, "bits": 8} if path == "lm_head" else True


@pytest.mark.parametrize("mode,group_size,bits", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowbit_writes_mlx_lm_bytes(tmp_path, mode, group_size, bits, dtype):
    model = _llama(dtype)
    model.save_pretrained(tmp_path / "float")
    float_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    _, mlx_config = _mlx_checkpoint(tmp_path / "float", tmp_path / "mlx", group_size, bits, mode, _lm_head_8bit)
    quantization = lowbit.quantize_model(model, group_size, bits, mode, predicate=_lm_head_8bit)
    save_quantized(model, tmp_path / "lowbit", quantization, model.config.to_dict())

    ours, theirs = load_tensors(tmp_path / "lowbit"), load_tensors(tmp_path / "mlx")
    if mode in ("mxfp4", "nvfp4"):  # fp4 ties round to even in lowbit (as MLX's GPUs), away from MLX's CPU choice
        _assert_fp4_codes_differ_only_at_ties(ours, theirs, float_weights, group_size, bits, mode)
    _assert_same_tensors(ours, theirs)
    assert quantization == _as_read_by_mlx_lm(mlx_config["quantization"])
    config = read_config(tmp_path / "lowbit")
    assert config["quantization"] == config["quantization_config"] == quantization
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lowbit" / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "mlx"}


@pytest.mark.parametrize("mode,group_size,bits", FORMATS)
def test_mlx_lm_checkpoint_loads_with_identical_tensors_and_logits(tmp_path, mode, group_size, bits):
    import numpy as np

    _llama().save_pretrained(tmp_path / "float")
    mlx_model, _ = _mlx_checkpoint(tmp_path / "float", tmp_path / "mlx", group_size, bits, mode, _lm_head_8bit)
    model = _llama(seed=1)  # other float weights: everything must come from the checkpoint
    load_quantized(model, tmp_path / "mlx")
    assert isinstance(model.lm_head, lowbit.nn.QuantizedLinear) and model.lm_head.bits == 8
    assert isinstance(model.model.embed_tokens, lowbit.nn.QuantizedEmbedding)
    stored = load_tensors(tmp_path / "mlx")
    _assert_same_tensors(model.state_dict(), stored)
    save_quantized(model, tmp_path / "again", read_config(tmp_path / "mlx")["quantization"])
    _assert_same_tensors(load_tensors(tmp_path / "again"), stored)  # the same quantized weights, the same bytes

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    reference = np.array(mlx_model(mx.array(ids.numpy())))
    assert np.abs(logits.numpy() - reference).max() < 1e-4


def test_shards_are_globbed_not_indexed(tmp_path):
    model = _llama()
    quantization = lowbit.quantize_model(model)
    save_quantized(model, tmp_path / "ckpt", quantization, model.config.to_dict(), max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("model*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text('{"weight_map": {}}')  # a stale copied index
    fresh = _llama(seed=3)
    load_quantized(fresh, tmp_path / "ckpt")
    _assert_same_tensors(fresh.state_dict(), model.state_dict())
    # and mlx-lm loads lowbit's sharded checkpoint
    mlx_model, _ = mlx_lm_utils.load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    import numpy as np

    with torch.no_grad():
        ours = model(ids).logits.numpy()
    assert np.abs(np.array(mlx_model(mx.array(ids.numpy()))) - ours).max() < 1e-4


def test_layers_kept_float_are_recorded_and_reloaded(tmp_path):
    model = _llama()
    quantization = lowbit.quantize_model(model, config={"re:.*v_proj": False, "lm_head": {"bits": 6}})
    assert quantization["model.layers.0.self_attn.v_proj"] is False
    assert quantization["lm_head"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    save_quantized(model, tmp_path / "ckpt", quantization)
    fresh = _llama(seed=4)
    load_quantized(fresh, tmp_path / "ckpt")
    assert isinstance(fresh.model.layers[1].self_attn.v_proj, torch.nn.Linear)
    assert fresh.lm_head.bits == 6
    _assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model\\*.safetensors"):
        load_quantized(_llama(), tmp_path)
    model = _llama()
    save_quantized(model, tmp_path / "ckpt", lowbit.quantize_model(model))
    config = read_config(tmp_path / "ckpt")
    config["quantization"] = config["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\[load_quantized\].*'awq'"):
        load_quantized(_llama(), tmp_path / "ckpt")


def _qwen3_moe(tie: bool, seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=128, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=64, tie_word_embeddings=tie, decoder_sparse_step=1, mlp_only_layers=[],
    )
    return transformers.Qwen3MoeForCausalLM(config).eval()


def _save_for_mlx_lm(model, path):
    """save_pretrained, with the config keys mlx-lm reads that transformers 5 writes elsewhere."""
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.setdefault("num_experts", model.config.num_experts)
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("mode,group_size,bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
@pytest.mark.parametrize("tie", [True, False])
def test_mlx_lm_moe_checkpoint_loads_into_transformers(tmp_path, mode, group_size, bits, tie):
    """An mlx-lm Qwen3-MoE checkpoint (experts as switch_mlp.{gate,up,down}_proj, 8-bit routers, no head tensors
    when tied) in transformers' Qwen3MoeForCausalLM: experts become QuantizedExperts (gate and up rows
    concatenated), routers (bare weights in transformers) take their dequantized weight, a tied head follows the
    quantized embedding; logits equal mlx-lm's own model's."""
    import numpy as np

    _save_for_mlx_lm(_qwen3_moe(tie), tmp_path / "float")
    mlx_model, mlx_config = _mlx_checkpoint(tmp_path / "float", tmp_path / "mlx", group_size, bits, mode)
    assert mlx_config["quantization"]["model.layers.0.mlp.gate"]["bits"] == 8  # (mlx-lm's router rule)
    model = _qwen3_moe(tie, seed=1)  # other float weights: everything must come from the checkpoint
    load_quantized(model, tmp_path / "mlx")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, lowbit.nn.QuantizedExperts) and experts.gate_up_proj.mode == mode
    assert isinstance(model.lm_head, lowbit.nn.TiedHead if tie else lowbit.nn.QuantizedLinear)
    stored = load_tensors(tmp_path / "mlx")
    gate, up = (stored[f"model.layers.1.mlp.switch_mlp.{p}_proj.weight"] for p in ("gate", "up"))
    assert same_bits(model.model.layers[1].mlp.experts.gate_up_proj.weight, torch.cat([gate, up], 1))
    router = lowbit.dequantize(*(stored[f"model.layers.0.mlp.gate.{t}"] for t in ("weight", "scales", "biases")),
                               64, 8, dtype=torch.float32)
    assert same_bits(model.model.layers[0].mlp.gate.weight.detach(), router)

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    assert np.abs(logits - np.array(mlx_model(mx.array(ids.numpy())))).max() < 1e-4


def test_tied_llama_saved_as_mlx_lm_does(tmp_path):
    """quantize_model makes a tied head follow its quantized embedding (no head tensors), so mlx-lm's tied model
    loads lowbit's checkpoint and computes the same logits; lowbit loads it back with the head tied."""
    import numpy as np

    model = _llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantization = lowbit.quantize_model(model)
    assert isinstance(model.lm_head, lowbit.nn.TiedHead) and "lm_head" not in quantization
    save_quantized(model, tmp_path / "ckpt", quantization, model.config.to_dict())
    assert not [name for name in load_tensors(tmp_path / "ckpt") if name.startswith("lm_head")]
    mlx_model, _ = mlx_lm_utils.load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids).logits.numpy()
    assert np.abs(np.array(mlx_model(mx.array(ids.numpy()))) - ours).max() < 1e-4
    fresh = _llama(seed=5)
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    load_quantized(fresh, tmp_path / "ckpt")
    assert isinstance(fresh.lm_head, lowbit.nn.TiedHead)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
