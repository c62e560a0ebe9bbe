"""A fast UV unwrap: faces grouped by the axis direction they face, projected at one scale, packed.

1. Labels: each face takes the direction of +-X, +-Y, +-Z nearest its normal. A face that two of its three
   neighbours label otherwise joins them while its normal stays within `JOIN_MAX_DEGREES` of their direction
   (ragged borders between directions would otherwise leave many one-face charts, each with its own gutter).
   A degenerate face has no normal to trust and goes with its neighbours.
2. Charts: the edge-connected components of faces with one label (minimum-label propagation with pointer
   jumping), joined only across edges with one face on either side (`face_pairs`).
3. Projection onto the plane of the chart's direction, seen from outside (u right, v down the image: no chart
   is mirrored). All charts share one world-to-texel scale, so texel density is even, lowered only by a
   face's slant to its direction (at most `JOIN_MAX_DEGREES`). Every face faces its direction, so none flips,
   but a chart can still lie over itself, found exactly (no sampling): round a vertex (its corner angles sum
   past a full turn, or the chart touches itself there in fans that interleave; those faces become charts of
   their own), or far from any (a ramp winding more than a turn round its axis). With no fold at a vertex the
   projection is a local one-to-one map, and a connected chart then overlaps itself only where its border
   crosses itself: such a chart is halved, by the rank of its faces along its longer side, into connected
   pieces, until no border crosses itself.
4. Frames: each chart turned in its plane to its smallest bounding box and laid flat. A chart filling little
   of its box (a ring, a C) is halved too, as packing cannot use the room inside it. Then `packing.pack`
   drops the charts onto a skyline, a gutter between any two, texel-aligned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .packing import pack, turn

DIRECTIONS = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                          dtype=torch.float64)
# (right, up) position axes of each direction's view from outside, right x up = direction; u = right and
# v = -up, so that v runs down the view as the image's rows do.
PLANE_AXES = torch.tensor([[1, 2], [2, 1], [2, 0], [0, 2], [0, 1], [1, 0]])
JOIN_MAX_DEGREES = 60.0
SMOOTHING_ROUNDS = 8
# A face is degenerate (no normal to trust) when twice its area is below this fraction of its longest edge
# squared: a sliver of zero area but for float32 rounding of its corners.
DEGENERATE_RATIO = 1e-6
ROTATION_STEPS = 16                 # angles tried in [0, 90) degrees for a chart's smallest bounding box
# A chart is sparse when its faces fill less than this fraction of its bounding box, and it matters when that
# box is more than this share of all the charts' boxes.
SPARSE_FILL = 0.35
SPARSE_SHARE = 0.01
OVERWOUND_TOLERANCE = 1e-6          # radians past a full turn of a chart's corner angles round a vertex


def face_pairs(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of half-edges (index 3 * face + corner: the edge from that corner to the next) that join two faces
    across a mesh edge, as two aligned index tensors. Only half-edges running opposite ways pair up, one with
    one, so that the two faces lie on either side of the edge: on a non-manifold edge the half-edges left over,
    and the faces of an edge wound the same way, are not joined there."""
    start, end = faces.reshape(-1), faces.roll(-1, dims=1).reshape(-1)
    forward = start < end
    key = torch.minimum(start, end) * (int(faces.max()) + 1) + torch.maximum(start, end)
    key = torch.where(start != end, key * 2 + forward, -1)                     # degenerate edges pair with none
    key, order = torch.sort(key, stable=True)
    rank = torch.arange(key.numel(), device=key.device) - torch.searchsorted(key, key)   # among those one way
    partner = (torch.searchsorted(key, key + 1) + rank).clamp_max(key.numel() - 1)      # same rank, other way
    paired = (key >= 0) & (key % 2 == 0) & (key[partner] == key + 1)
    return order[paired], order[partner[paired]]


def components(num_faces: int, half_a: torch.Tensor, half_b: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Component index [F] (0..C-1) of each face, faces being joined across paired half-edges where their
    labels agree."""
    a, b = half_a // 3, half_b // 3
    keep = label[a] == label[b]
    a, b = a[keep], b[keep]
    root = torch.arange(num_faces, device=label.device)
    while a.numel():
        ra, rb = root[a], root[b]
        apart = ra != rb                     # endpoints already in one tree stay so: drop them
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        root.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), reduce="amin")
        while True:                          # pointer jumping until every face points at its root
            jumped = root[root]
            if torch.equal(jumped, root):
                break
            root = jumped
    return torch.unique(root, return_inverse=True)[1]


def _labels(normals: torch.Tensor, degenerate: torch.Tensor, half_a: torch.Tensor,
            half_b: torch.Tensor) -> torch.Tensor:
    """Direction index [F] of each face (module doc, step 1)."""
    across = torch.full((normals.shape[0] * 3,), -1, dtype=torch.long, device=normals.device)
    across[half_a], across[half_b] = half_b // 3, half_a // 3
    across = across.view(-1, 3)                                                 # the face over each edge
    cosine = torch.nn.functional.normalize(normals, dim=-1) @ DIRECTIONS.to(normals.device).T
    label = cosine.argmax(-1)
    min_cos = math.cos(math.radians(JOIN_MAX_DEGREES))
    for _ in range(SMOOTHING_ROUNDS):
        around = torch.where(across >= 0, label[across.clamp_min(0)], -1)
        first_pair = (around[:, 0] == around[:, 1]) | (around[:, 0] == around[:, 2])
        majority = torch.where(first_pair, around[:, 0], torch.where(around[:, 1] == around[:, 2], around[:, 1], -1))
        fits = degenerate | (cosine.gather(1, majority.clamp_min(0)[:, None])[:, 0] > min_cos)
        switch = (majority >= 0) & (majority != label) & fits
        if not switch.any():
            break
        label = torch.where(switch, majority, label)
    return label


def _per_chart(values: torch.Tensor, chart: torch.Tensor, num_charts: int, reduce: str) -> torch.Tensor:
    """Per-chart min ("amin") or max ("amax") of values [N, 2] of charts [N]."""
    fill = math.inf if reduce == "amin" else -math.inf
    out = torch.full((num_charts, 2), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, chart[:, None].expand(-1, 2), values, reduce=reduce)


def _rotate(points: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([points[..., 0] * cos - points[..., 1] * sin, points[..., 0] * sin + points[..., 1] * cos], -1)


@dataclass
class _Frames:
    """Each chart turned to its smallest bounding box, laid flat (wider than tall) and moved to (0, 0)."""
    corners: torch.Tensor           # [F, 3, 2] face corners in their chart's frame
    segments: torch.Tensor          # [S, 2, 2] border segments in their chart's frame
    segment_chart: torch.Tensor     # [S]
    extent: torch.Tensor            # [C, 2] each frame's bounding box from (0, 0)


def _chart_frames(projected: torch.Tensor, chart: torch.Tensor, border: torch.Tensor) -> _Frames:
    """The charts' frames (module doc, step 4), the smallest box among `ROTATION_STEPS` turns."""
    num_charts = int(chart.max()) + 1
    face = border // 3
    segments = torch.stack([projected[face, border % 3], projected[face, (border + 1) % 3]], 1)
    segment_chart = chart[face]
    ends, end_chart = segments.reshape(-1, 2), segment_chart.repeat_interleave(2)
    best_area = torch.full((num_charts,), math.inf, dtype=projected.dtype, device=projected.device)
    angle, box = torch.zeros_like(best_area), torch.zeros(num_charts, 2, dtype=projected.dtype, device=projected.device)
    for step in range(ROTATION_STEPS):                  # a chart's extremes lie on its border
        trial = torch.tensor(step * math.pi / 2 / ROTATION_STEPS, dtype=projected.dtype, device=projected.device)
        turned = _rotate(ends, trial)
        trial_box = _per_chart(turned, end_chart, num_charts, "amax") - _per_chart(turned, end_chart, num_charts,
                                                                                  "amin")
        better = trial_box.prod(-1) < best_area
        angle, box = torch.where(better, trial, angle), torch.where(better[:, None], trial_box, box)
        best_area = torch.where(better, trial_box.prod(-1), best_area)
    angle = torch.where(box[:, 1] > box[:, 0], angle + math.pi / 2, angle)       # lay flat
    corners = _rotate(projected, angle[chart, None])
    segments = _rotate(segments, angle[segment_chart, None])
    flat_corners, corner_chart = corners.reshape(-1, 2), chart.repeat_interleave(3)
    low = _per_chart(flat_corners, corner_chart, num_charts, "amin")
    extent = _per_chart(flat_corners, corner_chart, num_charts, "amax") - low
    return _Frames(corners - low[chart, None], segments - low[segment_chart, None], segment_chart, extent)


def _border(chart: torch.Tensor, half_a: torch.Tensor, half_b: torch.Tensor) -> torch.Tensor:
    """Half-edges on a chart's border: those without a partner in the same chart."""
    inner = chart[half_a // 3] == chart[half_b // 3]
    paired = torch.zeros(chart.numel() * 3, dtype=torch.bool, device=chart.device)
    paired[half_a[inner]] = paired[half_b[inner]] = True
    return torch.nonzero(~paired)[:, 0]


def _packed_uvs(frames: _Frames, chart: torch.Tensor, size: int, gutter: int) -> torch.Tensor:
    """float32 [F, 3, 2] uvs of the face corners, the charts packed (module doc, step 4)."""
    extent, chart_np = frames.extent.cpu().numpy(), chart.cpu().numpy()
    placement = pack(frames.segments.cpu().numpy(), frames.segment_chart.cpu().numpy(), extent, size, gutter)
    texels = (turn(frames.corners.cpu().numpy(), extent[chart_np, None, :], placement.turns[chart_np, None])
              * placement.scale + placement.origin[chart_np, None, :])
    return torch.as_tensor((texels / size).astype(np.float32), device=chart.device)


def _fan_folds(projected: torch.Tensor, chart: torch.Tensor, faces: torch.Tensor,
               border: torch.Tensor) -> torch.Tensor:
    """[F] bool: faces at a vertex where the faces of their chart overlap in the projection. One fan of faces
    overlaps itself when its corner angles sum past a full turn. Several fans (the chart touching itself at
    the vertex) overlap one another unless, round the vertex, the border edges leaving it and those arriving
    alternate: each fan lies between the edge that leaves it and the one that arrives."""
    to_next = projected.roll(-1, dims=1) - projected
    to_previous = projected.roll(1, dims=1) - projected
    # a face facing its direction turns clockwise in (u, v), v running down: its corner angles count positive,
    # those of a flipped sliver (a zero-area face but for rounding) negative
    clockwise = to_next[..., 1] * to_previous[..., 0] - to_next[..., 0] * to_previous[..., 1]
    angle = torch.atan2(clockwise, (to_next * to_previous).sum(-1))             # [F, 3]
    angle = torch.where((clockwise != 0).all(1, keepdim=True), angle, 0.0)      # zero-area faces cover nothing
    key = (chart[:, None] * (int(faces.max()) + 1) + faces).reshape(-1)         # (chart, vertex) of each corner
    _, corner_vertex = torch.unique(key, return_inverse=True)
    turned = torch.zeros(int(corner_vertex.max()) + 1, dtype=angle.dtype, device=angle.device)
    turned.index_add_(0, corner_vertex, angle.reshape(-1))
    fold = turned > 2 * math.pi + OVERWOUND_TOLERANCE
    # border edges round each vertex: the edge leaving it (+1) and the edge arriving at it (-1)
    face, corner = border // 3, border % 3
    step = (projected[face, (corner + 1) % 3] - projected[face, corner]).reshape(-1, 2)
    vertex = torch.cat([corner_vertex[border], corner_vertex[face * 3 + (corner + 1) % 3]])
    direction = torch.atan2(torch.cat([step[:, 1], -step[:, 1]]), torch.cat([step[:, 0], -step[:, 0]]))
    leaves = torch.cat([torch.ones_like(border), -torch.ones_like(border)])
    order = torch.argsort(direction, stable=True)
    order = order[torch.argsort(vertex[order], stable=True)]                    # by vertex, then direction
    vertex, leaves = vertex[order], leaves[order]
    first = torch.searchsorted(vertex, vertex)                                  # each vertex's first edge
    following = torch.arange(vertex.numel(), device=vertex.device) + 1
    following = torch.where((following < vertex.numel()) & (vertex[following.clamp_max(vertex.numel() - 1)] == vertex),
                            following, first)                                   # round the vertex, cyclically
    fold[vertex[leaves == leaves[following]]] = True
    return fold[corner_vertex].view(-1, 3).any(1)


def _orientation(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def _crossed_charts(projected: torch.Tensor, chart: torch.Tensor, border: torch.Tensor,
                    faces: torch.Tensor) -> torch.Tensor:
    """[C] bool: charts whose border segments touch, cross or overlap one another away from their shared
    vertices. Candidate pairs share a cell of a grid about two segments long (a segment enters every cell of its
    box)."""
    found = torch.zeros(int(chart.max()) + 1, dtype=torch.bool, device=chart.device)
    border = border[(torch.bincount(chart) > 1)[chart[border // 3]]]            # a lone face cannot cross itself
    face, corner = border // 3, border % 3
    p, q = projected[face, corner], projected[face, (corner + 1) % 3]           # [S, 2]
    side = 2 * float((q - p).norm(dim=-1).mean()) if border.numel() else 0.0
    if side == 0:
        return found
    ends = torch.stack([faces[face, corner], faces[face, (corner + 1) % 3]], 1)
    segment_chart = chart[face]
    low, high = torch.minimum(p, q), torch.maximum(p, q)
    cell_low, cell_high = torch.floor(low / side).long(), torch.floor(high / side).long()
    cell_high, cell_low = cell_high - cell_low.amin(0), cell_low - cell_low.amin(0)
    span = cell_high - cell_low + 1
    count = span.prod(-1)
    s = torch.repeat_interleave(torch.arange(p.shape[0], device=p.device), count)
    local = torch.arange(s.numel(), device=p.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    dims = cell_high.amax(0) + 1
    x, y = cell_low[s, 0] + local % span[s, 0], cell_low[s, 1] + local // span[s, 0]
    key, order = torch.sort((segment_chart[s] * dims[0] + x) * dims[1] + y)
    s = s[order]
    # every pair within a run of equal keys
    partners = torch.searchsorted(key, key, right=True) - torch.arange(key.numel(), device=key.device) - 1
    i = torch.repeat_interleave(torch.arange(key.numel(), device=key.device), partners)
    j = i + 1 + torch.arange(i.numel(), device=key.device) - torch.repeat_interleave(torch.cumsum(partners, 0)
                                                                                    - partners, partners)
    a, b = s[i], s[j]
    apart = ~(ends[a][:, :, None] == ends[b][:, None, :]).any(2).any(1)
    a, b = a[apart], b[apart]
    straddle = ((_orientation(p[b], q[b], p[a]) * _orientation(p[b], q[b], q[a]) <= 0)
                & (_orientation(p[a], q[a], p[b]) * _orientation(p[a], q[a], q[b]) <= 0))
    boxes_meet = ((low[a] <= high[b]) & (low[b] <= high[a])).all(1)
    found[segment_chart[a[straddle & boxes_meet]]] = True
    return found


def _halve(chart: torch.Tensor, halved: torch.Tensor, projected: torch.Tensor, half_a: torch.Tensor,
           half_b: torch.Tensor) -> torch.Tensor:
    """Charts after halving each chart with `halved` [C] by the rank of its faces along its longer side, into
    connected pieces."""
    num_charts = int(chart.max()) + 1
    face = torch.nonzero(halved[chart])[:, 0]
    centre = projected[face].mean(1)                                            # [H, 2]
    span = _per_chart(centre, chart[face], num_charts, "amax") - _per_chart(centre, chart[face], num_charts, "amin")
    coordinate = centre.gather(1, span.argmax(-1)[chart[face], None])[:, 0]
    order = torch.argsort(coordinate, stable=True)
    order = order[torch.argsort(chart[face][order], stable=True)]               # by chart, then coordinate
    sizes = torch.bincount(chart[face], minlength=num_charts)
    first = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - first[chart[face][order]]
    upper = torch.zeros_like(halved[chart])
    upper[face] = rank >= sizes[chart[face]] // 2
    return components(chart.numel(), half_a, half_b, chart * 2 + upper)


def _unfold(chart: torch.Tensor, projected: torch.Tensor, faces: torch.Tensor, half_a: torch.Tensor,
            half_b: torch.Tensor) -> torch.Tensor:
    """Charts split until none overlaps itself in the projection (module doc, step 3): the faces round a
    folded vertex become charts of their own (a face alone cannot fold), a chart whose border crosses itself
    is halved."""
    while True:
        border = _border(chart, half_a, half_b)
        fan = _fan_folds(projected, chart, faces, border)
        crossed = _crossed_charts(projected, chart, border, faces)
        if not (fan.any() or crossed.any()):
            return chart
        crossed = crossed[chart] & ~fan                                          # per face
        if fan.any():
            alone = torch.arange(chart.numel(), device=chart.device) + int(chart.max()) + 1
            chart = components(chart.numel(), half_a, half_b, torch.where(fan, alone, chart))
        if crossed.any():
            halved = torch.zeros(int(chart.max()) + 1, dtype=torch.bool, device=chart.device)
            halved[chart[crossed]] = True
            chart = _halve(chart, halved, projected, half_a, half_b)


def _compact(chart: torch.Tensor, projected: torch.Tensor, half_a: torch.Tensor,
             half_b: torch.Tensor) -> tuple[torch.Tensor, _Frames]:
    """Charts halved until none that matters is sparse (a ring or a C fills little of its box, and packing
    cannot use the room inside it), with their frames."""
    twice_area = ((projected[:, 1, 0] - projected[:, 0, 0]) * (projected[:, 2, 1] - projected[:, 0, 1])
                  - (projected[:, 1, 1] - projected[:, 0, 1]) * (projected[:, 2, 0] - projected[:, 0, 0])).abs()
    while True:
        frames = _chart_frames(projected, chart, _border(chart, half_a, half_b))
        box = frames.extent.prod(-1)
        area = torch.zeros_like(box).index_add_(0, chart, twice_area / 2)
        sparse = (area < SPARSE_FILL * box) & (box > SPARSE_SHARE * box.sum())
        if not sparse.any():
            return chart, frames
        chart = _halve(chart, sparse, projected, half_a, half_b)


def _weld(faces: torch.Tensor, chart: torch.Tensor, uvs: torch.Tensor, num_vertices: int):
    """One new vertex per (chart, original vertex): chart borders are seams."""
    key = (chart[:, None] * num_vertices + faces).reshape(-1)
    unique, inverse = torch.unique(key, return_inverse=True)
    vertex_uvs = torch.empty(unique.numel(), 2, dtype=torch.float32, device=key.device)
    vertex_uvs[inverse] = uvs.reshape(-1, 2)
    return ((unique % num_vertices).cpu().numpy(), inverse.view(-1, 3).cpu().numpy(), vertex_uvs.cpu().numpy())


def chart_unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int, gutter: int,
                 device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vmapping [V'], faces [F, 3] into the new vertices, uvs [V', 2] in [0, 1], v down the rows) of the
    chart layout of the module doc; faces keep their order. The tensor work runs on `device`."""
    v = torch.as_tensor(np.asarray(vertices), device=device).double()
    f = torch.as_tensor(np.asarray(faces), device=device).long()
    tri = v[f]
    normals = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    longest = (tri - tri.roll(1, dims=1)).square().sum(-1).amax(-1)
    degenerate = normals.norm(dim=-1) <= DEGENERATE_RATIO * longest
    half_a, half_b = face_pairs(f)
    label = _labels(normals, degenerate, half_a, half_b)
    plane = PLANE_AXES.to(device)[label]
    projected = torch.stack([tri.gather(2, plane[:, None, i, None].expand(-1, 3, 1))[..., 0] for i in (0, 1)], -1)
    projected[..., 1] *= -1
    chart = _unfold(components(f.shape[0], half_a, half_b, label), projected, f, half_a, half_b)
    chart, frames = _compact(chart, projected, half_a, half_b)
    return _weld(f, chart, _packed_uvs(frames, chart, texture_size, gutter), v.shape[0])
