"""`pixal3d weights download`: the one command that touches the network, on the user's explicit request.

It fetches the official Pixal3D snapshot and the helper models into the standard caches, where
`loading.resolve_snapshot` (Hugging Face cache) and `conditioning` (torch hub cache for NAF) find them offline:

* `TencentARC/Pixal3D` (main): pipeline.json + the 7 checkpoints, ~24 GB. Licence: see the model card on
  Hugging Face; the weights are not ours to relicense.
* DINOv3 ViT-L/16 (`camenduru/dinov3-vitl16-pretrain-lvd1689m`, a mirror of the gated
  `facebook/dinov3-vitl16-pretrain-lvd1689m`; the DINOv3 licence applies).
* NAF release weights `naf_release.pth` (valeoai/NAF GitHub release, ~2.6 MB).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

DINOV3_REPO_ID = "camenduru/dinov3-vitl16-pretrain-lvd1689m"
NAF_URL = "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights (honours TORCH_HOME)."""
    home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return home / "hub" / "checkpoints"


def naf_weights_path() -> Path:
    return torch_hub_checkpoints() / "naf_release.pth"


def download(repo_id: str, revision: str = "main", with_helpers: bool = True) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit("`pixal3d weights download` needs huggingface_hub: pip install huggingface_hub") from None
    path = Path(snapshot_download(repo_id, revision=revision))
    print(f"Pixal3D snapshot: {path}")
    if with_helpers:
        print(f"DINOv3: {snapshot_download(DINOV3_REPO_ID)}")
        target = naf_weights_path()
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(NAF_URL, timeout=60) as r, tempfile.NamedTemporaryFile(
                    dir=target.parent, delete=False) as tmp:
                shutil.copyfileobj(r, tmp)
            os.replace(tmp.name, target)
        print(f"NAF: {target}")
    return path


def main(argv: list[str]) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="pixal3d weights download",
                                description="Download the official Pixal3D weights and helper models (network).")
    p.add_argument("--repo-id", default="TencentARC/Pixal3D")
    p.add_argument("--revision", default="main")
    p.add_argument("--no-helpers", action="store_true", help="skip DINOv3 and NAF")
    a = p.parse_args(argv)
    download(a.repo_id, a.revision, with_helpers=not a.no_helpers)
    print("Done. Use it with: pixal3d serve --model", a.repo_id, file=sys.stderr)
    return 0
