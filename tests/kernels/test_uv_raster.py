"""UV rasterisation and sparse-voxel sampling: the Triton kernels against their references on fresh random inputs
(on CPU through Triton's interpreter, on CUDA for real), and the references against known answers.

Tolerances (stated in `pixal3d_kernels.uv_raster`): the covering triangle of every texel is identical; barycentrics
within 1e-6; sampled values within 1e-5 absolute on values in [0, 1], `found` identical."""
import pytest
import torch

from pixal3d_kernels import uv_raster

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_layout(seed: int, cells: int = 5, extra: int = 12):
    """A jittered grid of charts (triangles sharing edges, gaps between charts) plus stray triangles: overlapping,
    degenerate, sliver and partly outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(0.05, 0.95, cells + 1)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    grid = grid + (torch.rand(grid.shape, generator=g) - 0.5) * 0.6 / cells
    idx = torch.arange((cells + 1) ** 2).view(cells + 1, cells + 1)
    a, b, c, d = idx[:-1, :-1].reshape(-1), idx[1:, :-1].reshape(-1), idx[1:, 1:].reshape(-1), idx[:-1, 1:].reshape(-1)
    faces = torch.cat([torch.stack([a, b, c], -1), torch.stack([a, c, d], -1)])
    centres = torch.rand(extra, 1, 2, generator=g) * 1.2 - 0.1
    stray = (centres + (torch.rand(extra, 3, 2, generator=g) - 0.5) * 0.4).reshape(-1, 2)
    stray[3:6] = stray[3]                                          # a degenerate (point) triangle
    stray[6:9, 0] = stray[6, 0]                                    # a degenerate (line) triangle
    uvs = torch.cat([grid, stray])
    faces = torch.cat([faces, torch.arange(extra * 3).view(-1, 3) + grid.shape[0]])
    order = torch.randperm(faces.shape[0], generator=g)
    return uvs.to(DEVICE), faces[order].to(DEVICE)


@pytest.mark.parametrize("seed,size", [(0, 40), (1, 29)])
def test_rasterize_kernel_matches_reference(triton_kernels, seed, size):
    uvs, faces = random_layout(seed)
    ref_owner, ref_bary = uv_raster.rasterize_uv_reference(uvs, faces, size)
    owner, bary = uv_raster.rasterize_uv(uvs, faces, size)
    assert (ref_owner >= 0).float().mean() > 0.5
    assert torch.equal(owner, ref_owner)
    torch.testing.assert_close(bary, ref_bary, rtol=0, atol=1e-6)


def test_reference_covers_the_unit_square_once_with_exact_barycentrics():
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    size = 16
    owner, bary = uv_raster.rasterize_uv_reference(uvs, faces, size)
    assert (owner >= 0).all()
    centre = (torch.arange(size) + 0.5) / size
    v, u = torch.meshgrid(centre, centre, indexing="ij")           # rows are v, columns u
    assert torch.equal(owner, (v >= u).long())                     # the shared diagonal goes to the higher index
    texel_uv = (bary[..., None] * uvs[faces[owner]]).sum(-2)
    torch.testing.assert_close(texel_uv, torch.stack([u, v], -1), rtol=0, atol=1e-6)


def random_field(seed: int, resolution: int, count: int, channels: int = 6):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(resolution ** 3, generator=g)[:count]
    coords = torch.stack([flat // resolution ** 2, flat // resolution % resolution, flat % resolution], -1)
    keys, order = torch.sort(uv_raster.voxel_keys(coords, resolution))
    values = torch.rand(count, channels, generator=g)[order]
    return keys.to(DEVICE), values.to(DEVICE)


@pytest.mark.parametrize("seed,resolution,count,channels", [(0, 12, 700, 6), (1, 7, 200, 3)])
def test_sample_kernel_matches_reference(triton_kernels, seed, resolution, count, channels):
    keys, values = random_field(seed, resolution, count, channels)
    g = torch.Generator().manual_seed(100 + seed)
    points = (torch.rand(500, 3, generator=g) * 1.2 - 0.6).to(DEVICE)   # some beyond the cube
    ref_values, ref_found = uv_raster.sample_voxel_field_reference(keys, values, resolution, points)
    out, found = uv_raster.sample_voxel_field(keys, values, resolution, points)
    assert 0.3 < ref_found.float().mean() < 1
    assert torch.equal(found, ref_found)
    torch.testing.assert_close(out, ref_values, rtol=0, atol=1e-5)


def test_reference_sample_at_a_voxel_centre_is_its_value_and_renormalises_over_missing_neighbours():
    resolution = 8
    coords = torch.tensor([[3, 4, 5], [4, 4, 5]])
    keys, order = torch.sort(uv_raster.voxel_keys(coords, resolution))
    values = torch.tensor([[1.0], [3.0]])[order]
    centre = (coords.float() + 0.5) / resolution - 0.5
    midway = centre.mean(0, keepdim=True)
    far = torch.tensor([[0.45, -0.45, 0.45]])
    out, found = uv_raster.sample_voxel_field_reference(keys, values, resolution, torch.cat([centre, midway, far]))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 3.0, 2.0, 0.0]))
    assert found.tolist() == [True, True, True, False]
