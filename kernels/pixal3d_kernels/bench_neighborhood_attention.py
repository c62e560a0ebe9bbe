"""`python -m pixal3d_kernels.bench_neighborhood_attention`: NAF's attention, reference vs Triton.

The cases are the official NAF upsamplings (4 heads, query dim 64, DINOv3 ViT-L's 1024 channels = 4 x 256):
64^2 patch cells -> 512^2 (shape stages, dilation 8) and -> 1024^2 (texture stage, dilation 16), 9 x 9 window.
The reference runs on the repeated keys and values, as NAF did before the kernel (the repeat is timed with it);
the Triton row records its max abs error against it. `--quick`: small maps, a CPU smoke run.
"""
from __future__ import annotations

import torch

from . import benchmark
from .neighborhood_attention import neighborhood_attention_2d_reference, repeat_cells

# (cells, output size, heads, query dim, value dim per head)
NAF_CASES = [(64, 512, 4, 64, 256), (64, 1024, 4, 64, 256)]
QUICK_CASES = [(9, 18, 2, 16, 16)]


def main(argv: list[str] | None = None) -> None:
    args, device, dtype, run_triton = benchmark.parse_args(__doc__.split("\n\n")[0], argv)
    rows = []
    g = torch.Generator().manual_seed(0)
    for cells, size, heads, d, dv in QUICK_CASES if args.quick else NAF_CASES:
        r = size // cells
        q = torch.randn(1, size, size, heads, d, generator=g).to(device, dtype)
        k = torch.randn(1, cells, cells, heads, d, generator=g).to(device, dtype)
        v = torch.randn(1, cells, cells, heads, dv, generator=g).to(device, dtype)
        case = f"{cells}^2 -> {size}^2 x {heads * dv} ch"

        def reference():
            return neighborhood_attention_2d_reference(q, repeat_cells(k, (r, r)), repeat_cells(v, (r, r)), 9, r)

        timing = dict(warmup=1, repeats=3)
        with torch.no_grad():
            rows.append({"kernel": "neighborhood_attn", "case": case, "impl": "reference",
                         "ms": benchmark.time_ms(reference, device, **timing)})
            if run_triton:
                from .neighborhood_attention_triton import cell_attention

                err = float((cell_attention(q, k, v, (9, 9)).float() - reference().float()).abs().max())
                rows.append({"kernel": "neighborhood_attn", "case": case, "impl": "triton", "max_abs_err": err,
                             "ms": benchmark.time_ms(lambda: cell_attention(q, k, v, (9, 9)), device,
                                                     warmup=2, repeats=7)})
        del q, k, v
    benchmark.report(rows, device, args.json)


if __name__ == "__main__":
    main()
