"""The README's tables are what bench/report.py renders from bench/results and the shipped configs."""

import re
from pathlib import Path

import pytest

from bench import report

README = Path(__file__).parent.parent / "README.md"


@pytest.mark.parametrize("marker", sorted(report.TABLES))
def test_readme_table_matches_its_source(marker):
    found = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", README.read_text(), flags=re.S)
    assert found, f"README.md has no <!-- {marker} --> block"
    assert found[1].strip() == report.TABLES[marker]().strip(), "run: python bench/report.py --write"
