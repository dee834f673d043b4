"""Checkpoints from the ecosystem on the command line: folders and shards, bfloat16 kept,
tied names, progress/--quiet, the smaller points (flag names, full table names, natural
plot order)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import opq_core
from opq_cli._common import flag_names
from opq_cli.main import main
from opq_core.io import open_weights, write_safetensors_stream
from opq_core.plot import natural_key


def _laplace(shape, seed):
    return np.random.default_rng(seed).laplace(size=shape).astype(np.float32)


def test_bfloat16_rounding_of_the_stream_writer_is_torchs(tmp_path):
    a = np.concatenate([_laplace((4096,), 0), np.array([np.inf, -np.inf, 0.0, -0.0,
                                                        3.4e38, 1e-40], np.float32)])
    path = tmp_path / "x.safetensors"
    write_safetensors_stream(path, [("a", a.shape, "bfloat16")], lambda n: a)
    from safetensors.torch import load_file
    got = load_file(str(path))["a"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(a).to(torch.bfloat16))
    # and the reader remembers the dtype
    assert open_weights(path).source_dtypes == {"a": "bfloat16"}


def test_a_sharded_folder_is_one_model_and_bad_indexes_are_refused(tmp_path):
    w = {f"l{i}.weight": _laplace((32, 16), i) for i in range(5)}
    w["l0.bias"] = np.zeros(32, np.float32)
    folder = tmp_path / "m"
    folder.mkdir()
    specs = [(k, v.shape, "float32") for k, v in w.items()]
    files = write_safetensors_stream(folder / "model.safetensors", specs, w.__getitem__,
                                     max_shard_bytes=5000)
    assert len(files) > 3 and files[-1].endswith("model.safetensors.index.json")
    lw = open_weights(folder)
    assert sorted(lw) == sorted(w) and all(np.array_equal(lw[k], w[k]) for k in w)
    # one global plan over every shard = the plan of the tensors in memory
    assert opq_core.plan(lw, sparsity=0.7).to_dict()["layers"] == \
        opq_core.plan(w, sparsity=0.7).to_dict()["layers"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    bad = dict(index, weight_map=dict(index["weight_map"], **{"l1.weight": "../x.safetensors"}))
    (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="not a file of the folder"):
        open_weights(folder)
    bad = dict(index, weight_map=dict(index["weight_map"], **{"l1.weight": "gone.safetensors"}))
    (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        open_weights(folder)
    with pytest.raises(ValueError, match="holds none of"):
        open_weights(tmp_path)


def test_tied_pt_names_are_read_once_and_decompress_keeps_dtype_and_tie(tmp_path, capsys):
    emb = torch.nn.Embedding(32, 16).to(torch.bfloat16)
    head = torch.nn.Linear(16, 32, bias=False).to(torch.bfloat16)
    head.weight = emb.weight
    sd = {"emb.weight": emb.weight.data, "head.weight": head.weight.data,
          "pos": torch.arange(8).reshape(1, 8), "fc.weight": torch.randn(8, 16).bfloat16()}
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    lw = open_weights(src)
    assert "head.weight" not in lw and lw.aliases == {"head.weight": "emb.weight"}
    out = tmp_path / "m.opq"
    assert main(["compress", str(src), "-o", str(out), "--sparsity", "0.5", "-q"]) == 0
    assert main(["decompress", str(out), "-o", str(tmp_path / "d.pt"), "-q"]) == 0
    back = torch.load(tmp_path / "d.pt", weights_only=True)
    assert back["emb.weight"].dtype == torch.bfloat16 and back["pos"].dtype == torch.int64
    assert back["head.weight"].data_ptr() == back["emb.weight"].data_ptr()
    assert main(["decompress", str(out), "-o", str(tmp_path / "d.safetensors")]) == 0
    assert "tied name(s) not repeated: head.weight" in capsys.readouterr().out


def test_errors_name_the_command_line_flags(capsys):
    assert main(["plan", "example:alexnet", "--sparsity", "0.5", "--rate", "20"]) == 2
    err = capsys.readouterr().err
    assert "--sparsity" in err and "--rate" in err and "sparsity=" not in err
    assert flag_names("budget_bits must be > 0") == "--budget-bits must be > 0"
    assert flag_names("x paper_rate=3") == "x paper_rate=3"


def test_tables_keep_whole_layer_names():
    names = [f"bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)]
    w = {n: _laplace((16, 16), i) for i, n in enumerate(names)}
    table = opq_core.plan(w, sparsity=0.5).table()
    for n in names:
        assert n in table


def test_plot_order_is_natural():
    names = ["h.10.w", "h.2.w", "h.1.w", "h.0.w", "emb"]
    assert sorted(names, key=natural_key) == ["emb", "h.0.w", "h.1.w", "h.2.w", "h.10.w"]


def test_quiet_silences_progress(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    w = {"a": _laplace((64, 64), 0)}
    path = tmp_path / "w.npz"
    np.savez(path, **w)
    assert main(["plan", str(path), "--sparsity", "0.5", "-q"]) == 0
    assert "read tensors" not in capsys.readouterr().err
    assert main(["plan", str(path), "--sparsity", "0.5"]) == 0
    assert "read tensors" in capsys.readouterr().err
