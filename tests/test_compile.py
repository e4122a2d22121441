"""The ops as torch.library custom ops: opcheck for each, torch.compile(fullgraph=True, dynamic=True) of quantized
models with no graph break, one graph for every M and eager's bits, gradients through the compiled op, and (on a
GPU) CUDA-graph capture and replay equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.library import opcheck

import lowbit
from lowbit.nn import QQLinear, QuantizedEmbedding, QuantizedLinear, SwitchGLU

OPS = torch.ops.lowbit
FORMATS = [("affine", 64, 4), ("affine", 32, 3), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _quantized(shape, mode, gs, bits, device="cpu", seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    q = lowbit.quantize(w, gs, bits, mode)
    return w, (q if mode == "affine" else (*q, None))


def _permuted(t):
    """The same values with other strides (a transposed copy read back through .t())."""
    return t.t().contiguous().t() if t.ndim == 2 else t


@pytest.mark.parametrize("mode,gs,bits", FORMATS)
def test_opcheck_every_op(mode, gs, bits):
    w, (wq, s, b) = _quantized((48, 128), mode, gs, bits)
    x = torch.randn(5, 128, requires_grad=True)
    opcheck(OPS.quantize.default, (w, gs, bits, mode, None, "raise"))
    opcheck(OPS.dequantize.default, (wq, s, b, gs, bits, mode, None, None))
    opcheck(OPS.quantized_matmul.default, (x, wq, s, b, True, gs, bits, mode, None))
    x_strided = _permuted(x.detach()).requires_grad_()
    opcheck(OPS.quantized_matmul.default, (x_strided, wq, s, b, True, gs, bits, mode, None))
    xb = torch.randn(2, 3, 48, requires_grad=True)  # transpose=False, batch broadcast against one weight
    opcheck(OPS.quantized_matmul.default, (xb, wq, s, b, False, gs, bits, mode, None))
    _, (wq3, s3, b3) = _quantized((4, 48, 128), mode, gs, bits, seed=1)
    xg = torch.randn(3, 2, 128, requires_grad=True)
    lhs, rhs = torch.tensor([0, 2, 1, 1]), torch.tensor([3, 1, 0, 3])
    opcheck(OPS.gather_qmm.default, (xg, wq3, s3, b3, lhs, rhs, True, gs, bits, mode, None, False))
    opcheck(OPS.gather_qmm.default, (xg, wq3, s3, b3, None, rhs[:3], True, gs, bits, mode, None, False))
    if mode != "affine":
        opcheck(OPS.qqmm.default, (x.detach(), wq, s, gs, bits, mode, None, None))
        opcheck(OPS.qqmm.default, (x.detach(), w, None, gs, bits, mode, None, None))  # float w quantized on the fly
        opcheck(OPS.gather_qqmm.default, (xg.detach(), wq3, s3, lhs, rhs, gs, bits, mode, None, None, False))


def test_opcheck_nvfp4_tensor_scales():
    w = torch.randn(48, 128)
    gw, gx = w.abs().amax().reshape(1), torch.tensor([3.0])
    wq, s = lowbit.quantize(w, mode="nvfp4", global_scale=gw)
    x = torch.randn(4, 128, requires_grad=True)
    opcheck(OPS.quantize.default, (w, None, None, "nvfp4", gw, "raise"))
    opcheck(OPS.dequantize.default, (wq, s, None, None, None, "nvfp4", gw, torch.float16))
    opcheck(OPS.quantized_matmul.default, (x, wq, s, None, True, None, None, "nvfp4", gw))
    opcheck(OPS.qqmm.default, (x.detach(), wq, s, None, None, "nvfp4", gx, gw))


class _TinyModel(nn.Module):
    """Embedding, a quantized MLP, a linear with K split into partials, an MoE block and a tied head: every
    quantized module in one forward."""

    def __init__(self, mode, gs, bits):
        super().__init__()
        torch.manual_seed(0)
        self.embed = QuantizedEmbedding.from_embedding(nn.Embedding(96, 64), gs, bits, mode)
        self.up = QuantizedLinear.from_linear(nn.Linear(64, 128), gs, bits, mode)
        self.down = QuantizedLinear.from_linear(nn.Linear(128, 64, bias=False), gs, bits, mode)
        self.wide = QuantizedLinear.from_linear(nn.Linear(2048, 64, bias=False), gs, bits, mode)  # split partials
        self.router = nn.Linear(64, 4, bias=False)
        self.moe = SwitchGLU(64, 64, 4)
        lowbit.quantize_model(self.moe, gs, bits, mode)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        h = h + self.wide(h.repeat(1, 1, 32)) / 32
        top = self.router(h).topk(2, dim=-1).indices
        h = h + self.moe(h, top).sum(dim=-2)
        return self.embed.as_linear(h)


def _graph_count(fn, inputs):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    outs = [compiled(x) for x in inputs]
    return counter.frame_count, outs


@pytest.mark.parametrize("mode,gs,bits", [("affine", 64, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8)])
def test_compiled_model_fullgraph_one_graph_for_every_length(mode, gs, bits):
    model = _TinyModel(mode, gs, bits).eval()
    inputs = [torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5, 9, 17, 40, 57)]
    with torch.no_grad():
        frames, outs = _graph_count(model, inputs)
        eager = [model(x) for x in inputs]
    # fullgraph=True fails on any graph break. Two graphs for six lengths: the MoE block sorts its routed rows from
    # 64 on (mlx-lm's rule, 2 experts per token), a second code path; no recompile for a new length otherwise.
    assert frames == 2
    for a, b in zip(outs, eager):
        assert torch.equal(a, b)


def test_transformers_moe_block_with_quantized_router_compiles():
    """A transformers Qwen3-MoE block with its bare-weight router quantized (QuantizedRouter runs the router's own
    forward, whose F.linear its weight's stand-in serves) compiles with fullgraph=True and gives eager's bits."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    lowbit.quantize_model(block)
    assert isinstance(block.gate, lowbit.nn.QuantizedRouter)
    inputs = [torch.randn(1, n, 64, generator=torch.Generator().manual_seed(n)) for n in (3, 9, 40)]
    with torch.no_grad():
        _, outs = _graph_count(block, inputs)  # (fullgraph=True: no graph break)
        for x, out in zip(inputs, outs):
            assert torch.equal(out, block(x))


def test_inductor_compiled_linear_equals_eager():
    layer = QuantizedLinear.from_linear(nn.Linear(128, 96), 64, 4, "affine")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for m in (1, 2, 17):
            x = torch.randn(m, 128)
            assert torch.equal(compiled(x), layer(x))


def test_qqlinear_compiles():
    layer = QQLinear.from_linear(nn.Linear(128, 48, bias=False), mode="nvfp4")
    inputs = [torch.randn(m, 128) for m in (2, 6, 33)]  # (torch specializes size 1: M = 1 gets a graph of its own)
    with torch.no_grad():
        frames, outs = _graph_count(layer, inputs)
        assert frames == 1
        for x, y in zip(inputs, outs):
            assert torch.equal(y, layer(x))


def _assert_compiled_gradient_equals_eager(loss, x):
    loss(x).backward()
    eager_grad, x.grad = x.grad.clone(), None
    torch._dynamo.reset()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(x).backward()
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_gradient_through_compiled_op_equals_eager():
    _, (wq, s, b) = _quantized((48, 128), "affine", 64, 4)
    x = torch.randn(2, 3, 128, requires_grad=True)
    target = torch.randn(2, 3, 48)

    def loss(x):
        return ((lowbit.quantized_matmul(x, wq, s, b) - target) ** 2).sum()

    _assert_compiled_gradient_equals_eager(loss, x)


def test_gather_gradient_through_compiled_op_equals_eager():
    _, (wq, s, b) = _quantized((4, 48, 128), "affine", 64, 4)
    x = torch.randn(3, 2, 128, requires_grad=True)
    lhs, rhs = torch.tensor([0, 2, 1, 1]), torch.tensor([3, 1, 0, 3])

    def loss(x):
        return lowbit.gather_qmm(x, wq, s, b, lhs, rhs).square().sum()

    _assert_compiled_gradient_equals_eager(loss, x)


def test_compiled_errors_still_name_the_op():
    _, (wq, s, b) = _quantized((48, 128), "affine", 64, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: lowbit.quantized_matmul(x, wq, s, b), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"\[quantized_matmul\] Last dimension of x"):
        compiled(torch.randn(2, 100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode,gs,bits", [("affine", 64, 4), ("mxfp4", 32, 4), ("nvfp4", 16, 4)])
def test_cuda_graph_replay_equals_eager(mode, gs, bits):
    model = _TinyModel(mode, gs, bits).cuda().eval()
    ids = torch.randint(0, 96, (1, 4), device="cuda")
    static = ids.clone()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: compile the kernels, build every cached object before capture
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(static)
        for seed in range(3):
            new = torch.randint(0, 96, (1, 4), device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static.copy_(new)
            graph.replay()
            assert torch.equal(out, model(new))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compiled_reduce_overhead_equals_eager_on_gpu():
    """Compiled with CUDA graphs: a quantized linear alone gives eager's bits (the op is the same kernel); the
    whole model agrees closely (Inductor fuses torch's own float ops around the lowbit ops differently)."""
    model = _TinyModel("affine", 64, 4).cuda().eval()
    x = torch.randn(1, 64, device="cuda")
    ids = torch.randint(0, 96, (1, 1), device="cuda")
    with torch.no_grad():
        torch._dynamo.reset()
        linear = torch.compile(model.up, mode="reduce-overhead", fullgraph=True)
        whole = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            out, logits = linear(x).clone(), whole(ids).clone()
        assert torch.equal(out, model.up(x))
        torch.testing.assert_close(logits, model(ids), rtol=1e-4, atol=1e-4)
