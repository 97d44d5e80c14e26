import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src" / "blochflow" / "data" / "examples" / "quartz"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def quartz_paths():
    return EXAMPLE / "quartz_reference.cif", EXAMPLE / "quartz.cif_pets"


@pytest.fixture(scope="session")
def quartz_synthetic_path():
    p = SHARED / "quartz" / "synthetic" / "quartz_paper_data.cif_pets"
    if not p.exists():
        pytest.skip("shared data not present")
    return p
