#!/usr/bin/env python3
"""Builds the installable Blender extension `dist/pixal3d-<version>.zip`.

The zip holds `blender_addon/` as the extension root, the backend's shared modules (`camera.py`, `protocol.py`,
`client.py`) copied from `backend/pixal3d_backend/` into the package `pixal3d_shared/` (their only source), and
the pyzmq wheels for every platform and Blender Python listed in `TARGETS` under `wheels/`, with the manifest's
`wheels` and `platforms` fields written to match.

Wheels come from `--wheels-dir` when it has them, else `pip download` fetches them (PyPI, binary wheels only).
Blender installs, per system, only the wheels matching its platform and Python: cp311 for Blender 4.2 - 5.0,
the cp312 stable-ABI (abi3) wheel for Python 3.12+ (Blender 5.1+).

    python build_addon.py                         # all platforms, wheels downloaded as needed
    python build_addon.py --wheels-dir wheels/    # offline, from a prepared folder
    python build_addon.py --platforms linux-x64   # one platform (e.g. for a test)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
ADDON_DIR = REPO / "blender_addon"
SHARED_MODULES = ("camera.py", "protocol.py", "client.py")
SHARED_PACKAGE = "pixal3d_shared"
PYZMQ = "pyzmq==27.3.0"

# Blender platform -> (pip --platform tags, a regex the wheel's platform tag must match)
PLATFORMS = {
    "windows-x64": (["win_amd64"], r"win_amd64"),
    "macos-arm64": (["macosx_11_0_arm64"], r"macosx_\d+_\d+_(arm64|universal2)"),
    "macos-x64": (["macosx_10_15_x86_64"], r"macosx_\d+_\d+_(x86_64|universal2)"),
    "linux-x64": (["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
                  r"(many|musl)?linux[\w.]*_x86_64"),
}
# pip --python-version -> the wheel's (python tag, abi tag) pattern
PYTHONS = {"3.11": r"cp311-cp311", "3.13": r"cp3(1[2-3])-abi3"}


def wheel_matches(filename: str, platform: str, python: str) -> bool:
    name, _, rest = filename.partition("-")
    if name.lower() != "pyzmq" or not filename.endswith(".whl"):
        return False
    tags = filename[:-4].split("-")[-3:]
    platform_ok = all(re.fullmatch(PLATFORMS[platform][1], t) for t in tags[2].split("."))
    return platform_ok and re.fullmatch(PYTHONS[python], f"{tags[0]}-{tags[1]}") is not None


def find_wheel(directory: Path, platform: str, python: str) -> Path | None:
    version = PYZMQ.partition("==")[2]
    found = sorted(p for p in directory.glob(f"pyzmq-{version}-*.whl") if wheel_matches(p.name, platform, python))
    return found[0] if found else None


def download_wheel(directory: Path, platform: str, python: str) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps", "--dest", str(directory),
               "--python-version", python, "--implementation", "cp", PYZMQ]
    for tag in PLATFORMS[platform][0]:
        command += ["--platform", tag]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wheel = find_wheel(directory, platform, python)
    if wheel is None:
        raise SystemExit(f"pip found no {PYZMQ} wheel for {platform}, Python {python}")
    return wheel


def collect_wheels(platforms: list[str], wheels_dir: Path | None, download_dir: Path | None) -> list[Path]:
    """The wheels for every platform and Python, from `wheels_dir`, else downloaded into `download_dir`
    (None: offline, a missing wheel is an error)."""
    wheels: dict[str, Path] = {}
    for platform in platforms:
        for python in PYTHONS:
            wheel = (find_wheel(wheels_dir, platform, python) if wheels_dir else None) \
                or (download_dir and (find_wheel(download_dir, platform, python)
                                      or download_wheel(download_dir, platform, python)))
            if not wheel:
                raise SystemExit(f"no {PYZMQ} wheel for {platform}, Python {python} in {wheels_dir} (offline build); "
                                 f"fetch them with: python build_addon.py --fetch-only --wheels-dir {wheels_dir}")
            wheels[wheel.name] = wheel        # universal2 wheels serve both macOS platforms
    return [wheels[name] for name in sorted(wheels)]


def manifest_text(source: str, wheels: list[Path], platforms: list[str]) -> str:
    """The manifest with its `wheels` line replaced and a `platforms` line after it."""
    listed = ",\n".join(f'  "./wheels/{w.name}"' for w in wheels)
    replacement = f"wheels = [\n{listed},\n]\nplatforms = [{', '.join(f'{chr(34)}{p}{chr(34)}' for p in platforms)}]"
    text, count = re.subn(r"(?m)^wheels = \[\]$", replacement, source)
    if count != 1:
        raise SystemExit("blender_manifest.toml must contain the line `wheels = []` for build_addon.py to fill")
    tomllib.loads(text)
    return text


def build(output_dir: Path, platforms: list[str], wheels_dir: Path | None, offline: bool = False) -> Path:
    source = (ADDON_DIR / "blender_manifest.toml").read_text()
    manifest = tomllib.loads(source)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{manifest['id']}-{manifest['version']}.zip"
    with tempfile.TemporaryDirectory(prefix="pixal3d-wheels-") as download_dir:
        wheels = collect_wheels(platforms, wheels_dir, None if offline else Path(download_dir))
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(ADDON_DIR.rglob("*")):
                relative = path.relative_to(ADDON_DIR)
                if path.is_dir() or "__pycache__" in relative.parts or path.suffix == ".pyc":
                    continue
                if relative.as_posix() == "blender_manifest.toml":
                    archive.writestr("blender_manifest.toml", manifest_text(source, wheels, platforms))
                else:
                    archive.write(path, relative.as_posix())
            archive.writestr(f"{SHARED_PACKAGE}/__init__.py",
                             '"""Copied from backend/pixal3d_backend/ by build_addon.py; edit them there."""\n')
            for module in SHARED_MODULES:
                archive.write(REPO / "backend" / "pixal3d_backend" / module, f"{SHARED_PACKAGE}/{module}")
            for wheel in wheels:
                archive.write(wheel, f"wheels/{wheel.name}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=REPO / "dist")
    parser.add_argument("--platforms", nargs="+", choices=sorted(PLATFORMS), default=list(PLATFORMS),
                        help="Blender platforms to bundle pyzmq wheels for (default: all)")
    parser.add_argument("--wheels-dir", type=Path, help="folder with the pyzmq wheels; missing ones are downloaded")
    parser.add_argument("--offline", action="store_true", help="never download: every wheel must be in --wheels-dir")
    parser.add_argument("--fetch-only", action="store_true", help="only download the wheels into --wheels-dir")
    args = parser.parse_args(argv)
    if args.fetch_only:
        if args.wheels_dir is None:
            parser.error("--fetch-only needs --wheels-dir")
        args.wheels_dir.mkdir(parents=True, exist_ok=True)
        print("\n".join(str(w) for w in collect_wheels(args.platforms, args.wheels_dir, args.wheels_dir)))
        return 0
    print(build(args.output_dir, args.platforms, args.wheels_dir, args.offline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
