"""Shared fixtures: the location of the real datasets and the repository root."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared datasets folder, taken from the LLM_STAGES_DATA environment variable."""
    value = os.environ.get("LLM_STAGES_DATA")
    if not value:
        pytest.fail("LLM_STAGES_DATA is not set: point it at the datasets folder (e.g. ../shared/data)")
    path = Path(value)
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        pytest.fail(f"LLM_STAGES_DATA={value} does not contain tinyshakespeare/input.txt")
    return path


def assert_clean_error(result, needle):
    """Check that a finished command failed with exactly one `error:` line containing needle, and no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr
