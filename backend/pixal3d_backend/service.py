"""Generation service: a protocol request -> pipeline -> export -> protocol result.

`Generator` is what the server runs for each job, and what `pixal3d generate` runs in-process. It owns the one
translation between the wire's view of a camera (the full image's intrinsics) and the model's (the square crop
around the object): `camera.CropCamera` per view, and `camera.MultiViewRig` for several views re-based onto view
0, whose `glb_to_camera` places the result back in view 0's source camera.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__, protocol
from .camera import CropCamera, MultiViewRig
from .conditioning.preprocess import crop_geometry
from .export import ExportedAsset, ExportOptions, GlbCamera, export_asset, write_glb
from .loading import LoadedModel, load_model
from .mesh import orient_outward
from .protocol import ErrorCode, Options, ProtocolError, Result, SubmitRequest, View
from .sampler import Cancelled


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)   # speed over size: it goes over loopback
    return buf.getvalue()


def sampler_overrides(options: Options) -> dict[str, dict]:
    return {"sparse_structure": {"steps": options.ss_steps, "guidance_strength": options.ss_guidance},
            "shape": {"steps": options.shape_steps, "guidance_strength": options.shape_guidance},
            "texture": {"steps": options.tex_steps, "guidance_strength": options.tex_guidance}}


class Generator:
    def __init__(self, model: LoadedModel):
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.pipeline.device

    @property
    def low_vram(self) -> bool:
        return self.model.pipeline.low_vram

    def use_low_vram(self) -> None:
        """From now on each model stays on the CPU except during its own stage (the server's answer to running
        out of GPU memory, or a job that asks for it: about 3 % slower on an H200, a third of the VRAM)."""
        self.model.pipeline.enable_low_vram()

    def capabilities(self) -> dict:
        dev = self.device
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            name = torch.cuda.get_device_name(dev)
        else:
            free, name = None, "cpu"
        return {"device": name, "free_memory_bytes": free, "model_id": self.model.model_id,
                "model_hash": self.model.model_hash, "resolutions": list(self.model.resolutions),
                "max_views": protocol.MAX_VIEWS, "multiview": self.model.pipeline.multiview_weights,
                "default_options": dict(self.model.default_options)}

    def _view_camera(self, view: View, image: Image.Image) -> CropCamera:
        cam = view.camera
        if (cam.width, cam.height) != image.size:
            raise ProtocolError(ErrorCode.BAD_CAMERA, f"the camera is {cam.width}x{cam.height} but the image is "
                                                      f"{image.width}x{image.height}; send the camera of this image")
        geometry = crop_geometry(image)
        return CropCamera.from_crop(cam.intrinsics(), *geometry.center, geometry.size)

    def rig(self, views: list[View], images: list[Image.Image]) -> MultiViewRig:
        """The views' crop cameras re-based onto view 0 (BAD_CAMERA when the cameras do not agree on where the
        object is)."""
        crops = [self._view_camera(view, image) for view, image in zip(views, images)]
        try:
            return MultiViewRig.from_views(crops, [view.camera.c2w for view in views])
        except ValueError as error:
            raise ProtocolError(ErrorCode.BAD_CAMERA, str(error)) from None

    def run(self, request: SubmitRequest, on_progress, should_cancel) -> "Generation":
        """The whole job: pipeline + export. Cancellation (between sampler steps) raises CANCELLED."""
        options = request.options
        images = []
        for view in request.views:
            image = Image.open(io.BytesIO(view.image_png))
            image.load()
            images.append(image)
        rig = self.rig(request.views, images)
        fusion = self.view_fusion(options)
        if options.low_vram and not self.low_vram:
            self.use_low_vram()      # asked for by a client with little VRAM: from now on, for every job
        t0 = time.perf_counter()
        try:
            out = self.model.pipeline.run(
                images, rig.grid_cameras(), seed=options.seed, resolution=options.resolution,
                sampler_overrides=sampler_overrides(options),
                fusion=fusion,
                progress=on_progress, should_cancel=should_cancel)
            on_progress("export", 0, 1)
            mesh = orient_outward(out.mesh)        # the official mesher's winding is per axis, not per side
            asset = export_asset(mesh.vertices, mesh.faces, mesh.coords, mesh.attrs,
                                 out.resolution, ExportOptions(face_target=options.face_target,
                                                               remesh=options.remesh,
                                                               texture_size=options.texture_size,
                                                               normal_map=options.normal_map,
                                                               unwrap=options.unwrap),
                                 device=self.device)
        except Cancelled:
            raise ProtocolError(ErrorCode.CANCELLED, "the job was cancelled") from None
        metadata = {"model_id": self.model.model_id, "model_hash": self.model.model_hash,
                    "backend_version": __version__, "seed": options.seed, "resolution": out.resolution,
                    "alpha_mode": asset.alpha_mode, "tokens": out.tokens, "crop_fov": rig.crops[0].fov,
                    "views": len(request.views), "scene_units_per_model_unit": rig.scale,
                    "timings_s": {**{k: round(v, 3) for k, v in out.timings.items()},
                                  **{f"export_{k}": round(v, 3) for k, v in asset.timings.items()},
                                  "total": round(time.perf_counter() - t0, 3)}}
        if len(request.views) > 1:
            metadata["view_fusion"] = fusion
            metadata["multiview_weights"] = self.model.pipeline.multiview_weights
        return Generation(asset, rig, metadata)

    def view_fusion(self, options: Options) -> str:
        """How several views condition the cascade (`pipeline.FUSIONS`): the official feature mean for multi-view
        weights (or the visibility-weighted mean when asked); single-view weights (the bundled model, the official
        single-view release) get view 0's conditioning on a sparse structure carved by the views' visual hull and
        completed with its shell: the feature mean is outside what they were trained on and gives broken shapes
        (measured, BENCHMARKS.md)."""
        if options.visibility_weighted:
            return "visible"
        return "mean" if self.model.pipeline.multiview_weights else "hull"

    def generate(self, request: SubmitRequest, on_progress, should_cancel) -> Result:
        return self.run(request, on_progress, should_cancel).to_result()


@dataclass
class Generation:
    asset: ExportedAsset
    rig: MultiViewRig
    metadata: dict

    def glb_to_camera(self) -> np.ndarray:
        """Official-GLB-frame point -> view 0's source camera (scene units when several cameras fixed the scale)."""
        return self.rig.glb_to_camera()

    def to_result(self) -> Result:
        a = self.asset
        maps = {"base_color": png_bytes(a.base_color), "metallic_roughness": png_bytes(a.metallic_roughness)}
        if a.normal_map is not None:
            maps["normal"] = png_bytes(a.normal_map)
        return Result(positions=a.positions, faces=a.faces, uvs=a.uvs, normals=a.normals, maps=maps,
                      glb_to_camera=self.glb_to_camera(), metadata=self.metadata)

    def glb_camera(self) -> GlbCamera:
        """The model's own (centred) view of view 0's crop, in the GLB's frame: glTF cameras cannot hold the
        off-axis shear."""
        main = self.rig.crops[0]
        centred = dataclasses.replace(main, shear_x=0.0, shear_y=0.0)
        return GlbCamera(centred.glb_to_camera(), yfov=main.fov)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# GPUs with less memory than this keep the models in pinned host memory between stages unless told otherwise: the
# full-size cascade peaks at 19.8 GiB (1024) / 21.9 GiB (1536) with every model resident and at 7.4 / 9.3 GiB in
# low-VRAM mode, which costs about 3 % more time on an H200 (BENCHMARKS.md).
LOW_VRAM_BELOW_GIB = 32


def default_low_vram(device: str | torch.device) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < LOW_VRAM_BELOW_GIB * 2 ** 30


def load_model_from_arguments(a: argparse.Namespace) -> LoadedModel:
    """The model of `--model` (default: the bundled one) on `--device`, low-VRAM per `--[no-]low-vram` or, when
    neither is given, `default_low_vram`."""
    device = a.device or default_device()
    low_vram = a.low_vram if a.low_vram is not None else default_low_vram(device)
    return load_model(a.model, device=device, low_vram=low_vram, dinov3_path=a.dinov3, naf_path=a.naf)


def create_generator(args: argparse.Namespace) -> Generator:
    """Used by `pixal3d serve`: loads the model once; the server keeps it warm between jobs."""
    return Generator(load_model_from_arguments(args))


# ---------------------------------------------------------------------------------------------------------
# `pixal3d generate`: one image -> GLB, in this process
# ---------------------------------------------------------------------------------------------------------

def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options that choose and place a model, shared by `generate` and `eval`."""
    p.add_argument("--model", help="snapshot folder or Hugging Face repo id in the local cache; default: the bundled "
                   "default model")
    p.add_argument("--dinov3", help="local DINOv3 ViT-L/16 folder (official models only)")
    p.add_argument("--naf", help="local naf_release.pth (official models only)")
    p.add_argument("--device", default=None)
    p.add_argument("--low-vram", action=argparse.BooleanOptionalAction, default=None,
                   help=f"keep models in host memory between stages (default: on for GPUs under {LOW_VRAM_BELOW_GIB} GiB)")
    for f in dataclasses.fields(Options):
        if f.name != "low_vram":
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default) if not isinstance(f.default, bool)
                           else (lambda s: s.lower() in ("1", "true", "yes", "on")), default=None,
                           choices=f.metadata["choices"] or None, help=f.metadata.get("doc"))


def model_from_arguments(a: argparse.Namespace) -> tuple[LoadedModel, dict]:
    """The loaded model and the generation options given on the command line (the rest: the model's defaults)."""
    model = load_model_from_arguments(a)
    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(Options)
             if f.name != "low_vram" and getattr(a, f.name) is not None}
    return model, {**model.default_options, **given}


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pixal3d generate", description="Generate a textured GLB from one RGBA image "
                                "(the object's alpha is its mask) with the bundled default model or a snapshot.")
    p.add_argument("image", type=Path, help="RGBA PNG with the object's alpha")
    p.add_argument("-o", "--output", type=Path, help="GLB path (default: the image's name with .glb)")
    p.add_argument("--fov", type=float, default=40.0, help="horizontal field of view of the photo, degrees")
    add_model_arguments(p)
    a = p.parse_args(argv)
    image = Image.open(a.image)
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    model, options = model_from_arguments(a)
    options = Options(**options)
    camera = protocol.Camera(hfov=np.radians(a.fov), width=image.width, height=image.height, c2w=np.eye(4))
    request = protocol.check(SubmitRequest([View(buf.getvalue(), camera)], options))

    def report(stage, step, total):
        print(f"\r{stage:>16} {step}/{total}", end="", file=sys.stderr, flush=True)

    generation = Generator(model).run(request, report, lambda: False)
    print(file=sys.stderr)
    out = a.output or a.image.with_suffix(".glb")
    write_glb(generation.asset, out, camera=generation.glb_camera())
    print(f"wrote {out} ({len(generation.asset.faces)} faces, {generation.metadata['timings_s']['total']:.1f} s)")
    return 0
