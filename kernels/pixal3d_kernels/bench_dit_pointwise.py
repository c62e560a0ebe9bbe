"""`python -m pixal3d_kernels.bench_dit_pointwise`: a flow block's fused pointwise kernels vs their references.

Cases at the sizes of the 1024 cascade's flows in bf16 with batched CFG (two copies of each sample): the
sparse-structure flow (2 x 4,096 dense tokens, 1,024 channels, 16 heads) and the HR shape / texture flows
(2 x ~13.6 k packed tokens, 1,536 channels, 24 heads). Per block the flow runs the modulated LayerNorm twice, the
affine LayerNorm once, the gated residual twice and the q/k RMS norm + RoPE on the self-attention's q and k
(plus the cross-attention's q without RoPE). `--quick`: small sizes, a CPU smoke run.
"""
from __future__ import annotations

import torch

from . import benchmark
from .dit_pointwise import (gated_residual, gated_residual_reference, modulated_layer_norm,
                            modulated_layer_norm_reference, rms_norm_rope, rms_norm_rope_reference)

# (name, samples, tokens per sample, channels, heads)
CASES = [("ss 2x4096", 2, 4096, 1024, 16), ("hr 2x13559", 2, 13559, 1536, 24)]
QUICK_CASES = [("quick", 2, 50, 64, 2)]


def main(argv: list[str] | None = None) -> None:
    args, device, dtype, run_triton = benchmark.parse_args(__doc__.split("\n\n")[0], argv, "bfloat16")
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, samples, tokens, channels, heads in QUICK_CASES if args.quick else CASES:
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
        h, y = rand(samples * tokens, channels), rand(samples * tokens, channels)
        shift, scale, gate = rand(samples, 6 * channels).chunk(6, dim=-1)[:3]
        weight, bias = torch.randn(channels, generator=g).to(device), torch.randn(channels, generator=g).to(device)
        q = rand(samples * tokens, 3 * channels).unflatten(-1, (3, heads, -1)).unbind(-3)[0]
        gamma = torch.rand(heads, channels // heads, generator=g).to(device) + 0.5
        angles = torch.rand(samples * tokens, channels // heads // 2, generator=g).to(device) * 6
        phases = torch.polar(torch.ones_like(angles), angles)
        ops = {
            "modulated LN": (lambda: modulated_layer_norm(h, None, None, shift, scale, tokens),
                             lambda: modulated_layer_norm_reference(h, None, None, shift, scale, tokens, 1e-6)),
            "affine LN": (lambda: modulated_layer_norm(h, weight, bias),
                          lambda: modulated_layer_norm_reference(h, weight, bias, None, None, 1, 1e-6)),
            "gated residual": (lambda: gated_residual(h, gate, y, tokens),
                               lambda: gated_residual_reference(h, gate, y, tokens)),
            "q rms norm+rope": (lambda: rms_norm_rope(q, gamma, phases),
                                lambda: rms_norm_rope_reference(q, gamma, phases)),
        }
        with torch.no_grad():
            for op, (kernel, reference) in ops.items():
                case = f"{name} {op}"
                rows.append({"kernel": "dit_pointwise", "case": case, "impl": "reference",
                             "ms": benchmark.time_ms(reference, device)})
                if run_triton:
                    err = float((kernel().float() - reference().float()).abs().max())
                    rows.append({"kernel": "dit_pointwise", "case": case, "impl": "triton",
                                 "ms": benchmark.time_ms(kernel, device), "max_abs_err": err})
    benchmark.report(rows, device, args.json)


if __name__ == "__main__":
    main()
