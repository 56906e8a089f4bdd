"""The documentation stays true: generated tables match their data, every results record is
complete, the README's snippet runs, and the README stays short with its set-up commands on top."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
REQUIRED = ("title", "command", "date", "machine", "conditions", "notes", "provenance",
            "columns", "rows")
INSTALL = ('pip install torch==2.13.0 && pip install -e ".[test]" && '
           "python scripts/train_nerf.py --config configs/demo.txt")
TESTS = "python -m pytest -q tests"


def _make_results():
    spec = importlib.util.spec_from_file_location("make_results", DOCS / "make_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records():
    return sorted(RESULTS.glob("*.json"))


def test_results_md_is_generated_from_the_json():
    expected = _make_results().render()
    actual = (DOCS / "results.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/results.md is stale: run python docs/make_results.py"


def test_there_are_results_records():
    assert len(_records()) >= 10


@pytest.mark.parametrize("path", _records(), ids=lambda p: p.stem)
def test_results_record_is_complete(path):
    rec = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED if k not in rec]
    assert not missing, f"{path.name} lacks {missing}"
    assert isinstance(rec["title"], str) and rec["title"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", rec["date"]), rec["date"]
    assert isinstance(rec["machine"], str) and rec["machine"]
    assert isinstance(rec["provenance"], str) and rec["provenance"]
    commands = rec["command"] if isinstance(rec["command"], list) else [rec["command"]]
    if rec["command"] is None:
        assert rec.get("command_note"), f"{path.name}: a missing command needs command_note"
    else:
        assert all(isinstance(c, str) and c for c in commands)
    tables = [rec] + list(rec.get("tables", []))
    for t in tables:
        assert t["columns"] and t["rows"]
        for row in t["rows"]:
            assert len(row) == len(t["columns"]), f"{path.name}: row {row}"


def test_readme_links_into_results_exist():
    text = README.read_text(encoding="utf-8")
    anchors = re.findall(r"docs/results\.md#([A-Za-z0-9_]+)", text)
    assert anchors
    stems = {p.stem for p in _records()}
    assert set(anchors) <= stems, set(anchors) - stems


def test_readme_snippet_runs(capsys):
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one ```python block"
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme_snippet"})
    assert "PSNR" in capsys.readouterr().out


def test_readme_is_short_with_the_commands_on_top():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 260, f"README.md has {len(lines)} lines"
    head = lines[:30]
    assert any(line.strip() == INSTALL for line in head)
    assert any(line.strip() == TESTS for line in head)
