"""Which code hashes count as the checkout's for a method: its own (``evidence_run.code_hash``) and every older hash
that ``evidence_certify.py`` showed to train bit for bit alike (``evidence/equivalent_code.json``, followed back
through successive certifications)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from evidence_run import code_hash

EQUIVALENTS = Path(__file__).resolve().parent / "evidence" / "equivalent_code.json"


def key(method: str, code: str) -> str:
    """The table's key of a certification: per method, since methods share code hashes (SparseMask's delta and
    mask modes; full fine-tuning, SHiRA and LoRA) and one may be certified while another is not."""
    return f"{method}:{code}"


@functools.lru_cache(maxsize=None)
def current_codes(method: str) -> frozenset[str]:
    """The checkout's code hash for ``method`` and the older ones certified equivalent to it."""
    equivalents = json.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else {}
    codes, code = [code_hash(method)], code_hash(method)
    while key(method, code) in equivalents and equivalents[key(method, code)]["same_as"] not in codes:
        code = equivalents[key(method, code)]["same_as"]
        codes.append(code)
    return frozenset(codes)
