"""The README's usage snippet runs as written (a user copies it first)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_usage_snippet_runs_as_written(tmp_path):
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage"):]
    snippet = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    res = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "chunked_attention" in res.stdout and "tiled_lm_loss" in res.stdout, res.stdout
    # Sites are the model's attribute paths, never Dynamo's source spellings.
    assert "L[" not in res.stdout and "model.layers.0.self_attn" in res.stdout, res.stdout
    assert (tmp_path / "report.dot").is_file()
