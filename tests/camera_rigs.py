"""Camera poses shared by the multi-view tests (no Blender needed)."""
import numpy as np


def look_at_c2w(position, target=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Blender camera-to-world at `position` looking at `target`, world +Z up."""
    position, target = np.asarray(position, float), np.asarray(target, float)
    back = (position - target) / np.linalg.norm(position - target)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, np.cross(back, right), back], axis=1)
    c2w[:3, 3] = position
    return c2w
