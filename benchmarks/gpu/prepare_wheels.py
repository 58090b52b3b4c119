#!/usr/bin/env python
"""Here, before a GPU call: the wheels benchmarks/gpu/device_session.sh installs on the machine, into ``.whl/``.

The machine reaches no registry, so what it lacks travels as wheels in ``.whl/`` (git-ignored: name it in the call's
``carry``): peft 0.21.2, the release the project pins (the image's own peft may be another), and bitsandbytes 0.50.2
for the qlora phase (the image has none), cut to its CPU and CUDA 13 libraries. Whole, that wheel is 43 MB, a library
for every CUDA and ROCm release; a call carries 64 MiB in all.

    python benchmarks/gpu/prepare_wheels.py          # from the repository root; then carry [".whl"]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS = ["peft==0.21.2", "bitsandbytes==0.50.2"]
#: bitsandbytes' native libraries kept: its CPU one, and CUDA 13.0 and 13.2 (the image's torch is 2.11.0+cu130).
KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def download(folder: Path) -> None:
    """``WHEELS`` for the machine's Python 3.12 on x86-64 (binary wheels only, no dependencies: the image has them)."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *WHEELS],
                   check=True)


def slim(wheel: Path, keep: tuple[str, ...] = KEEP) -> list[str]:
    """Rewrite ``wheel`` without bitsandbytes' native libraries not named in ``keep`` (their RECORD lines go too, so
    that pip installs it as any wheel); returns what was dropped."""

    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes") and base.endswith(".so") and base not in keep

    dropped_names = []
    slimmed = wheel.with_name(wheel.name + ".part")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if dropped(info.filename):
                dropped_names.append(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            target.writestr(info, data)
    slimmed.replace(wheel)
    return dropped_names


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", default=".whl", help="folder of the wheels (default .whl, what the call carries)")
    args = parser.parse_args(argv)
    folder = Path(args.dest)
    folder.mkdir(exist_ok=True)
    download(folder)
    for wheel in sorted(folder.glob("bitsandbytes-*.whl")):
        slim(wheel)
    for wheel in sorted(folder.glob("*.whl")):
        print(f"{wheel}: {wheel.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
