"""Sweep summaries use the task's headline metric with its direction (perplexity: lower is better)."""

import csv
import json

from lwpipe import sweep


def job(root, n, **final):
    d = root / str(n)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- seed={n}\n")
    (d / "summary.json").write_text(json.dumps({"final": final, "seconds": 1.0}))


def test_perplexity_rows_and_front_prefer_lower(tmp_path, monkeypatch):
    for n, (ratio, ppl) in enumerate([(4.0, 30.0), (4.0, 20.0), (8.0, 25.0), (2.0, 40.0)]):
        job(
            tmp_path,
            n,
            metric="perplexity",
            quality=ppl,
            perplexity=ppl,
            accuracy=0.1,
            compression_ratio=ratio,
            compressed_bytes=100,
            sparsity=0.5,
        )
    fronts = []
    monkeypatch.setattr(sweep, "pareto_front", lambda pts, f=sweep.pareto_front: fronts.append(f(pts)) or fronts[-1])
    rows = sweep.write_summary(tmp_path)
    assert [(r["metric"], r["quality"]) for r in rows] == [
        ("perplexity", 30.0),
        ("perplexity", 20.0),
        ("perplexity", 25.0),
        ("perplexity", 40.0),
    ]
    assert sorted(fronts[0]) == [1, 2]  # (4x, 20) and (8x, 25): job 0 and job 3 are beaten by lower perplexity
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [r["quality"] for r in csv.DictReader(f)] == ["30.0", "20.0", "25.0", "40.0"]
