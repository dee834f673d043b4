"""``opq demo``: real data, real fine-tuning, a real file; the accuracy and rate targets."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_demo_meets_its_targets(tmp_path, capsys):
    from opq_core.cli import main
    out = tmp_path / "demo.opq"
    assert main(["demo", "--json", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    for key in ("dense_accuracy", "compressed_accuracy", "paper_rate", "storage_rate",
                "seconds"):
        assert key in r
    assert r["dense_accuracy"] > 0.95
    assert r["compressed_accuracy"] >= r["dense_accuracy"] - 0.015
    assert r["paper_rate"] >= 50
    assert r["storage_rate"] >= 25
    assert r["reload_exact"]
    assert r["compressed_accuracy"] == r["finetuned_accuracy"]
    assert out.stat().st_size == r["file_bytes"]
    from opq_core.format import read_opq
    f = read_opq(out, decode=False)
    assert f.storage_rate == pytest.approx(r["storage_rate"])
    assert f.metadata["data"] == "digits"


def test_demo_bad_arguments(tmp_path, capsys):
    from opq_core.cli import main
    assert main(["demo", "--epochs", "0", "-o", str(tmp_path / "d.opq")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "no" / "d.opq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder" in err[0]
