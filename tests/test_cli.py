"""The ``opq`` command line, run as a subprocess on small checkpoints of every format.

Subprocesses run with ``NUMBA_DISABLE_JIT=1`` (the fixtures are tiny; compiling every
kernel in every process would take most of the run) and their decoded weights are checked
bit for bit against the in-process (JIT) plan. The many error cases call ``main`` in this
process; a few go through a subprocess to check the real exit status.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import opq_core
from opq_core.io import load_weights

FORMATS = ["npz", "safetensors", "pt", "onnx"]


def _tensors():
    rng = np.random.default_rng(0)
    return {"conv.weight": (0.2 * rng.laplace(size=(8, 3, 3, 3))).astype(np.float32),
            "conv.bias": rng.normal(size=8).astype(np.float32),
            "fc.weight": rng.laplace(size=(10, 32)).astype(np.float32),
            "fc.bias": rng.normal(size=10).astype(np.float32)}


def _write_onnx(path, t):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(v, k) for k, v in t.items()]
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 2, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph), str(path))


def _write(fmt, folder):
    t = _tensors()
    path = folder / f"model.{fmt}"
    if fmt == "npz":
        np.savez(path, **t)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file(t, str(path))
    elif fmt == "pt":
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in t.items()}, str(path))
    else:
        _write_onnx(path, t)
    return path, t


def opq(*args, cwd=None, jit=False):
    env = dict(os.environ)
    if not jit:
        env["NUMBA_DISABLE_JIT"] = "1"
    return subprocess.run([sys.executable, "-m", "opq_cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def _ok(r):
    assert r.returncode == 0, r.stderr
    return r


def _one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "error" in lines[0]
    return lines[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_subcommand_on_every_format(tmp_path, fmt):
    src, t = _write(fmt, tmp_path)
    plan_json = json.loads(_ok(opq("plan", src, "--sparsity", "0.8", "--bits", "3",
                                   "--json")).stdout)
    assert sorted(layer["name"] for layer in plan_json["layers"]) == ["conv.weight", "fc.weight"]
    out = tmp_path / "m.opq"
    comp = json.loads(_ok(opq("compress", src, "-o", out, "--sparsity", "0.8", "--bits", "3",
                              "--json")).stdout)
    assert comp["file_bytes"] == out.stat().st_size
    assert sorted(comp["other_tensors"]) == ["conv.bias", "fc.bias"]
    dense = tmp_path / f"dense.{fmt}"
    extra = ["--template", src] if fmt == "onnx" else []
    _ok(opq("decompress", out, "-o", dense, *extra))
    got = load_weights(dense)
    p = opq_core.plan(t, sparsity=0.8, bits=3)
    ref = p.apply(t)
    assert set(got) == set(t)
    for k in t:
        assert np.array_equal(np.asarray(got[k]), ref[k]), k
    if fmt == "npz":
        info = json.loads(_ok(opq("inspect", out, "--json", "--verify")).stdout)
        assert info["verified"] and info["storage_rate"] == comp["storage_rate"]
        assert info["paper_rate"] == pytest.approx(32 * info["n"] / (3 * info["kept"]))
        assert info["plan"]["layers"][0]["name"] == "conv.weight"


def main_(argv, capsys):
    """The CLI in this process (cheap): (exit status, stdout, stderr)."""
    from opq_cli import main
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("layout", ["entropy", "packed"])
def test_compress_inspect_in_process(tmp_path, capsys, layout):
    src, t = _write("safetensors", tmp_path)
    out = tmp_path / "m.opq"
    rc, text, _ = main_(["compress", src, "-o", out, "--sparsity", "0.6", "--layout", layout],
                        capsys)
    assert rc == 0 and "paper" in text and "storage" in text
    rc, text, _ = main_(["inspect", out], capsys)
    assert rc == 0 and f"layout={layout}" in text and "fc.weight" in text
    from opq_core.format import read_opq
    f = read_opq(out)
    assert f.layout == layout
    ref = opq_core.plan(t, sparsity=0.6, bits=4).apply(t)
    for k in ("conv.weight", "fc.weight"):
        assert np.array_equal(f.weights[k], ref[k])
    for k in ("conv.bias", "fc.bias"):
        assert np.array_equal(f.other[k], t[k])


def test_core_commands_do_not_import_torch(tmp_path):
    src, _ = _write("npz", tmp_path)
    out = tmp_path / "m.opq"
    code = ("import sys, io, contextlib; from opq_cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    a = main(['compress', {str(src)!r}, '-o', {str(out)!r}, '--sparsity', '0.5'])\n"
            f"    b = main(['inspect', {str(out)!r}])\n"
            f"    c = main(['decompress', {str(out)!r}, '-o', {str(tmp_path / 'd.npz')!r}])\n"
            "print(a, b, c, 'torch' in sys.modules)")
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.split() == ["0", "0", "0", "False"], r.stderr


def test_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    src, _ = _write("npz", tmp_path)
    out = tmp_path / "m.opq"
    assert main_(["plan", src, "--sparsity", "0.5", "--plot", tmp_path / "plan.png"], capsys)[0] == 0
    assert main_(["compress", src, "-o", out, "--sparsity", "0.5", "--plot",
                  tmp_path / "c.png"], capsys)[0] == 0
    assert main_(["inspect", out, "--plot", tmp_path / "i.png"], capsys)[0] == 0
    for name in ("plan.png", "c.png", "i.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_exits_nonzero_with_one_line_subprocess(tmp_path):
    src, _ = _write("npz", tmp_path)
    assert "no such file" in _one_line_error(opq("compress", tmp_path / "nope.npz", "-o",
                                                 tmp_path / "m.opq", "--sparsity", "0.5"))
    assert "unrecognized" in _one_line_error(opq("plan", src, "--bogus"))
    bad = tmp_path / "bad.opq"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert "opq inspect: error" in _one_line_error(opq("inspect", bad))


def _err(argv, capsys):
    rc, _, err = main_(argv, capsys)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    return lines[0]


def test_bad_input_one_line_errors(tmp_path, capsys):
    src, _ = _write("npz", tmp_path)
    out = tmp_path / "m.opq"
    assert main_(["compress", src, "-o", out, "--sparsity", "0.5"], capsys)[0] == 0
    before = out.read_bytes()
    assert "sparsity" in _err(["compress", src, "-o", out], capsys)
    assert "sparsity" in _err(["compress", src, "-o", out, "--sparsity", "1.5"], capsys)
    assert "--bits" in _err(["compress", src, "-o", out, "--sparsity", "0.5", "--bits", "x"],
                            capsys)
    assert "bits" in _err(["compress", src, "-o", out, "--sparsity", "0.5", "--bits", "9"],
                          capsys)
    assert ".opq" in _err(["compress", src, "-o", tmp_path / "m.npz", "--sparsity", "0.5"],
                          capsys)
    assert "--layout" in _err(["compress", src, "-o", out, "--sparsity", "0.5", "--layout",
                               "zip"], capsys)
    assert "required" in _err(["compress", src, "--sparsity", "0.5"], capsys)
    assert "invalid choice" in _err(["explode"], capsys)
    assert "folder" in _err(["compress", src, "-o", tmp_path / "no" / "m.opq", "--sparsity",
                             "0.5"], capsys)
    assert out.read_bytes() == before
    bad = tmp_path / "bad.opq"
    data = bytearray(before)
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    assert "checksum" in _err(["inspect", bad], capsys)
    assert "truncated" in _err(["inspect", _cut(out, tmp_path)], capsys)
    assert "not a .opq" in _err(["inspect", src], capsys)
    assert "extension" in _err(["decompress", out, "-o", tmp_path / "d.xyz"], capsys)
    assert "--template" in _err(["decompress", out, "-o", tmp_path / "d.onnx"], capsys)
    assert "unknown example" in _err(["plan", "example:vgg", "--sparsity", "0.5"], capsys)


def _cut(path, folder):
    q = folder / "cut.opq"
    q.write_bytes(path.read_bytes()[:-7])
    return q


def test_help_is_readable(capsys):
    r = _ok(opq("--help"))
    for word in ("plan", "compress", "inspect", "decompress", "demo", "paper_rate",
                 "storage_rate", "Examples"):
        assert word in r.stdout
    for cmd in ("plan", "compress", "inspect", "decompress", "demo"):
        rc, text, _ = main_([cmd, "--help"], capsys)
        assert rc == 0 and "usage: opq " + cmd in text


# ---------------------------------------------------------------------------
# --method annc: training-time compression through a training-data hook
# ---------------------------------------------------------------------------

HOOK = "opq_torch.demo:digits_task"


def _digits_checkpoint(folder):
    """An untrained digits CNN state_dict (the wiring and the budget are under test)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from opq_torch.demo.examples import make_model
    path = folder / "digits_cnn.pt"
    torch.save(make_model("digits_cnn", seed=3).state_dict(), str(path))
    return path


def test_compress_annc_with_training_hook(tmp_path, capsys):
    ckpt = _digits_checkpoint(tmp_path)
    import torch
    threads = torch.get_num_threads()
    out = tmp_path / "annc.opq"
    rc, text, err = main_(["compress", ckpt, "-o", out, "--method", "annc", "--rate", "50",
                           "--train", HOOK, "--epochs-admm", "1", "--epochs-finetune", "1",
                           "--threads", "1", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(text)
    from opq_core.format import read_opq
    f = read_opq(out)
    assert d == json.loads(json.dumps(f.to_dict()))
    assert d["file_bytes"] == out.stat().st_size
    assert d["paper_rate"] >= 50 * (1 - 1e-9)
    budget = 32 * f.n // 50
    assert f.plan.method == "annc" and f.plan.budget_bits == budget
    bits = 0
    for lp in f.plan.layers:
        w, m = f.weights[lp.name], f.masks[lp.name]
        assert np.all(w[~m] == 0) and np.all(np.isin(w[m], lp.codebook.astype(w.dtype)))
        bits += lp.bits * int(m.sum())
    assert bits == f.plan.size_bits <= budget
    assert f.metadata["method"] == "annc" and f.metadata["source"] == "digits_cnn.pt"
    assert sorted(f.other) == ["conv1.bias", "conv2.bias", "conv3.bias", "fc1.bias", "fc2.bias"]
    # the file loads into a fresh model; the text mode prints the same accounting table
    import torch
    assert torch.get_num_threads() == threads
    import opq_torch
    from opq_torch.demo.examples import make_model
    fresh = make_model("digits_cnn", seed=9)
    opq_torch.load(out, fresh)
    assert opq_torch.plan_of(fresh) == f.plan
    x = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(fresh(x)).all()
    out2 = tmp_path / "annc2.opq"
    rc, text, err = main_(["compress", ckpt, "-o", out2, "--method", "annc", "--budget-bits",
                           "9000", "--train", HOOK, "--epochs-admm", "0", "--epochs-finetune",
                           "1", "--layout", "packed", "--threads", "1"], capsys)
    assert rc == 0, err
    f2 = read_opq(out2, decode=False)
    assert f2.layout == "packed" and f2.plan.size_bits <= 9000
    assert f2.table().splitlines()[0] in text and "eval accuracy" in text and "wrote" in text


def test_compress_annc_bad_arguments_one_line(tmp_path, capsys):
    src, _ = _write("npz", tmp_path)
    out = tmp_path / "m.opq"
    base = ["compress", src, "-o", out, "--method", "annc"]
    cases = [
        (["--rate", "50"], ("needs training data", "--train MODULE:FUNCTION", HOOK)),
        (["--rate", "50", "--sparsity", "0.9", "--train", HOOK], ("--sparsity", "--rate")),
        (["--rate", "50", "--bits", "4", "--train", HOOK], ("--bits", "--rate")),
        (["--train", HOOK], ("--rate", "--budget-bits")),
        (["--rate", "50", "--budget-bits", "100", "--train", HOOK], ("not both",)),
        (["--rate", "50", "--train", "opq_torch.demo"], ("MODULE:FUNCTION",)),
        (["--rate", "50", "--train", "no_such_module_xyz:f"], ("cannot import",)),
        (["--rate", "50", "--train", "opq_torch.demo:no_such_fn"], ("has no",)),
        (["--rate", "50", "--train", "json:dumps"], ("must return a dict",)),
        (["--rate", "50", "--train", HOOK, "--epochs-admm", "-1"], ("--epochs-admm",)),
        (["--rate", "50", "--train", HOOK, "--lr", "0"], ("--lr",)),
        (["--rate", "50", "--train", HOOK, "--threads", "0"], ("--threads",)),
    ]
    for extra, words in cases:
        line = _err(base + extra, capsys)
        for w in words:
            assert w in line, (extra, line)
    assert not out.exists()
    # the hook's own error (a checkpoint of another model) is one line too
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    assert "not a digits_cnn" in _err(base + ["--rate", "50", "--train", HOOK], capsys)
    # ANNC-only options with another method, and 'opq plan --method annc'
    assert "only for --method annc" in _err(["compress", src, "-o", out, "--sparsity", "0.5",
                                             "--train", HOOK], capsys)
    assert "opq compress" in _err(["plan", src, "--method", "annc", "--rate", "20"], capsys)
    assert not out.exists()


def test_help_shows_annc_usage(capsys):
    from opq_cli import build_parser
    text = build_parser().format_help()
    assert "--method annc" in text and HOOK in text and "--save-dense" in text
    rc, text, _ = main_(["compress", "--help"], capsys)
    assert rc == 0 and "--train MODULE:FUNCTION" in text and "--epochs-admm" in text
    rc, text, _ = main_(["demo", "--help"], capsys)
    assert rc == 0 and "annc" in text and "--save-dense" in text
