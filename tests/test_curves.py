"""curves.py: which numbers go into which line, and a picture drawn from a real-shaped metrics file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from curves import draw_curves, load_metrics, series


def test_series_collects_each_metric_by_step_and_skips_missing(tmp_path):
    rows = [
        {"step": 0, "eval/em": 0.4, "eval/em/default-2hop": 0.3},
        {"step": 1, "losses/policy": 0.1, "charts/reward/default-1hop": 1.0, "charts/reward/default-2hop": 0.0, "charts/entropy/turn1": 0.02},
        {"step": 2, "losses/policy": 0.2, "charts/reward/default-1hop": 0.5, "charts/entropy/turn1": 0.04, "charts/entropy/turn2": 0.1},
        {"step": 2, "eval/em": 0.5, "eval/em/default-2hop": 0.35},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_metrics(path) == rows  # the blank line is skipped
    assert series(rows, "charts/reward/") == {"charts/reward/default-1hop": ([1, 2], [1.0, 0.5]), "charts/reward/default-2hop": ([1], [0.0])}
    assert series(rows, "eval/em") == {"eval/em": ([0, 2], [0.4, 0.5]), "eval/em/default-2hop": ([0, 2], [0.3, 0.35])}
    assert series(rows, "charts/entropy/turn") == {"charts/entropy/turn1": ([1, 2], [0.02, 0.04]), "charts/entropy/turn2": ([2], [0.1])}
    draw_curves(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_torn_last_line_is_left_out_and_a_torn_middle_line_is_an_error(tmp_path):
    import pytest

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "losses/policy": 0.5}\n{"step": 2, "los')  # killed while writing step 2
    assert load_metrics(path) == [{"step": 1, "losses/policy": 0.5}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "losses/policy": 0.5}\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_metrics(path)


@pytest.mark.parametrize("content, message", [(None, "no such file"), ("", "no metrics rows to draw"),
                                              ('{"step": 1, "char', "no metrics rows to draw"),
                                              ('{"step": 1}\n[1,\n{"step": 2}\n', "line 2 is not JSON"),
                                              ('{"step": 1}\n[1, 2]\n', "line 2 is not a metrics row"),
                                              ('{"step": "one"}\n', "line 1 is not a metrics row"),
                                              ('{"charts/reward": 1.0}\n', "line 1 is not a metrics row")])
def test_the_tool_refuses_a_missing_empty_or_torn_file_with_one_line(tmp_path, content, message):
    metrics = tmp_path / "metrics.jsonl"
    if content is not None:
        metrics.write_text(content)
    proc = subprocess.run([sys.executable, "curves.py", str(metrics), "--out", str(tmp_path / "c.png")],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    [line] = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and line.startswith(f"error: {metrics}: {message}")
    assert not (tmp_path / "c.png").exists()
