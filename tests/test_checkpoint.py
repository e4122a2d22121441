"""MLX-format checkpoints against mlx-lm itself: lowbit writes the tensors mlx-lm writes, byte for byte, and loads
what mlx-lm writes into lowbit modules with identical tensors and the same logits as mlx-lm's own model."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.models import load_quantized, load_tensors, read_config, save_quantized
from lowbit.models.checkpoint import _with_mlx_lm_keys

from conftest import mx, same_bits, to_torch

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
    """The float model for mlx-lm's own quantize_model: save_pretrained, its config given the keys mlx-lm reads
    (transformers 5 writes others) by the function save_quantized uses."""
    model.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(_with_mlx_lm_keys(read_config(path))))


def _router_buffers(module) -> dict:
    return {t: getattr(module, t) for t in ("weight", "scales", "biases")}


@pytest.mark.parametrize("mode,group_size,bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
@pytest.mark.parametrize("tie", [True, False])
def test_mlx_lm_moe_checkpoint_loads_into_transformers(tmp_path, mode, group_size, bits, tie):
    """An mlx-lm Qwen3-MoE checkpoint (experts as switch_mlp.{gate,up,down}_proj, 8-bit routers, no head tensors
    when tied) in transformers' Qwen3MoeForCausalLM: experts become QuantizedExperts (gate and up rows
    concatenated), routers (bare weights in transformers) QuantizedRouters holding mlx-lm's bytes, a tied head
    follows the quantized embedding; logits equal mlx-lm's own model's."""
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
    router = model.model.layers[0].mlp.gate
    assert isinstance(router, lowbit.nn.QuantizedRouter) and (router.group_size, router.bits) == (64, 8)
    for name, t in _router_buffers(router).items():
        assert same_bits(t, stored[f"model.layers.0.mlp.gate.{name}"]), name

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


def _mlx_tensors(mlx_model) -> dict:
    """mlx-lm's model's parameters by name, as torch tensors (bit-exact)."""
    from mlx.utils import tree_flatten

    return {name: to_torch(a) for name, a in tree_flatten(mlx_model.parameters())}


def _logits_match(model, mlx_model, tol=1e-4):
    import numpy as np

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids).logits.numpy()
    assert np.abs(np.array(mlx_model(mx.array(ids.numpy()))) - ours).max() < tol


MOE_SAVES = [("affine", 64, 4, False), ("mxfp4", 32, 4, False), ("nvfp4", 16, 4, False), ("nvfp4", 16, 4, True)]


@pytest.mark.parametrize("mode,group_size,bits,global_scale", MOE_SAVES)
def test_lowbit_moe_checkpoint_loads_in_mlx_lm(tmp_path, mode, group_size, bits, global_scale):
    """A transformers Qwen3-MoE quantized by lowbit is saved under mlx-lm's names, its config as transformers writes
    it: mlx-lm's own loader builds its model from the directory as written, holding lowbit's bytes (gate_up_proj's
    rows split into switch_mlp's gate_proj and up_proj, the per-expert tensor scale on both; the 8-bit routers as
    mlx-lm's quantized gate linears) and computes lowbit's logits; the quantization block is the one mlx-lm's
    quantize_model writes (8-bit g64 gates, global_scale entries on each switch_mlp projection)."""
    model = _qwen3_moe(tie=False)
    quantization = lowbit.quantize_model(model, group_size, bits, mode, global_scale=global_scale)
    save_quantized(model, tmp_path / "lowbit", quantization, model.config.to_dict())
    saved = load_tensors(tmp_path / "lowbit")
    assert not [name for name in saved if ".experts." in name]

    mlx_model, mlx_config = mlx_lm_utils.load_model(tmp_path / "lowbit")
    held = _mlx_tensors(mlx_model)
    _assert_same_tensors(held, saved)  # every tensor written is what mlx-lm holds, and mlx-lm holds no other
    for i, layer in enumerate(model.model.layers):
        switch, experts = f"model.layers.{i}.mlp.switch_mlp", layer.mlp.experts
        for suffix in ("weight", "scales", "biases", "global_scale"):
            gate_up, down = getattr(experts.gate_up_proj, suffix), getattr(experts.down_proj, suffix)
            if gate_up is None:
                assert f"{switch}.gate_proj.{suffix}" not in held
                continue
            gate, up = held[f"{switch}.gate_proj.{suffix}"], held[f"{switch}.up_proj.{suffix}"]
            assert same_bits(gate_up, gate if suffix == "global_scale" else torch.cat([gate, up], 1)), suffix
            assert suffix != "global_scale" or same_bits(up, gate_up)
            assert same_bits(down, held[f"{switch}.down_proj.{suffix}"]), suffix
        assert isinstance(layer.mlp.gate, lowbit.nn.QuantizedRouter)
        for name, t in _router_buffers(layer.mlp.gate).items():
            assert same_bits(t, held[f"model.layers.{i}.mlp.gate.{name}"]), name

    _save_for_mlx_lm(_qwen3_moe(tie=False), tmp_path / "float")
    _, theirs = _mlx_checkpoint(tmp_path / "float", tmp_path / "mlx", group_size, bits, mode)
    if global_scale:  # (mlx-lm's quantize_model takes global_scale, _mlx_checkpoint does not pass it)
        _, theirs = mlx_lm_utils.quantize_model(*mlx_lm_utils.load_model(tmp_path / "float"), group_size, bits,
                                                 mode=mode, global_scale=True)
    assert theirs["quantization"]["model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}
    expected = _as_read_by_mlx_lm(theirs["quantization"])
    assert mlx_config["quantization"] == expected == read_config(tmp_path / "lowbit")["quantization_config"]
    if not global_scale:  # (MLX's CPU gather_qmm takes no global scale: "only supported on the GPU")
        _logits_match(model, mlx_model)


def test_lowbit_moe_checkpoint_round_trips(tmp_path):
    """load_quantized of what save_quantized writes (mlx-lm's switch_mlp names) gives the saved model's buffers,
    bit for bit, and its logits exactly; nvfp4 with a tensor scale per expert, the case with most tensors."""
    model = _qwen3_moe(tie=True)
    quantization = lowbit.quantize_model(model, mode="nvfp4", global_scale=True)
    save_quantized(model, tmp_path / "ckpt", quantization, model.config.to_dict())
    fresh = _qwen3_moe(tie=True, seed=2)
    load_quantized(fresh, tmp_path / "ckpt")
    assert isinstance(fresh.model.layers[1].mlp.experts, lowbit.nn.QuantizedExperts)
    assert isinstance(fresh.model.layers[1].mlp.gate, lowbit.nn.QuantizedRouter)
    _assert_same_tensors(fresh.state_dict(), model.state_dict())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_moe_with_float_experts_saved_for_mlx_lm(tmp_path):
    """Experts kept float are written as mlx-lm's float switch_mlp (gate_up_proj's rows split) with False entries:
    mlx-lm loads them as float SwitchLinears with lowbit's logits, and lowbit loads them back exactly."""
    model = _qwen3_moe(tie=False)
    quantization = lowbit.quantize_model(model, config={"re:.*experts": False})
    assert quantization["model.layers.0.mlp.experts"] is False
    save_quantized(model, tmp_path / "ckpt", quantization, model.config.to_dict())
    mlx_model, mlx_config = mlx_lm_utils.load_model(tmp_path / "ckpt")
    assert mlx_config["quantization"]["model.layers.0.mlp.switch_mlp.up_proj"] is False
    held = _mlx_tensors(mlx_model)
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert same_bits(torch.cat([held[f"model.layers.0.mlp.switch_mlp.{p}_proj.weight"] for p in ("gate", "up")], 1),
                     gate_up)
    _logits_match(model, mlx_model)
    fresh = _qwen3_moe(tie=False, seed=2)
    load_quantized(fresh, tmp_path / "ckpt")
    _assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_mlx_lm_moe_checkpoint_saved_again_loads_in_mlx_lm(tmp_path):
    """An mlx-lm checkpoint loaded by lowbit and saved again is mlx-lm's checkpoint: the same tensors bit for bit
    (experts and 8-bit routers under mlx-lm's names) and the same quantization block; mlx-lm loads it and gives its
    own logits."""
    _save_for_mlx_lm(_qwen3_moe(tie=False), tmp_path / "float")
    mlx_model, mlx_config = _mlx_checkpoint(tmp_path / "float", tmp_path / "mlx", 64, 4, "affine")
    model = _qwen3_moe(tie=False, seed=1)
    load_quantized(model, tmp_path / "mlx")
    save_quantized(model, tmp_path / "again", mlx_config["quantization"], model.config.to_dict())
    _assert_same_tensors(load_tensors(tmp_path / "again"), load_tensors(tmp_path / "mlx"))
    assert read_config(tmp_path / "again")["quantization"] == mlx_config["quantization"]
    reloaded, _ = mlx_lm_utils.load_model(tmp_path / "again")
    _logits_match(model, reloaded)
    _logits_match(model, mlx_model)


def test_routers_kept_float_or_at_global_parameters_load_in_mlx_lm(tmp_path):
    """A router kept float (config False) is written float with a False entry; with router=None it takes the global
    4 bits and no entry (mlx-lm infers them from the tensors). mlx-lm loads either as written with lowbit's logits,
    and lowbit loads either back exactly, as well as older lowbit checkpoints (float gates, no entry)."""
    models = {}
    for name, kwargs in (("float", {"config": {"re:.*mlp\\.gate": False}}), ("global", {"router": None})):
        model = models[name] = _qwen3_moe(tie=False)
        quantization = lowbit.quantize_model(model, **kwargs)
        save_quantized(model, tmp_path / name, quantization, model.config.to_dict())
        block = read_config(tmp_path / name)["quantization"]
        gate = model.model.layers[0].mlp.gate
        if name == "float":
            assert block["model.layers.0.mlp.gate"] is False and isinstance(gate.weight, torch.nn.Parameter)
            assert load_tensors(tmp_path / name)["model.layers.0.mlp.gate.weight"].is_floating_point()
        else:
            assert "model.layers.0.mlp.gate" not in block and gate.bits == 4
        mlx_model, _ = mlx_lm_utils.load_model(tmp_path / name)
        _assert_same_tensors(_mlx_tensors(mlx_model), load_tensors(tmp_path / name))
        _logits_match(model, mlx_model)
        fresh = _qwen3_moe(tie=False, seed=2)
        load_quantized(fresh, tmp_path / name)
        assert type(fresh.model.layers[1].mlp.gate) is type(model.model.layers[1].mlp.gate)
        _assert_same_tensors(fresh.state_dict(), model.state_dict())
    # lowbit's checkpoints before routers were quantized: a float gate and no entry at all
    config = read_config(tmp_path / "float")
    config["quantization"] = config["quantization_config"] = {
        k: v for k, v in config["quantization"].items() if not k.endswith("mlp.gate")}
    (tmp_path / "float" / "config.json").write_text(json.dumps(config))
    fresh = _qwen3_moe(tie=False, seed=3)
    load_quantized(fresh, tmp_path / "float")
    assert isinstance(fresh.model.layers[0].mlp.gate.weight, torch.nn.Parameter)
    _assert_same_tensors(fresh.state_dict(), models["float"].state_dict())


def test_config_gets_the_keys_mlx_lm_reads(tmp_path):
    """save_quantized adds num_experts, rope_theta, rope_scaling (non-default rope types) and head_dim where
    transformers 5 writes num_local_experts and rope_parameters, never overwriting a key; transformers reads the
    written config back unchanged, and mlx-lm's model args get the values transformers uses."""
    import mlx_lm.models.llama as mlx_llama

    model = _qwen3_moe(tie=False)
    config = model.config.to_dict()
    assert "num_experts" not in config and config.get("rope_theta") is None and config.get("head_dim") == 32
    save_quantized(model, tmp_path / "moe", lowbit.quantize_model(model), config)
    written = read_config(tmp_path / "moe")
    assert (written["num_experts"], written["rope_theta"], written["head_dim"]) == (8, 10000.0, 32)
    assert "rope_scaling" not in written and written["num_local_experts"] == 8
    again = transformers.AutoConfig.from_pretrained(tmp_path / "moe")
    assert (again.num_local_experts, again.head_dim, again.rope_parameters) == (8, 32, config["rope_parameters"])
    import mlx_lm.models.qwen3_moe as mlx_qwen3_moe

    args = mlx_qwen3_moe.ModelArgs.from_dict(written)
    assert (args.num_experts, args.rope_theta, args.head_dim) == (8, 10000.0, 32)

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    llama = _llama()
    llama.config.rope_parameters = rope
    del llama.config.head_dim
    config = llama.config.to_dict()
    assert "head_dim" not in config
    save_quantized(llama, tmp_path / "llama", lowbit.quantize_model(llama), config)
    written = read_config(tmp_path / "llama")
    assert (written["rope_theta"], written["rope_scaling"], written["head_dim"]) == (500000.0, rope, 32)
    assert "num_experts" not in written
    assert transformers.AutoConfig.from_pretrained(tmp_path / "llama").rope_parameters == rope
    args = mlx_llama.ModelArgs.from_dict(written)  # (llama's defaults: rope_theta 10000, no scaling)
    assert (args.rope_theta, args.rope_scaling) == (500000.0, rope)

    present = {"num_local_experts": 8, "num_experts": 4, "rope_theta": 1.0, "rope_scaling": {"type": "linear"},
               "rope_parameters": {"rope_type": "yarn", "rope_theta": 2.0}, "hidden_size": 64,
               "num_attention_heads": 4, "head_dim": 32}
    assert _with_mlx_lm_keys(present) == present  # keys present are never overwritten


def test_save_rejects_experts_that_cannot_be_split(tmp_path):
    """gate_up_proj with an odd number of rows has no gate and up halves: ValueError naming the op, no files."""
    model = _qwen3_moe(tie=False)
    lowbit.quantize_model(model)
    odd = lowbit.nn.QuantizedSwitchLinear.from_weights(torch.randn(8, 127, 128), None)
    model.model.layers[0].mlp.experts.gate_up_proj = odd
    with pytest.raises(ValueError, match=r"\[save_quantized\].*gate_up_proj.*odd number of rows \(127"):
        save_quantized(model, tmp_path / "ckpt", {"group_size": 64, "bits": 4, "mode": "affine"})
    assert not (tmp_path / "ckpt").exists()
