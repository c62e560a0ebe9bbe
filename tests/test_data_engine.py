"""Behaviour of the procedural data engine: distances, renders, targets, determinism, splits."""
import math

import numpy as np
import pytest
import torch

from pixal3d_backend import camera
from pixal3d_backend.data import (EVAL_SEED_BASE, CATEGORIES, Lighting, Material, Part, PosedObject,
                                  ProceduralDataset, ProceduralObject, View, make_object, occupancy, random_view,
                                  reconstruct_mesh_from_targets,
                                  render_views, seed_of, shape_targets, surface_samples)
from pixal3d_backend.data import sdf
from pixal3d_backend.conditioning.preprocess import CROP_MARGIN, crop_geometry
from pixal3d_backend.data.targets import QUAD_OFFSETS
from pixal3d_backend.data.views import crop_view
from PIL import Image

torch.set_num_threads(1)

RED = Material((0.8, 0.1, 0.1, 0.0, 0.5, 1.0), (0.8, 0.1, 0.1, 0.0, 0.5, 1.0))
CENTRE = np.array([0.06, -0.04, 0.03])
RADIUS = 0.3
NO_LIGHT = Lighting(np.array([[0.0, 0.0, 1.0]]), np.ones((1, 3)), np.full(3, 0.3), np.full(3, 0.1))


def _sphere_object() -> ProceduralObject:
    return ProceduralObject((Part("sphere", (RADIUS,), translation=tuple(CENTRE)),), (RED,))


def _identity_view(fov=math.radians(40), distance=None) -> View:
    distance = distance or camera.distance_from_fov(fov)[0]
    return View(np.eye(3), 1.0, fov, distance, NO_LIGHT)


# ---------------------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------------------

def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_primitive_distances_at_known_points():
    p = _t([2.0, 0, 0], [0, 0, 0], [1.0, 1.0, 1.0])
    assert torch.allclose(sdf.sphere(p, torch.tensor(1.0)), _t(1.0, -1.0, math.sqrt(3) - 1))
    b = torch.tensor([0.5, 0.5, 0.5])
    assert torch.allclose(sdf.box(p, b), _t(1.5, -0.5, math.sqrt(0.75)))
    assert torch.allclose(sdf.rounded_box(_t([1.0, 0, 0]), b, torch.tensor(0.2)), _t(0.5))
    q = _t([0.0, 3.0, 0], [2.0, 0, 0], [0.0, 0.0, 0.0])
    assert torch.allclose(sdf.cylinder(q, torch.tensor(1.0), torch.tensor(1.0)), _t(2.0, 1.0, -1.0))
    assert torch.allclose(sdf.capsule(q, torch.tensor(1.0), torch.tensor(0.5)), _t(1.5, 1.5, -0.5))
    assert torch.allclose(sdf.torus(_t([2.0, 0, 0], [0.0, 0, 0]), torch.tensor(2.0), torch.tensor(0.5)),
                          _t(-0.5, 1.5))
    # Cone r=1 at y=-1 narrowing to r=0 at y=1: the slanted side is at distance (1-x-... ) / sqrt(5) * 2.
    cone = sdf.cone(_t([0.0, -2.0, 0], [0.0, 0.0, 0], [1.0, 0.0, 0]), torch.tensor(1.0), torch.tensor(1.0),
                    torch.tensor(0.0))
    assert torch.allclose(cone, _t(1.0, -1.0 / math.sqrt(5), 1.0 / math.sqrt(5)), atol=1e-6)
    assert torch.allclose(sdf.ellipsoid(_t([2.0, 0, 0]), torch.tensor([1.0, 2.0, 3.0])), _t(1.0))


def test_profile_primitives_agree_with_their_closed_forms():
    torch.manual_seed(0)
    p = torch.rand(2000, 3) * 3 - 1.5
    square = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    box = sdf.box(p, torch.tensor([0.5, 0.5, 0.3]))
    assert torch.allclose(sdf.extrusion(p, square, torch.tensor(0.3)), box, atol=1e-5)
    rectangle = torch.tensor([[0.0, -0.4], [0.7, -0.4], [0.7, 0.4], [0.0, 0.4]])   # (radius, y) half plane
    cylinder = sdf.cylinder(p, torch.tensor(0.7), torch.tensor(0.4))
    assert torch.allclose(sdf.lathe(p, rectangle), cylinder, atol=1e-5)


def test_csg_operators():
    a, b = _t(0.3, -0.2, 1.0), _t(-0.1, 0.4, 5.0)
    assert torch.equal(sdf.union(a, b), _t(-0.1, -0.2, 1.0))
    assert torch.equal(sdf.subtraction(a, b), _t(0.3, -0.2, 1.0))
    assert torch.equal(sdf.intersection(a, b), _t(0.3, 0.4, 5.0))
    blended = sdf.smooth_union(a, b, 0.2)
    assert (blended <= sdf.union(a, b) + 1e-7).all() and blended[2] == 1.0   # exact when far apart


def test_part_transform_and_material_of_cut_surface():
    cutter = Part("box", (0.2, 0.2, 0.2), translation=(0.3, 0.0, 0.0), operation="subtract", material=1)
    obj = ProceduralObject((Part("sphere", (0.4,)), cutter), (RED, RED))
    field = obj.field()
    d, part = field.sdf_and_part(_t([0.0, 0.0, 0.0], [0.1, 0.0, 0.0], [-0.4, 0.0, 0.0]))
    # The box spans x in [0.1, 0.5]: the centre is 0.1 from the cut face, (0.1,0,0) on it, (-0.4,0,0) on the sphere.
    assert torch.allclose(d, _t(-0.1, 0.0, 0.0), atol=1e-6)
    assert part.tolist() == [1, 1, 0]


# ---------------------------------------------------------------------------------------------------------
# Rendering in the model camera
# ---------------------------------------------------------------------------------------------------------

def test_sphere_traced_silhouette_matches_the_analytic_projection():
    fov, size = math.radians(35), 96
    view = _identity_view(fov)
    out = render_views(_sphere_object().field(), [view], size, supersample=1, shadow_steps=0)
    mask = out.coverage[0] > 0.5
    # Analytic: pixel centre (i + 0.5, j + 0.5) -> camera ray; inside iff the ray passes within RADIUS.
    f = camera.focal_pixels(fov, size)
    c = (torch.arange(size) + 0.5 - size / 2) / f
    y, x = torch.meshgrid(-c, c, indexing="ij")
    dirs = torch.nn.functional.normalize(torch.stack([x, y, -torch.ones_like(x)], -1), dim=-1).double()
    to_centre = torch.tensor(CENTRE) - torch.tensor([0.0, 0.0, view.distance])      # camera-local (ms = 1)
    closest = (dirs * to_centre).sum(-1)
    analytic = (to_centre.norm() ** 2 - closest ** 2) < RADIUS ** 2
    iou = (mask & analytic).sum() / (mask | analytic).sum()
    assert iou > 0.98
    # Spec §2.2 closed form: u = f x / (d - z) + S/2 lands near the silhouette's centroid (pixel units).
    u = f * CENTRE[0] / (view.distance - CENTRE[2]) + size / 2
    v = -f * CENTRE[1] / (view.distance - CENTRE[2]) + size / 2
    rows, cols = mask.nonzero(as_tuple=True)
    assert abs(cols.float().mean() + 0.5 - u) < 0.6 and abs(rows.float().mean() + 0.5 - v) < 0.6


def test_renders_are_premultiplied_rgba_in_range_with_the_exact_camera():
    obj = make_object(11)
    rng = np.random.default_rng(0)
    views = [random_view(surface_samples(obj.field(), 32).double().numpy(), rng) for _ in range(2)]
    out = render_views(obj.field(), views, 48, supersample=2, shadow_steps=8)
    assert out.rgba.shape == (2, 4, 48, 48) and out.rgba.min() >= 0 and out.rgba.max() <= 1
    assert torch.allclose(out.conditioning, out.rgba[:, :3] * out.rgba[:, 3:], atol=1e-5)
    assert (out.rgba[:, 3] <= out.coverage + 1e-6).all() and out.coverage.mean() > 0.05
    for cam, view in zip(out.cameras, views):
        fov, distance, mesh_scale = cam.tolist()
        assert math.radians(10) <= fov <= math.radians(70) and mesh_scale == 1.0
        assert distance >= camera.distance_from_fov(fov)[0] - 1e-6


def test_crop_view_is_the_camera_relation_inference_builds_from_a_render():
    """Training views must be what inference makes of an image: rendering the crop view gives the object centred
    and filling 1/1.1 of the frame, inference's own crop of the full render finds the crop view's FOV, the
    object's silhouette in the crop render is its surface projected through the crop camera (the conditioning
    pinhole), and the posed object fits the model cube."""
    obj = make_object(23)
    field = obj.field()
    surface = surface_samples(field, 32).double().numpy()
    view = random_view(surface, np.random.default_rng(4))
    crop = crop_view(view, surface)
    size = 128
    renders = render_views(field, [view, crop], size, supersample=2, shadow_steps=0)
    full, covered = renders.rgba[0], renders.coverage[1] > 0.5      # coverage: silhouette whatever the alpha
    image = Image.fromarray((full.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), "RGBA")
    geometry = crop_geometry(image)
    inferred = camera.CropCamera.from_crop(camera.Intrinsics.from_hfov(size, size, view.fov), *geometry.center,
                                           geometry.size)
    assert inferred.fov == pytest.approx(crop.fov, rel=0.03)
    assert abs(inferred.shear_x) < 0.2 and abs(inferred.shear_y) < 0.2     # the render itself was off-centre
    rows, cols = covered.nonzero(as_tuple=True)
    box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
    assert (box[:2] + box[2:]).div(2).sub(size / 2).abs().max() < 2.5                         # centred
    assert (box[2:] - box[:2]).max() / size == pytest.approx(1 / CROP_MARGIN, abs=0.03)      # 1/1.1 of the frame
    model = crop.model_points(surface)
    assert np.abs(model).max() <= 0.5 + 1e-3
    f = camera.focal_pixels(crop.fov, size)
    u = f * model[:, 0] / (crop.distance - model[:, 2]) + size / 2
    v = -f * model[:, 1] / (crop.distance - model[:, 2]) + size / 2
    near = torch.nn.functional.max_pool2d(covered[None, None].float(), 3, 1, 1)[0, 0] > 0   # 1-pixel tolerance:
    inside = near[v.astype(int).clip(0, size - 1), u.astype(int).clip(0, size - 1)]       # thin parts, pixel grid
    assert inside.float().mean() > 0.995
    z = model[:, 2]
    assert abs(z.min() + z.max()) < 0.05                                   # depth range centred in the cube


# ---------------------------------------------------------------------------------------------------------
# Objects, seeds, splits
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("category", CATEGORIES)
def test_every_category_is_deterministic_and_normalised(category):
    obj = make_object(5, category)
    assert obj == make_object(5, category)
    points = surface_samples(obj.field(), 64)
    extent = points.abs().max().item()
    assert 0.49 < extent <= 0.5 + 1e-3
    assert obj.materials and all(0 <= m.material < len(obj.materials) for m in obj.parts)


def test_seeds_give_varied_objects():
    categories = {make_object(s).category for s in range(40)}
    assert len(categories) >= 6
    assert make_object(1) != make_object(2)


def test_train_and_eval_seeds_are_disjoint_by_construction():
    assert seed_of("train", EVAL_SEED_BASE - 1) < seed_of("eval", 0) == EVAL_SEED_BASE
    with pytest.raises(IndexError):
        seed_of("train", EVAL_SEED_BASE)
    with pytest.raises(IndexError):
        ProceduralDataset("eval", length=EVAL_SEED_BASE + 1)
    assert ProceduralDataset("eval").object(0).seed == EVAL_SEED_BASE


def test_dataset_samples_are_deterministic():
    ds = ProceduralDataset("eval", image_size=24, ss_resolution=16, shape_resolution=32, supersample=1)
    a, b = ds[3], ds[3]
    assert torch.equal(a.renders.rgba, b.renders.rgba) and torch.equal(a.occupancy, b.occupancy)
    assert torch.equal(a.shapes[1].coords, b.shapes[1].coords)
    assert torch.equal(a.shapes[1].offsets, b.shapes[1].offsets)


# ---------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sphere_targets():
    posed = PosedObject(_sphere_object().field(), _identity_view())
    return posed, shape_targets(posed, 32)


def _oriented_quads(targets):
    """Reference assembly of spec §6.1 (quad table, kept if all four voxels exist, split rule), oriented by
    `edge_inside_first`; returns triangles and the number of quads missing a voxel."""
    keys = {tuple(c): i for i, c in enumerate(targets.coords.tolist())}
    w = targets.split_weight
    faces, missing = [], 0
    for i, a in targets.intersected.nonzero().tolist():
        quad = [keys.get(tuple((targets.coords[i] + QUAD_OFFSETS[a][k]).tolist())) for k in range(4)]
        if None in quad:
            missing += 1
            continue
        split = [(0, 1, 2), (0, 2, 3)] if w[quad[0]] * w[quad[2]] > w[quad[1]] * w[quad[3]] else [(0, 1, 3), (3, 1, 2)]
        for tri in split:
            face = [quad[k] for k in tri]
            faces.append(face[::-1] if targets.edge_inside_first[i, a] else face)
    return np.array(faces), missing


def test_fdg_targets_of_a_sphere_form_a_closed_oriented_surface_on_the_sphere(sphere_targets):
    trimesh = pytest.importorskip("trimesh")
    _, t = sphere_targets
    assert t.offsets.min() > -0.5 and t.offsets.max() < 1.5
    faces, missing = _oriented_quads(t)
    assert missing == 0
    mesh = trimesh.Trimesh(t.dual_vertices.numpy(), faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * RADIUS ** 3, rel=0.01)     # outward normals
    deviation = np.abs(np.linalg.norm(mesh.vertices - CENTRE, axis=1) - RADIUS) * t.resolution
    assert deviation.max() < 0.1                                                        # voxel units


def test_fdg_targets_reconstruct_through_the_product_mesher(sphere_targets):
    trimesh = pytest.importorskip("trimesh")
    _, t = sphere_targets
    vertices, faces = reconstruct_mesh_from_targets(t)
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces))
    assert mesh.is_watertight
    used = mesh.vertices[np.unique(mesh.faces)]
    assert (np.abs(np.linalg.norm(used - CENTRE, axis=1) - RADIUS) * t.resolution).max() < 1.0


def test_split_weights_choose_the_diagonal_nearer_the_surface(sphere_targets):
    posed, t = sphere_targets
    faces, _ = _oriented_quads(t)
    quads = faces.reshape(-1, 2, 3)
    # Triangles (0,1,2),(0,2,3) share diagonal 0-2; compare the chosen shared edge with the other one.
    v = t.dual_vertices
    chosen = np.array([sorted(set(q[0]) & set(q[1])) for q in quads])
    other = np.array([sorted(set(q[0]) ^ set(q[1])) for q in quads])
    near = posed.sdf((v[chosen[:, 0]] + v[chosen[:, 1]]) / 2).abs()
    far = posed.sdf((v[other[:, 0]] + v[other[:, 1]]) / 2).abs()
    assert (near <= far + 1e-6).float().mean() > 0.9


def test_occupancy_contains_the_shape_voxels_and_matches_the_sphere(sphere_targets):
    posed, t = sphere_targets
    occ = occupancy(posed, 16)
    parent = (t.coords // 2).long()
    assert occ[parent[:, 0], parent[:, 1], parent[:, 2]].all()
    idx = torch.stack(torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij"), -1)
    centres = (idx + 0.5) / 16 - 0.5
    analytic = ((centres - torch.tensor(CENTRE, dtype=torch.float32)).norm(dim=-1) - RADIUS).abs() <= math.sqrt(3) / 32
    assert torch.equal(occ, analytic)


def test_pbr_attributes_are_in_range_and_follow_the_material(sphere_targets):
    _, t = sphere_targets
    assert t.attributes.shape == (len(t.coords), 6)
    assert torch.allclose(t.attributes, torch.tensor(RED.ink_a).expand_as(t.attributes))
    obj = make_object(7)
    posed = PosedObject(obj.field(), _identity_view())
    attributes = shape_targets(posed, 32).attributes
    assert attributes.min() >= 0 and attributes.max() <= 1


def test_decoder_logits_invert_the_decoder_activations(sphere_targets):
    _, t = sphere_targets
    h = t.decoder_logits()
    assert torch.allclose(2 * torch.sigmoid(h[:, :3]) - 0.5, t.offsets, atol=1e-5)
    assert torch.equal(h[:, 3:6] > 0, t.intersected)
    assert torch.allclose(torch.nn.functional.softplus(h[:, 6]), t.split_weight.clamp(min=1e-4), rtol=1e-3, atol=1e-5)
