"""``opq demo``: real data, real fine-tuning, a real file; the accuracy and rate targets."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


def test_demo_meets_its_targets(tmp_path, capsys):
    from opq_cli import main
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
    from opq_cli import main
    assert main(["demo", "--epochs", "0", "-o", str(tmp_path / "d.opq")]) == 2
    assert "epochs" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "no" / "d.opq")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder" in err[0]


def check_annc_file(path, budget_bits):
    """Count the bits of a written ANNC file: kept weights on the layer codebooks, pruned
    weights 0, sum bits * kept <= the budget."""
    import numpy as np
    from opq_core.format import read_opq
    f = read_opq(path)
    assert f.plan.method == "annc"
    bits = 0
    for lp in f.plan.layers:
        w, m = f.weights[lp.name], f.masks[lp.name]
        assert np.all(w[~m] == 0)
        assert lp.codebook is not None and lp.codebook.size <= 2 ** lp.bits
        assert np.all(np.isin(w[m], lp.codebook.astype(w.dtype)))
        bits += lp.bits * int(m.sum())
    assert bits == f.plan.size_bits <= budget_bits
    return f


def test_annc_demo_quick_budget_holds_and_reloads(tmp_path, capsys):
    from opq_cli import main
    out = tmp_path / "annc.opq"
    dense = tmp_path / "digits_cnn.pt"
    assert main(["demo", "--method", "annc", "--json", "--quick", "--admm-epochs", "1",
                 "--finetune-epochs", "1", "-o", str(out), "--save-dense", str(dense)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    for key in ("method", "dense_accuracy", "compressed_accuracy", "paper_rate",
                "storage_rate", "seconds"):
        assert key in r
    assert r["method"] == "annc" and r["rate"] == 80
    assert r["paper_rate"] >= r["rate"] * (1 - 1e-9)
    assert r["size_bits"] <= r["budget_bits"] == int(32 * r["compressed_weights"] // 80)
    for key in ("dense_accuracy", "compressed_accuracy", "accuracy_before_finetune",
                "finetuned_accuracy"):
        assert 0.0 <= r[key] <= 1.0
    assert r["reload_exact"]
    assert r["compressed_accuracy"] == r["finetuned_accuracy"]
    assert r["admm_epochs"] == 1 and r["finetune_epochs"] == 1
    assert out.stat().st_size == r["file_bytes"]
    f = check_annc_file(out, r["budget_bits"])
    assert f.storage_rate == pytest.approx(r["storage_rate"])
    assert f.metadata["method"] == "annc"
    assert {lp.name: lp.bits for lp in f.plan.layers} == r["layer_bits"]
    # the dense checkpoint: the training hook rebuilds exactly the demo's dense model
    from opq_torch.demo import digits_task
    from opq_torch.demo.examples import evaluate
    task = digits_task(dense)
    assert set(task) == {"model", "train_loader", "eval_loader"}
    assert evaluate(task["model"], task["eval_loader"]) == r["dense_accuracy"]


def test_demo_method_bad_arguments(tmp_path, capsys):
    from opq_cli import main
    out = str(tmp_path / "d.opq")
    for argv, words in (
            (["--method", "annc", "--sparsity", "0.9"], ("--sparsity", "--rate")),
            (["--method", "annc", "--bits", "4"], ("--bits", "--rate")),
            (["--admm-epochs", "2"], ("--admm-epochs", "annc")),
            (["--method", "annc", "--rate", "1"], ("--rate", "> 1")),
            (["--rate", "50", "--sparsity", "0.5"], ("--sparsity", "--rate")),
            (["--method", "annc", "--save-dense", str(tmp_path / "d.txt")], ("save_dense",)),
            (["--method", "annc", "--save-dense", str(tmp_path / "no" / "d.pt")],
             ("save_dense", "folder")),
            (["--method", "zip"], ("invalid choice",))):
        try:
            rc = main(["demo", "-o", out, *argv])
        except SystemExit as exc:
            rc = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, (argv, err)
        for w in words:
            assert w in err[0], (argv, err)
    assert not (tmp_path / "d.opq").exists()


def test_digits_task_rejects_another_model(tmp_path):
    import numpy as np
    from opq_torch.demo import digits_task
    path = tmp_path / "other.npz"
    np.savez(path, **{"fc.weight": np.zeros((3, 4), np.float32)})
    with pytest.raises(ValueError, match="fc.weight"):
        digits_task(path)
