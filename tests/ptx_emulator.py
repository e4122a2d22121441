"""A small interpreter of the straight-line inline PTX that lowbit's Triton kernels carry as text (the e2m1 word
encoder of quantize, the e4m3 pair decoder of the matmuls), so that CPU tests can check those asm strings against
the codecs exhaustively. Registers are int64 tensors holding 32-bit values."""

import torch


def u32(x: torch.Tensor) -> torch.Tensor:
    return x & 0xFFFFFFFF


def as_f32(x: torch.Tensor) -> torch.Tensor:
    return u32(x).to(torch.int64).to(torch.int32).view(torch.float32)


def f32_bits(f: torch.Tensor) -> torch.Tensor:
    return f.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def bf16_bits(f: torch.Tensor) -> torch.Tensor:
    """float -> bfloat16 bits, rounded to nearest even (torch's conversion)."""
    return f.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def bf16_value(bits: torch.Tensor) -> torch.Tensor:
    return as_f32(bits << 16)


def lanewise(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return op(a & 0xFFFF, b & 0xFFFF) | (op(a >> 16, b >> 16) << 16)


def _fma_bf16x2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    def lane(shift):
        va, vb, vc = (bf16_value((t >> shift) & 0xFFFF).double() for t in (a, b, c))
        return bf16_bits(va * vb + vc)
    return lane(0) | (lane(16) << 16)


def run_ptx(text: str, operands: dict) -> dict:
    """Execute the straight-line PTX of `text` (the instructions of e2m1_words_bf16[_scaled], e4m3_pair and the Gluon
    kernel's affine4 byte decoder) on int64 tensors holding 32-bit registers, with PTX's semantics: IEEE float32
    products rounded to nearest even, cvt.rn (cvt.rz) to bfloat16, bfloat16 additions, products and fmas rounded once
    (the float64 sum or product of two bfloat16 values is exact, and in the uses here exact in float32 too, so
    torch's conversion rounds it once), bfloat16 compares per 16-bit lane (all ones where true, NaN never true),
    16-bit lanes for min/max.u16x2, 32-bit wrap-around integer arithmetic, prmt's byte select, lop3's truth table;
    `mov.b32 {lo, hi}, r` splits r into two 16-bit results and `mov.b32 r, {lo, hi}` packs two."""
    regs = dict(operands)

    def val(token):
        token = token.strip()
        if token.startswith("0x"):
            return torch.tensor(int(token, 16), dtype=torch.int64)
        if token.isdigit():
            return torch.tensor(int(token), dtype=torch.int64)
        return regs[token]

    body = text.strip()
    body = body[1:body.rindex("}")] if body.startswith("{") else body  # (the block's own braces)
    for line in body.split(";"):
        line = line.strip()
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        if op == "mov.b32" and args.lstrip().startswith("{"):  # unpack: mov.b32 {lo, hi}, r
            lanes, source = args.split("}")
            lo, hi = (a.strip() for a in lanes.strip(" {").split(","))
            r = val(source.strip(" ,"))
            regs[lo], regs[hi] = r & 0xFFFF, (r >> 16) & 0xFFFF
            continue
        if op == "mov.b32" and "{" in args:  # pack: mov.b32 r, {lo, hi}
            d, lanes = args.split(",", 1)
            lo, hi = (val(a) for a in lanes.strip(" {}").split(","))
            regs[d.strip()] = u32((lo & 0xFFFF) | ((hi & 0xFFFF) << 16))
            continue
        d, *src = [a.strip() for a in args.split(",")]
        x = [val(s) for s in src]
        if op == "mov.b32":
            r = x[0] + torch.zeros_like(x[0])
        elif op == "mul.rn.f32":
            r = f32_bits(as_f32(x[0]) * as_f32(x[1]))
        elif op == "cvt.rn.bf16x2.f32":
            r = bf16_bits(as_f32(x[1])) | (bf16_bits(as_f32(x[0])) << 16)
        elif op == "cvt.rz.bf16x2.f32":  # truncation (NaN never reaches it)
            r = (x[1] >> 16) | ((x[0] >> 16) << 16)
        elif op == "min.u32":
            r = torch.minimum(x[0], x[1])
        elif op == "mul.rn.bf16x2":
            r = lanewise(lambda a, b: bf16_bits(bf16_value(a).double() * bf16_value(b).double()), x[0], x[1])
        elif op == "set.gt.u32.bf16x2":
            r = lanewise(lambda a, b: (bf16_value(a) > bf16_value(b)).to(torch.int64) * 0xFFFF, x[0], x[1])
        elif op == "add.rn.bf16x2":
            r = lanewise(lambda a, b: bf16_bits(bf16_value(a).double() + bf16_value(b).double()), x[0], x[1])
        elif op == "min.u16x2":
            r = lanewise(torch.minimum, x[0], x[1])
        elif op == "max.u16x2":
            r = lanewise(torch.maximum, x[0], x[1])
        elif op == "and.b32":
            r = x[0] & x[1]
        elif op == "or.b32":
            r = x[0] | x[1]
        elif op == "add.u32":
            r = x[0] + x[1]
        elif op == "sub.u32":
            r = x[0] - x[1]
        elif op == "shl.b32":
            r = x[0] << x[1]
        elif op == "shr.u32":
            r = x[0] >> x[1]
        elif op == "lop3.b32":  # any function of three inputs, by its truth table (bit 4a + 2b + c of the last)
            a, b, c, table = x[0], x[1], x[2], int(x[3])
            r = torch.zeros_like(a + b + c)
            for i in range(8):
                if table >> i & 1:
                    r = r | ((a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c))
        elif op == "fma.rn.bf16x2":  # a * b + c rounded once: in the uses here ((128 + code) * s - 128 * s) the
            # product and the sum are exact in float32, so torch's conversion rounds once
            r = _fma_bf16x2(x[0], x[1], x[2])
        elif op == "prmt.b32":
            pool = [(x[0] >> (8 * i)) & 0xFF for i in range(4)] + [(x[1] >> (8 * i)) & 0xFF for i in range(4)]
            r = sum(pool[(int(x[2]) >> (4 * i)) & 7] << (8 * i) for i in range(4))
        else:
            raise NotImplementedError(op)
        regs[d] = u32(r)
    return regs
