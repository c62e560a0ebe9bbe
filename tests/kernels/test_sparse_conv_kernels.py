"""Triton neighbour map and submanifold conv against their plain-PyTorch references (pixal3d_kernels.sparse_conv).

On CUDA the kernels run compiled; without a GPU they run through Triton's interpreter (sizes are tiny for it).
Tolerances (conv output against the fp32 reference on the same rounded inputs, outputs of order 1, atol = rtol):
fp32 1e-4 (3xTF32 on GPU), fp16 5e-3, bf16 3e-2 (one output rounding plus fp32-accumulation order).
The neighbour map must be identical.
"""
import pytest
import torch
from pixal3d_kernels import sparse_conv

TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


pytestmark = pytest.mark.usefixtures("triton_kernels")


def random_coords(batch=2, res=8, density=0.3, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    coords = torch.argwhere(torch.rand(batch, res, res, res, generator=g) < density).int()
    if shuffle:        # rows need not be sorted: only batch-contiguous rows are a SparseTensor convention
        coords = coords[torch.randperm(coords.shape[0], generator=g)]
    return coords.contiguous().to(DEVICE)


def conv_inputs(n, c_in, c_out, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, c_in, generator=g)
    weight = torch.randn(c_out, 3, 3, 3, c_in, generator=g) / (27 * c_in) ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    return [t if t is None else t.to(DEVICE, dtype) for t in (feats, weight, b)]


def check_conv(coords, c_in, c_out, dtype, bias=True, cache=None):
    nmap = sparse_conv.build_neighbor_map_reference(coords)
    feats, weight, b = conv_inputs(coords.shape[0], c_in, c_out, dtype, bias=bias)
    with torch.no_grad():
        out = sparse_conv.submanifold_conv3d(feats, nmap, weight, b, cache=cache)
    ref = sparse_conv.submanifold_conv3d_reference(feats.float(), nmap, weight.float(), None if b is None else b.float())
    assert out.dtype == dtype and out.shape == (coords.shape[0], c_out)
    torch.testing.assert_close(out.float(), ref, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return out


# -- neighbour map ---------------------------------------------------------------------------------------------

def test_neighbor_map_identical_to_reference():
    coords = random_coords()
    assert torch.equal(sparse_conv.build_neighbor_map(coords), sparse_conv.build_neighbor_map_reference(coords))


def test_neighbor_map_edge_cases():
    empty = torch.zeros(0, 4, dtype=torch.int32, device=DEVICE)
    assert sparse_conv.build_neighbor_map(empty).shape == (0, 27)
    single = torch.tensor([[0, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    expected = torch.full((1, 27), -1, dtype=torch.int32)
    expected[0, 13] = 0
    assert torch.equal(sparse_conv.build_neighbor_map(single).cpu(), expected)
    # the same cells in two batch items, touching each other's batch index: never neighbours across items;
    # corners of the key fields (0 and the largest value the hash keys take) and one past it (reference path)
    for top in (32767, 40000):
        cells = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 1, 1], [top, top, top], [top - 1, top, top]])
        coords = torch.cat([torch.cat([torch.full((5, 1), b), cells], 1) for b in (3, 2)]).int().to(DEVICE)
        nmap = sparse_conv.build_neighbor_map(coords)
        assert torch.equal(nmap, sparse_conv.build_neighbor_map_reference(coords))
        item = torch.arange(10, device=DEVICE) // 5
        assert ((nmap < 0) | (nmap // 5 == item[:, None])).all()
        assert nmap[0, 13 + 1] == 1 and nmap[5, 13 + 1] == 6 and nmap[3, 13 - 9] == 4


def test_neighbor_map_rejects_negative_coordinates():
    with pytest.raises(ValueError, match="non-negative"):
        sparse_conv.build_neighbor_map(torch.tensor([[0, -1, 0, 0]], dtype=torch.int32, device=DEVICE))


# -- convolution -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("c_in,c_out,dtype", [
    (5, 7, torch.float32),          # channels far below one block
    (20, 33, torch.float16),        # neither a multiple of its block
    pytest.param(16, 16, torch.bfloat16, marks=pytest.mark.skipif(
        not CUDA, reason="Triton 3.6's interpreter computes bf16 tl.dot on the raw bits")),
])
def test_conv_matches_reference(c_in, c_out, dtype):
    check_conv(random_coords(), c_in, c_out, dtype)


def test_conv_without_bias_and_plan_reused_from_cache():
    coords = random_coords(seed=1)
    cache = {}
    first = check_conv(coords, 8, 16, torch.float32, bias=False, cache=cache)
    plan = cache["submanifold_conv3d_plan"]
    assert torch.equal(check_conv(coords, 8, 16, torch.float32, bias=False, cache=cache), first)
    assert cache["submanifold_conv3d_plan"] is plan


def test_conv_edge_cases():
    check_conv(torch.zeros(0, 4, dtype=torch.int32, device=DEVICE), 4, 4, torch.float32)
    check_conv(torch.tensor([[0, 0, 0, 0]], dtype=torch.int32, device=DEVICE), 4, 4, torch.float32)
    # two batch items with the same cells next to each other's: rows of one must not add into the other
    cells = torch.tensor([[0, 0, 0], [0, 0, 1], [32767, 32767, 32767], [32767, 32767, 32766]])
    coords = torch.cat([torch.cat([torch.full((4, 1), b), cells], 1) for b in (0, 1)]).int().to(DEVICE)
    check_conv(coords, 4, 4, torch.float32)


def test_plan_with_and_without_row_sorting_agree():
    from pixal3d_kernels import sparse_conv_triton

    coords = random_coords(batch=1, res=7, seed=2)
    nmap = sparse_conv.build_neighbor_map_reference(coords)
    feats, weight, b = conv_inputs(coords.shape[0], 8, 8, torch.float32)
    sorted_plan = sparse_conv_triton.ConvPlan.build(nmap)
    assert (sorted_plan.tile_offset_counts <= 27).all() and sorted(sorted_plan.rows.tolist()) == list(range(len(nmap)))
    unsorted = sparse_conv_triton.submanifold_conv3d(feats, sparse_conv_triton.ConvPlan.build(nmap, False), weight, b)
    torch.testing.assert_close(sparse_conv_triton.submanifold_conv3d(feats, sorted_plan, weight, b), unsorted)


def test_conv_keeps_autograd_through_the_reference():
    coords = random_coords(batch=1, res=4, seed=3)
    nmap = sparse_conv.build_neighbor_map_reference(coords)
    feats, weight, b = conv_inputs(coords.shape[0], 3, 2, torch.float32)
    weight.requires_grad_()
    out = sparse_conv.submanifold_conv3d(feats, nmap, weight, b)
    out.square().sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
