"""Which code hashes count as the checkout's for a method: its own (``evidence_run.code_hash``) and every older hash
that ``evidence_certify.py`` showed to train bit for bit alike (``evidence/equivalent_code.json``, followed back
through successive certifications)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from evidence_run import code_hash

EQUIVALENTS = Path(__file__).resolve().parent / "evidence" / "equivalent_code.json"


@functools.lru_cache(maxsize=None)
def current_codes(method: str) -> frozenset[str]:
    """The checkout's code hash for ``method`` and the older ones certified equivalent to it."""
    equivalents = json.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else {}
    codes, code = [code_hash(method)], code_hash(method)
    while code in equivalents and equivalents[code]["method"] == method and equivalents[code]["same_as"] not in codes:
        code = equivalents[code]["same_as"]
        codes.append(code)
    return frozenset(codes)
