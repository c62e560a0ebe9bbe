"""Result mesh -> the flat arrays Blender's `foreach_set` takes. Pure NumPy, no bpy.

This runs in the worker thread, so the main thread only copies ready arrays into Blender.

The backend sends the mesh in the official GLB frame (Y up, glTF UVs with v down). The add-on stores it in
the frame Blender's glTF importer would produce (`camera.R_GLB_TO_BLENDER`), pre-multiplied by the
`mesh_matrix` of `camera.split_placement`, which carries the crop's shear that an object transform cannot.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shared import camera


@dataclass(frozen=True)
class MeshArrays:
    """Flat, C-contiguous arrays ready for `foreach_set`."""
    co: np.ndarray              # float32 [3 * n_vertices]
    vertex_index: np.ndarray    # int32 [3 * n_faces], the loops' vertices
    loop_start: np.ndarray      # int32 [n_faces]
    uv: np.ndarray | None       # float32 [2 * 3 * n_faces], per loop, Blender convention (v up)
    normals: np.ndarray | None  # float32 [n_vertices, 3], unit length, in the mesh data frame

    @property
    def n_vertices(self) -> int:
        return self.co.size // 3

    @property
    def n_faces(self) -> int:
        return self.loop_start.size


@dataclass(frozen=True)
class Placement:
    """Where the result goes: mesh data transform and the object's matrix relative to its camera."""
    mesh_matrix: np.ndarray        # 4x4, Blender-import frame -> mesh data
    object_in_camera: np.ndarray   # 4x4, object -> camera-local

    @staticmethod
    def from_result(glb_to_camera, depth: float = 0.0) -> "Placement":
        """`depth`: distance along the view axis from the camera to the object's origin, in scene units; the
        object is scaled about the camera centre to get there, which keeps its reprojection. 0 keeps the
        generated distance."""
        if depth < 0.0:
            raise ValueError(f"depth must be positive (or 0 for the generated distance), got {depth}")
        glb_to_camera = np.asarray(glb_to_camera, dtype=np.float64)
        mesh_matrix, object_in_camera = camera.split_placement(glb_to_camera)
        if depth > 0.0:
            mesh_matrix, object_in_camera = camera.split_placement(glb_to_camera, depth / -object_in_camera[2, 3])
        return Placement(mesh_matrix, object_in_camera)

    def object_matrix_world(self, camera_matrix_world) -> np.ndarray:
        """The object's world matrix for a camera object with world matrix `camera_matrix_world`."""
        return np.asarray(camera_matrix_world, dtype=np.float64) @ self.object_in_camera


def prepare_mesh(positions, faces, uvs, normals, mesh_matrix) -> MeshArrays:
    """positions [N,3], faces [F,3] (triangles, indices into positions), uvs [N,2] or None (glTF convention,
    v down), normals [N,3] or None, all in the GLB frame; mesh_matrix from `Placement`."""
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(faces).reshape(-1, 3)
    n = len(positions)
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise ValueError(f"face indices out of range for {n} vertices")
    to_data = np.asarray(mesh_matrix, dtype=np.float64) @ _glb_to_blender_4x4()
    # The wire's mesh is split at every UV seam (one UV per vertex, as in glTF); Blender keeps UVs per loop, so
    # the copies of a vertex (same position and normal) become one again: a connected mesh that edits and
    # shades without seams. Copies with different normals (hard edges) stay apart.
    if normals is not None:
        normals = np.asarray(normals, dtype=np.float64).reshape(-1, 3)
        if len(normals) != n:
            raise ValueError(f"{len(normals)} normals for {n} vertices")
    kept, welded = weld(positions if normals is None else np.hstack([positions, normals]))
    co = positions[kept] @ to_data[:3, :3].T + to_data[:3, 3]
    vertex_index = np.ascontiguousarray(welded[faces.ravel()], dtype=np.int32)

    uv = None
    if uvs is not None:
        uvs = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
        if len(uvs) != n:
            raise ValueError(f"{len(uvs)} UVs for {n} vertices")
        flipped = np.column_stack([uvs[:, 0], 1.0 - uvs[:, 1]])
        uv = np.ascontiguousarray(flipped[faces.ravel()].ravel(), dtype=np.float32)

    unit = None
    if normals is not None:
        # Normals transform with the inverse transpose of the linear part (the shear is not orthogonal).
        transformed = normals[kept] @ np.linalg.inv(to_data[:3, :3])
        length = np.linalg.norm(transformed, axis=1, keepdims=True)
        unit = np.ascontiguousarray(transformed / np.where(length > 0.0, length, 1.0), dtype=np.float32)

    return MeshArrays(co=np.ascontiguousarray(co.ravel(), dtype=np.float32), vertex_index=vertex_index,
                      loop_start=np.arange(0, vertex_index.size, 3, dtype=np.int32), uv=uv, normals=unit)


def weld(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, index): the first row of each distinct row of `keys` [N, K], in their original order, and each
    row's index among them. Copies made for UV seams are bit-identical, so exact equality finds them."""
    if len(keys) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.ravel()]


def _glb_to_blender_4x4() -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = camera.R_GLB_TO_BLENDER
    return m
