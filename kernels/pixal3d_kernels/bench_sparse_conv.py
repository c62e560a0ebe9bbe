"""`python -m pixal3d_kernels.bench_sparse_conv`: neighbour map and submanifold conv, reference vs Triton vs spconv.

The voxels are a sphere shell ~2.2 voxels thick refined level by level like the 1024 shape decoder's hierarchy
(64^3 -> 1024^3: ~14 k, 55 k, 220 k, 880 k, 3.5 M voxels; the bench object of BENCHMARKS.md has 13.6 k -> 3.47 M),
and every conv of that decoder (fp16, its channel widths) runs on its level:
ConvNeXt convs C -> C and the C2S convs C -> 8 * C/2. `--quick`: small levels and channels, a CPU smoke run.

Impls: "reference" (plain PyTorch), "triton" (mask-sorted row tiles), "triton-unsorted" (input row order: the sort's
gain against the locality it loses), "spconv" (when importable; its indices built once and reused, as in the
decoder). Each Triton row records its max abs error against the reference. The neighbour map has "reference",
"triton" and "triton+plan" (map plus the conv's tiling plan, what one coordinate set costs before its first conv).
"""
from __future__ import annotations

import torch

from . import benchmark
from .sparse_conv import build_neighbor_map_reference, submanifold_conv3d_reference

# (level, in channels, out channels) of the 1024 shape decoder's convs: model_channels 1024, 512, 256, 128, 64
DECODER_CONVS = [(0, 1024, 1024), (0, 1024, 4096), (1, 512, 512), (1, 512, 2048), (2, 256, 256), (2, 256, 1024),
                 (3, 128, 128), (3, 128, 512), (4, 64, 64)]
QUICK_CONVS = [(0, 64, 64), (1, 32, 128), (2, 16, 16)]
CHILDREN = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)])


def shell_levels(base: int, levels: int, device: torch.device, thickness: float = 2.2) -> list[torch.Tensor]:
    """int32 coords [N, 4] (batch 0) of a sphere shell at resolutions base * 2^s, each level the kept children of
    the previous one (so no dense grid beyond the first level)."""
    def keep(cells: torch.Tensor, res: int) -> torch.Tensor:
        r = (cells.float() + 0.5 - res / 2).norm(dim=1)
        return cells[(r - 0.35 * res).abs() < thickness / 2]

    g = torch.arange(base, device=device)
    cells = keep(torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3), base)
    out = []
    for s in range(levels):
        if s:
            cells = keep((cells[:, None] * 2 + CHILDREN.to(device)).reshape(-1, 3), base << s)
        out.append(torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int().contiguous())
    return out


def spconv_runner(coords: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """A callable running spconv's SubMConv3d on (coords, feats) with our weight, indices built on the first call;
    None when spconv is not importable."""
    try:
        import spconv.pytorch as spconv
    except ImportError:
        return None
    c_out, c_in = weight.shape[0], weight.shape[-1]
    conv = spconv.SubMConv3d(c_in, c_out, 3, bias=True, indice_key="subm").to(feats.device, feats.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)        # spconv's KRSC layout is [Co, 3, 3, 3, Ci], ours
        conv.bias.copy_(bias)
    spatial = (coords[:, 1:].amax(0) + 1).tolist()
    x = spconv.SparseConvTensor(feats, coords, spatial, 1)
    return lambda: conv(x).features


def main(argv: list[str] | None = None) -> None:
    args, device, dtype, run_triton = benchmark.parse_args(__doc__.split("\n\n")[0], argv,
                                                           default_dtype="float16")
    quick = args.quick
    levels = shell_levels(8 if quick else 64, 3 if quick else 5, device)
    repeats = dict(warmup=1, repeats=3) if quick or device.type != "cuda" else dict(warmup=2, repeats=7)
    rows = []

    def row(kernel, case, impl, fn, **extra):
        rows.append({"kernel": kernel, "case": case, "impl": impl, "ms": benchmark.time_ms(fn, device, **repeats),
                     **extra})

    maps = {}
    for s, coords in enumerate(levels):
        case = f"{8 << s if quick else 64 << s}^3 {coords.shape[0]:,} vox"
        row("neighbor_map", case, "reference", lambda: build_neighbor_map_reference(coords), voxels=coords.shape[0])
        maps[s] = build_neighbor_map_reference(coords)
        if run_triton:
            from .sparse_conv_triton import ConvPlan, build_neighbor_map as triton_map

            same = bool(torch.equal(triton_map(coords), maps[s]))
            row("neighbor_map", case, "triton", lambda: triton_map(coords), voxels=coords.shape[0], identical=same)
            row("neighbor_map", case, "triton+plan", lambda: ConvPlan.build(triton_map(coords)),
                voxels=coords.shape[0])

    g = torch.Generator().manual_seed(0)
    for s, c_in, c_out in QUICK_CONVS if quick else DECODER_CONVS:
        coords, nmap = levels[s], maps[s]
        n = coords.shape[0]
        feats = torch.randn(n, c_in, generator=g).to(device, dtype)
        weight = (torch.randn(c_out, 3, 3, 3, c_in, generator=g) / (27 * c_in) ** 0.5).to(device, dtype)
        bias = torch.randn(c_out, generator=g).to(device, dtype)
        case = f"{n:,} vox {c_in}->{c_out}"
        with torch.no_grad():
            ref = submanifold_conv3d_reference(feats, nmap, weight, bias)
            row("submanifold_conv", case, "reference", lambda: submanifold_conv3d_reference(feats, nmap, weight, bias),
                voxels=n, c_in=c_in, c_out=c_out)
            if run_triton:
                from . import sparse_conv_triton as st

                for impl, plan in (("triton", st.ConvPlan.build(nmap)),
                                   ("triton-unsorted", st.ConvPlan.build(nmap, sort_rows=False))):
                    err = (st.submanifold_conv3d(feats, plan, weight, bias).float() - ref.float()).abs().max()
                    active = float(plan.tile_offset_counts.float().mean())
                    row("submanifold_conv", case, impl, lambda: st.submanifold_conv3d(feats, plan, weight, bias),
                        voxels=n, c_in=c_in, c_out=c_out, max_abs_err=float(err), mean_tile_offsets=active)
            spconv_conv = spconv_runner(coords, feats, weight, bias) if device.type == "cuda" else None
            if spconv_conv is not None:
                err = (spconv_conv().float() - ref.float()).abs().max()
                row("submanifold_conv", case, "spconv", spconv_conv, voxels=n, c_in=c_in, c_out=c_out,
                    max_abs_err=float(err))
        del feats, weight, ref
    for r in rows:
        if r["kernel"] == "submanifold_conv":
            r["tflop_per_s_dense"] = 2.0 * r["voxels"] * 27 * r["c_in"] * r["c_out"] / r["ms"] / 1e9
    benchmark.report(rows, device, args.json)


if __name__ == "__main__":
    main()
