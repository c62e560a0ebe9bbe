"""Submanifold sparse conv: the backends against dense F.conv3d and against each other (the Triton kernels
against their references: tests/kernels)."""
import pytest
import torch
import torch.nn.functional as F
from pixal3d_kernels import sparse_conv
from pixal3d_kernels.sparse_conv import CoordinateIndex, build_neighbor_map

from pixal3d_backend.sparse import SparseTensor
from pixal3d_backend.sparse_conv import SubMConv3d


def _random_sparse(batch=3, res=9, density=0.3, channels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.argwhere(torch.rand(batch, res, res, res, generator=g) < density).int()   # column-major!
    return coords, torch.randn(coords.shape[0], channels, generator=g)


def _dense_reference(conv, coords, feats, res):
    b, x, y, z = coords.long().unbind(1)
    dense = torch.zeros(int(b.max()) + 1, feats.shape[1], res, res, res)
    dense[b, :, x, y, z] = feats
    out = F.conv3d(dense, conv.weight.permute(0, 4, 1, 2, 3), conv.bias, padding=1)
    return out[b, :, x, y, z]


@pytest.mark.parametrize("lookup", ["dense table", "sorted keys"])
def test_neighbor_map_matches_brute_force(lookup, monkeypatch):
    """Both lookups of `CoordinateIndex` (a dense table for small boxes, binary search beyond DENSE_LIMIT cells)."""
    if lookup == "sorted keys":
        monkeypatch.setattr(CoordinateIndex, "DENSE_LIMIT", 0)
    coords, _ = _random_sparse(batch=2, res=5)
    assert (CoordinateIndex(coords).table is None) == (lookup == "sorted keys")
    nmap = build_neighbor_map(coords)
    rows = {tuple(c): i for i, c in enumerate(coords.tolist())}
    for i, (b, x, y, z) in enumerate(coords.tolist()):
        for k, (dx, dy, dz) in enumerate(sparse_conv.KERNEL_OFFSETS.tolist()):
            assert nmap[i, k] == rows.get((b, x + dx, y + dy, z + dz), -1)


@pytest.mark.parametrize("dense_limit", [CoordinateIndex.DENSE_LIMIT, 0])
@pytest.mark.parametrize("margin", [None, [1, 1, 1]])
def test_coordinate_index_rejects_outside_and_missing(dense_limit, margin, monkeypatch):
    monkeypatch.setattr(CoordinateIndex, "DENSE_LIMIT", dense_limit)
    index = CoordinateIndex(torch.tensor([[0, 2, 3], [1, 0, 0], [4, 4, 4]]), margin=margin)
    found = index.find(torch.tensor([[4, 4, 4], [0, 2, 3], [0, 2, 4], [5, 0, 0], [-1, 0, 0], [1, 0, 0]]))
    assert found.tolist() == [2, 0, -1, -1, -1, 1]
    assert index.find_shifted(torch.tensor([-1, 0, 0])).tolist() == [-1, -1, -1]
    assert index.find_shifted(torch.tensor([0, 0, 0])).tolist() == [0, 1, 2]
    assert index.find_shifted(torch.tensor([1, -2, -3])).tolist() == [1, -1, -1]   # beyond the margin too


@pytest.mark.parametrize("backend", ["torch", "triton", "spconv"])
def test_backend_matches_dense_conv3d(backend, monkeypatch):
    if backend == "spconv":
        pytest.importorskip("spconv.pytorch")
    monkeypatch.setenv("PIXAL3D_SPARSE_CONV", backend)
    torch.manual_seed(0)
    coords, feats = _random_sparse()
    conv = SubMConv3d(5, 7)
    with torch.no_grad():
        x = SparseTensor(feats, coords)
        out = conv(x)
        again = conv(x)             # second call reuses the cached neighbour data
    ref = _dense_reference(conv, coords, feats, 9)
    torch.testing.assert_close(out.feats, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.feats, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.coords, coords) and out.cache is x.cache


def test_backends_agree_on_a_surface_shell(monkeypatch):
    pytest.importorskip("spconv.pytorch")
    torch.manual_seed(1)
    g = torch.arange(20).float()
    r = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).sub(9.5).norm(dim=-1)
    shell = ((r > 6) & (r < 8)).unsqueeze(0).expand(2, -1, -1, -1)
    coords = torch.argwhere(shell).int().contiguous()
    feats = torch.randn(coords.shape[0], 16)
    conv = SubMConv3d(16, 24)
    with torch.no_grad():
        monkeypatch.setenv("PIXAL3D_SPARSE_CONV", "torch")
        a = conv(SparseTensor(feats, coords)).feats
        monkeypatch.setenv("PIXAL3D_SPARSE_CONV", "spconv")
        b = conv(SparseTensor(feats, coords)).feats
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_chunked_gemm_equals_single_chunk(monkeypatch):
    coords, feats = _random_sparse(channels=8)
    conv = SubMConv3d(8, 4)
    nmap = build_neighbor_map(coords)
    with torch.no_grad():
        whole = sparse_conv.submanifold_conv3d_reference(feats, nmap, conv.weight, conv.bias)
        monkeypatch.setitem(sparse_conv._GATHER_BUDGET, "cpu", 27 * 8 * 7)    # 7 rows per chunk
        chunked = sparse_conv.submanifold_conv3d_reference(feats, nmap, conv.weight, conv.bias)
    torch.testing.assert_close(chunked, whole)


def test_gradients_flow_through_the_torch_backend(monkeypatch):
    monkeypatch.setenv("PIXAL3D_SPARSE_CONV", "torch")
    coords, feats = _random_sparse(batch=1, res=5, channels=3)
    conv = SubMConv3d(3, 2)
    conv(SparseTensor(feats.requires_grad_(), coords)).feats.square().sum().backward()
    assert conv.weight.grad.abs().sum() > 0 and feats.grad.shape == feats.shape


def test_state_dict_layout_and_errors(monkeypatch):
    conv = SubMConv3d(4, 6)
    assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {"weight": (6, 3, 3, 3, 4), "bias": (6,)}
    with pytest.raises(ValueError, match="kernel_size"):
        SubMConv3d(4, 6, kernel_size=5)
    with pytest.raises(ValueError, match="expects 4 channels"):
        conv(SparseTensor(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.int32)))
    monkeypatch.setenv("PIXAL3D_SPARSE_CONV", "cuda-magic")
    with pytest.raises(ValueError, match="PIXAL3D_SPARSE_CONV"):
        conv(SparseTensor(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int32)))
