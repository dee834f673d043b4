"""A budget in bytes of the written .opq file (plan(size_bytes=), opq --size,
opq_torch.compress(size_bytes=))."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import opq_core
from opq_core.format import opq_file_bytes, read_opq, write_opq

from strategies import examples
from test_cli import main_ as _cli


def _model(seed, scale_spread=1.0):
    rng = np.random.default_rng(seed)
    w = {"conv.weight": rng.laplace(size=(16, 3, 3, 3)).astype(np.float32),
         "conv.bias": rng.normal(size=16).astype(np.float32),
         "fc1.weight": (0.1 * rng.laplace(size=(64, 144))).astype(np.float32),
         "fc2.weight": (scale_spread * rng.laplace(size=(10, 64))).astype(np.float32),
         "fc2.bias": rng.normal(size=10).astype(np.float32)}
    return w


def _write(tmp_path, p, w, layout="entropy", name="m.opq"):
    path = os.path.join(str(tmp_path), name)
    other = {k: w[k] for k in w if k not in p}
    f = write_opq(path, p, w, other=other, layout=layout)
    assert os.path.getsize(path) == f.file_bytes
    return f


def _smallest(w, layout="entropy", **kw):
    """The smallest file: the plan at its smallest feasible budget in bits."""
    q = opq_core.plan(w, budget_bits=1e12, **kw)
    q = opq_core.plan(w, budget_bits=q.min_budget_bits, **kw)
    return opq_file_bytes(q, w, other={k: w[k] for k in w if k not in q}, layout=layout)


def test_opq_file_bytes_is_the_written_size(tmp_path):
    w = _model(0)
    p = opq_core.plan(w, sparsity=0.8, bits=3)
    for layout in ("entropy", "packed"):
        other = {k: w[k] for k in w if k not in p}
        got = opq_file_bytes(p, w, other=other, layout=layout, metadata={"a": "b"})
        path = tmp_path / f"{layout}.opq"
        f = write_opq(path, p, w, other=other, layout=layout, metadata={"a": "b"})
        assert got == f.file_bytes == os.path.getsize(path)


@examples(4)
@given(seed=st.integers(0, 2 ** 16), frac=st.floats(0.0, 1.0),
       layout=st.sampled_from(["entropy", "packed"]))
def test_size_bytes_never_exceeded(tmp_path_factory, seed, frac, layout):
    w = _model(seed)
    lo = _smallest(w, layout)
    hi = opq_file_bytes(opq_core.plan(w, budget_bits=8 * 12000), w,
                        other={"conv.bias": w["conv.bias"], "fc2.bias": w["fc2.bias"]},
                        layout=layout)
    budget = int(lo + 400 + frac * (hi - lo - 400))  # the size plan's header is a bit longer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = opq_core.plan(w, size_bytes=budget, layout=layout)
    f = _write(tmp_path_factory.mktemp("s"), p, w, layout)
    assert f.file_bytes == p.predicted_bytes <= budget == p.budget_bytes
    if budget >= 4000:  # feasible and not tiny: within 2 %
        assert f.file_bytes >= 0.98 * budget, (f.file_bytes, budget, lo, hi)
    back = read_opq(f.path)
    assert back.plan.budget_bytes is None and back.plan.predicted_bytes is None


def test_size_bytes_whole_model_fits(tmp_path):
    w = _model(1)
    p = opq_core.plan(w, size_bytes=10 ** 7, bits=4)
    assert p.status == 1 and "fits" in p.message
    q = opq_core.plan(w, budget_bits=4 * p.n, bits=4)  # the largest plan in bits
    assert p.kept == q.kept and all(lp.bits == 4 for lp in p)
    assert _write(tmp_path, p, w).file_bytes == p.predicted_bytes <= 10 ** 7


def test_size_bytes_infeasible_names_the_minimum():
    import re
    w = _model(2)
    lo = _smallest(w)
    with pytest.raises(ValueError, match=r"^size_bytes: 100 bytes is below the smallest "
                                         r".opq file of these weights, \d+ bytes") as exc:
        opq_core.plan(w, size_bytes=100)
    smallest = int(re.search(r"weights, (\d+) bytes", str(exc.value)).group(1))
    assert lo <= smallest < lo + 400
    # the file does not hold the planning times: the smallest file is the same on every call
    p = opq_core.plan(w, size_bytes=smallest)
    assert p.predicted_bytes == smallest
    with pytest.raises(ValueError, match=rf"below the smallest .* {smallest} bytes"):
        opq_core.plan(w, size_bytes=smallest - 1)


@pytest.mark.parametrize("kw, match", [
    (dict(size_bytes=0), "size_bytes must be a whole number of bytes >= 1"),
    (dict(size_bytes=1.5), "size_bytes must be a whole number"),
    (dict(size_bytes="1MB"), "size_bytes must be a number of bytes"),
    (dict(size_bytes=10 ** 5, rate=10), "give size_bytes= or rate=, not both"),
    (dict(sparsity=0.5, layout="packed"), "layout= describes the file of a budget in bytes"),
])
def test_size_bytes_bad_arguments(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        opq_core.plan(_model(3), **kw)


def test_size_bytes_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    import opq_torch
    from opq_torch.io import save
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = opq_torch.compress(net, size_bytes=3000, bits=None)
    f = save(net, tmp_path / "n.opq")
    assert f.file_bytes == p.predicted_bytes <= 3000
    assert "1.running_mean" in p.skipped


# ---------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------

def test_parse_size_units():
    from opq_cli._common import CliError, parse_size
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("1.5 MiB") == 1_572_864
    assert parse_size("800kB") == parse_size("800KB") == 800_000
    assert parse_size("2GiB") == 2 * 1024 ** 3 and parse_size("1GB") == 10 ** 9
    assert parse_size("300") == parse_size("300B") == 300
    for bad, match in (("1.5XB", "unknown unit 'XB'"), ("abc", "expected a size such as"),
                       ("-3MB", "expected a size such as"), ("0.2B", "at least 1 byte"),
                       ("", "expected a size such as")):
        with pytest.raises(CliError, match=f"^--size: .*{match}"):
            parse_size(bad)


def test_cli_size_round_trip(tmp_path, capsys):
    src = tmp_path / "m.npz"
    np.savez(src, **_model(4))
    out = tmp_path / "m.opq"
    rc, text, err = _cli(["compress", src, "-o", out, "--size", "6kB", "-q", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(text)
    assert d["size"]["written_bytes"] == d["size"]["predicted_bytes"] == os.path.getsize(out)
    assert 0.98 * 6000 <= os.path.getsize(out) <= 6000 == d["size"]["budget_bytes"]
    rc, text, err = _cli(["compress", src, "-o", tmp_path / "p.opq", "--size", "6KiB",
                          "--layout", "packed", "-q"], capsys)
    assert rc == 0, err
    assert "bytes predicted" in text and os.path.getsize(tmp_path / "p.opq") <= 6144
    rc, text, err = _cli(["plan", src, "--size", "6kB", "-q", "--json"], capsys)
    assert rc == 0 and json.loads(text)["budget_bytes"] == 6000
    # the plan counts the metadata 'opq compress' writes: the same size, to the byte
    assert json.loads(text)["predicted_bytes"] == d["size"]["predicted_bytes"]


@pytest.mark.parametrize("size, match", [("12XB", "unknown unit"), ("10B", "below the smallest")])
def test_cli_size_errors(tmp_path, capsys, size, match):
    src = tmp_path / "m.npz"
    np.savez(src, **_model(5))
    rc, _, err = _cli(["compress", src, "-o", tmp_path / "m.opq", "--size", size, "-q"], capsys)
    assert rc == 2 and "--size" in err and match in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.opq").exists()
