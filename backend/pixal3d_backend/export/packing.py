"""Packing charts into a square atlas: dropped like Tetris pieces onto a skyline, at the largest scale that fits.

A chart comes as its outline in its own frame (world units, bounding box from (0, 0) to its extent): the
segments of its border. At a trial scale (texels per world unit) each chart becomes a column profile on a grid
of `cell` = half-gutter texels: per cell column, the lowest and highest cell that the chart touches (the
extremes of a region over a column lie on its border). Profiles are dilated by one cell all round and never
overlap, so the texels that two charts touch keep at least 2 cells = the gutter apart, and one cell from the
atlas border (a gutter across it too: glTF samplers repeat). Charts sit at whole cells: texel-aligned. Charts
too many to keep gutters at any scale (each takes 3 x 3 cells at least: some 29 000 fit a 512² atlas) are
packed touching instead, on a grid of texels, rather than not at all; they still never overlap.

Large charts (among the `LARGE_CHARTS` largest, those more than `SMALL_CELLS` across), largest first, are
dropped onto the skyline (the first free cell of each column), each in the quarter turn and column that leave
the least space under it. The other charts are first shelved (next fit, tallest first) into blocks an
eighth of the atlas wide and about as tall, each dropped like one chart, so a mesh of 100 000 small charts
costs a few hundred drops. The largest scale that fits is searched for in a few trials (`_search`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LARGE_CHARTS = 256
SMALL_CELLS = 8                 # a chart at most this many cells across (gutter included) goes into a block
BLOCK_SHARE = 8                 # blocks of small charts are an eighth of the atlas wide
QUARTER_TURNS = (0, 1, 2, 3)    # the orientations tried for each large chart
MAX_TRIALS = 5
GOOD_FILL = 0.95                # stop once a trial fits and reaches this fraction of the atlas height
AIM_FILL = 0.985                # a corrected scale aims at this fraction of the atlas height
FIRST_FILL = 0.85               # first trial: the charts' dilated bounding boxes cover this share of the atlas
_FAR = 1 << 40


@dataclass
class Placement:
    scale: float                # texels per world unit
    turns: np.ndarray           # [C] quarter turns of each chart's frame (0..3)
    origin: np.ndarray          # [C, 2] int64 texel position of each turned frame's (0, 0)


def turn(points: np.ndarray, extent: np.ndarray, turns) -> np.ndarray:
    """Points [..., 2] of frames with bounding box (0, 0)-extent, turned by quarter turns (a proper rotation: a
    chart is never mirrored) so that each turned box starts at (0, 0) again."""
    x, y, w, h = points[..., 0], points[..., 1], extent[..., 0], extent[..., 1]
    turns = np.broadcast_to(turns, x.shape)
    return np.stack([np.choose(turns, [x, y, w - x, h - y]), np.choose(turns, [y, w - x, h - y, x])], -1)


@dataclass
class _Profiles:
    """Column profiles of every chart in one orientation, dilated by `margin` cells, in cells of the chart's
    frame: chart c owns entries start[c]:start[c + 1] of `low` (first row) and `high` (one past the last row),
    the first being `margin` columns left of the frame's column 0."""
    start: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def of(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        return self.low[self.start[c]:self.start[c + 1]], self.high[self.start[c]:self.start[c + 1]]

    def boxes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(width, lowest row, height) of each chart's dilated profile."""
        low = np.minimum.reduceat(self.low, self.start[:-1])
        return np.diff(self.start), low, np.maximum.reduceat(self.high, self.start[:-1]) - low


def _profiles(segments: np.ndarray, segment_chart: np.ndarray, extent: np.ndarray, cell: int,
              margin: int) -> _Profiles:
    """Profiles of charts given by `segments` [S, 2, 2] and `extent` [C, 2] in texels."""
    columns = np.floor(extent[:, 0] / cell).astype(np.int64) + 1
    start = np.concatenate([[0], np.cumsum(columns + 2 * margin)])   # `margin` padding columns each side
    x0, x1 = segments[:, :, 0].min(1), segments[:, :, 0].max(1)
    first = np.floor(x0 / cell).astype(np.int64)
    count = np.floor(x1 / cell).astype(np.int64) - first + 1
    s = np.repeat(np.arange(segments.shape[0]), count)
    column = first[s] + np.arange(s.size) - np.repeat(np.cumsum(count) - count, count)
    # the segment's rows over the column: its ends clamped to the column's sides
    (ax, ay), (bx, by) = segments[s, 0].T, segments[s, 1].T
    dx = bx - ax
    ends = []
    for side, own_end in ((column * cell, ay), ((column + 1) * cell, by)):
        t = np.clip((np.clip(side, x0[s], x1[s]) - ax) / np.where(dx == 0, 1.0, dx), 0.0, 1.0)
        ends.append(np.where(dx == 0, own_end, ay + t * (by - ay)))
    slot = start[segment_chart[s]] + margin + column
    low = np.full(start[-1], _FAR)
    high = np.full(start[-1], -_FAR)
    np.minimum.at(low, slot, np.floor(np.minimum(*ends) / cell).astype(np.int64))
    np.maximum.at(high, slot, np.floor(np.maximum(*ends) / cell).astype(np.int64))
    # a column no segment crosses (a chart of zero-area faces only has no border) takes the whole box
    chart = np.repeat(np.arange(columns.size), columns + 2 * margin)
    padding = np.ones(start[-1], dtype=bool)
    padding[slot] = False
    empty = (low == _FAR) & ~padding
    low[empty] = 0
    high[empty] = np.floor(extent[chart[empty], 1] / cell)
    if margin:
        low = np.minimum(np.minimum(low, np.roll(low, 1)), np.roll(low, -1)) - 1
        high = np.maximum(np.maximum(high, np.roll(high, 1)), np.roll(high, -1)) + 1
    return _Profiles(start, low, high + 1)


def _drop(skyline: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[int, int, int] | None:
    """(cost, column, row offset) of the best drop of a profile onto the skyline; None when it is too wide.
    Dropped at column x, it rests at the lowest offset y with y + low >= skyline under every column; the cost
    is the free space it leaves under itself plus its offset times its width (lower is better)."""
    width = low.size
    if width > skyline.size:
        return None
    offset = (sliding_window_view(skyline, width) - low).max(1)
    under = np.concatenate([[0], np.cumsum(skyline)])
    cost = 2 * width * offset + low.sum() - (under[width:] - under[:-width])
    x = int(np.argmin(cost))
    return int(cost[x]), x, int(offset[x])


def _shelve(widths: np.ndarray, heights: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-fit shelves of rectangles, in the given order, in a strip `width` wide: (x, y, shelf index)."""
    right = np.cumsum(widths)
    x, y, shelf = np.empty_like(widths), np.empty_like(heights), np.empty_like(widths)
    begin, top, index = 0, 0, 0
    while begin < widths.size:
        left = right[begin] - widths[begin]
        end = int(np.searchsorted(right, left + width, side="right"))
        x[begin:end] = right[begin:end] - widths[begin:end] - left
        y[begin:end] = top
        shelf[begin:end] = index
        top += heights[begin]
        begin, index = end, index + 1
    return x, y, shelf


def _blocks(widths: np.ndarray, heights: np.ndarray, side: int):
    """Rectangles -> blocks of shelves about `side` square: (block of each rectangle, its x and y in the block,
    block width, block heights)."""
    side = max(side, int(widths.max()))
    order = np.argsort(-heights, kind="stable")
    x, y, shelf = _shelve(widths[order], heights[order], side)
    shelf_bottom = y[np.searchsorted(shelf, np.arange(shelf[-1] + 1))]        # shelves come in order
    shelf_top = np.append(shelf_bottom[1:], y[-1] + heights[order][shelf == shelf[-1]].max())
    # consecutive shelves share a block while it stays within `side` cells (a taller shelf gets its own)
    block_of_shelf, bottoms = np.empty_like(shelf_bottom), []
    for i, (bottom, top) in enumerate(zip(shelf_bottom.tolist(), shelf_top.tolist())):
        if not bottoms or top - bottoms[-1] > side:
            bottoms.append(bottom)
        block_of_shelf[i] = len(bottoms) - 1
    bottoms = np.asarray(bottoms)
    block, bx, by = np.empty_like(x), np.empty_like(x), np.empty_like(y)
    block[order] = block_of_shelf[shelf]
    bx[order], by[order] = x, y - bottoms[block_of_shelf[shelf]]
    block_height = np.zeros(bottoms.size, dtype=np.int64)
    np.maximum.at(block_height, block, by + heights)
    return block, bx, by, side, block_height


def _turned_profiles(segments, segment_chart, extent, charts, t, scale, cell, margin) -> _Profiles:
    """Profiles of `charts` (their order) turned by `t` quarter turns, at `scale`."""
    position = np.full(extent.shape[0], -1)
    position[charts] = np.arange(charts.size)
    mine = position[segment_chart] >= 0
    extent = extent[charts]
    turned = turn(segments[mine], extent[position[segment_chart[mine]], None, :], t)
    return _profiles(turned * scale, position[segment_chart[mine]], (extent[:, ::-1] if t % 2 else extent) * scale,
                     cell, margin)


def _trial(segments, segment_chart, extent, largest, scale, cell, margin, columns):
    """One packing at `scale`: (rows reached, turns [C], frame origins [C, 2] in cells), or None when a chart
    is wider than the atlas in every orientation."""
    upright = _turned_profiles(segments, segment_chart, extent, np.arange(extent.shape[0]), 0, scale, cell, margin)
    width, low, height = upright.boxes()
    large = largest[np.maximum(width, height)[largest] > SMALL_CELLS]
    small = np.setdiff1d(np.arange(extent.shape[0]), large)
    # turned profiles of the large charts, their index in `large`
    profiles = {t: _turned_profiles(segments, segment_chart, extent, large, t, scale, cell, margin)
                for t in QUARTER_TURNS}
    turns = np.zeros(extent.shape[0], dtype=np.int64)
    origin = np.zeros((extent.shape[0], 2), dtype=np.int64)
    skyline = np.zeros(columns, dtype=np.int64)

    def drop(options) -> tuple[int, int, int] | None:
        """The best (turn, column, offset) of `options` [(turn, low, high)], the skyline raised under it."""
        best = None
        for t, lo, hi in options:
            found = _drop(skyline, lo, hi)
            if found is not None and (best is None or found[0] < best[0]):
                best = (found[0], t, found[1], found[2], hi)
        if best is None:
            return None
        _, t, x, y, hi = best
        skyline[x:x + hi.size] = np.maximum(skyline[x:x + hi.size], y + hi)
        return t, x, y

    items = [(int(width[c] * height[c]), "chart", i) for i, c in enumerate(large.tolist())]
    if small.size:
        block, bx, by, side, block_height = _blocks(width[small], height[small], columns // BLOCK_SHARE)
        items += [(int(side * h), "block", b) for b, h in enumerate(block_height.tolist())]
        block_origin = np.zeros((block_height.size, 2), dtype=np.int64)
    for _, kind, index in sorted(items, key=lambda item: -item[0]):
        if kind == "chart":
            placed = drop([(t, *profiles[t].of(index)) for t in QUARTER_TURNS])
            if placed is None:
                return None
            turns[large[index]], origin[large[index]] = placed[0], (placed[1] + margin, placed[2])
        else:
            placed = drop([(0, np.zeros(side, np.int64), np.full(side, block_height[index]))])
            if placed is None:
                return None
            block_origin[index] = placed[1:]
    if small.size:
        origin[small] = block_origin[block] + np.stack([bx + margin, by - low[small]], -1)
    return int(skyline.max()), turns, origin


def _search(segments, segment_chart, extent, size, cell, margin) -> Placement | None:
    """The largest scale found to fit (module doc), or None when the charts do not fit at any.

    Trial scales come from the charts' dilated bounding boxes, whose total area grows with the scale: the
    first makes them cover `FIRST_FILL` of the atlas, each next one the area the last trial's packing
    efficiency says fills `AIM_FILL` of the height, kept between the largest scale that fitted and the smallest
    that did not."""
    columns = rows = size // cell
    largest = np.argsort(-np.prod(extent, axis=1), kind="stable")[:LARGE_CHARTS]

    def boxes(scale: float) -> float:
        cells = np.floor(extent * scale / cell) + 1 + 2 * margin
        return float((cells[:, 0] * cells[:, 1]).sum())

    if boxes(0.0) > columns * rows:         # even at one cell each
        return None
    longest = float(extent.max(initial=0.0))
    widest = (columns - 1 - 2 * margin) * cell / max(longest, 1e-30)

    def scale_for(cells: float) -> float:
        """The largest scale whose boxes cover at most `cells` (bisection), no chart wider than the atlas."""
        if boxes(widest) <= cells:
            return widest
        low, high = 0.0, widest
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if boxes(mid) <= cells else (low, mid)
        return low

    best, fits, fails = None, 0.0, math.inf
    scale = scale_for(FIRST_FILL * columns * rows)
    for _ in range(MAX_TRIALS):
        packed = _trial(segments, segment_chart, extent, largest, scale, cell, margin, columns)
        if packed and packed[0] <= rows:
            best, fits = Placement(scale, packed[1], packed[2] * cell), scale
            if packed[0] >= GOOD_FILL * rows:
                break
        else:
            fails = scale
        wanted = scale_for(boxes(scale) * AIM_FILL * rows / packed[0]) if packed else scale / 2
        wanted = wanted if fits < wanted < fails else (fits + min(fails, widest)) / 2
        if wanted in (fits, fails):         # nothing left between them
            break
        scale = wanted
    scale = min(fails, widest)
    while best is None and scale * longest >= cell:     # nothing fitted: halve until every chart is one cell
        scale /= 2
        packed = _trial(segments, segment_chart, extent, largest, scale, cell, margin, columns)
        if packed and packed[0] <= rows:
            best = Placement(scale, packed[1], packed[2] * cell)
    return best


def pack(segments: np.ndarray, segment_chart: np.ndarray, extent: np.ndarray, size: int,
         gutter: int) -> Placement:
    """Places charts given by their border `segments` [S, 2, 2] (chart `segment_chart` [S]) in frames with
    bounding boxes (0, 0)-`extent` [C, 2], world units, in a size x size atlas with `gutter` (>= 1) texels
    between charts, or touching when they are too many for that (see the module doc)."""
    placed = _search(segments, segment_chart, extent, size, max(1, math.ceil(gutter / 2)), margin=1)
    if placed is None:
        placed = _search(segments, segment_chart, extent, size, cell=1, margin=0)
    if placed is None:
        raise ValueError(f"{extent.shape[0]} charts do not fit a {size}² atlas even without gutters")
    return placed
