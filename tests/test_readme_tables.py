"""The READMEs' result tables are the result files' text (benchmarks/readme_tables.py)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import readme_tables  # noqa: E402


def test_readmes_hold_the_current_result_tables():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "readme_tables.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"{proc.stdout} (run `python benchmarks/readme_tables.py`)"


def test_include_blocks_are_replaced_by_the_file(tmp_path, monkeypatch):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    monkeypatch.setattr(readme_tables, "ROOT", str(tmp_path))
    text = "before\n<!-- include: t.md -->\nstale\n<!-- end include -->\nafter\n"
    assert (
        readme_tables.render(text)
        == "before\n<!-- include: t.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nafter\n"
    )
