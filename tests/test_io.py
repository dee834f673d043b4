"""Weight readers / writers of every format, and opq_torch.save / load."""
from __future__ import annotations

import numpy as np
import pytest

from opq_core.io import load_weights, open_weights, save_weights


def _tensors():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "a.bias": rng.normal(size=4).astype(np.float32),
            "b.weight": rng.normal(size=(5, 8)).astype(np.float64),
            "steps": np.array([3], dtype=np.int64)}


@pytest.mark.parametrize("ext", [".npz", ".safetensors", ".pt"])
def test_write_read_round_trip(tmp_path, ext):
    if ext == ".pt":
        pytest.importorskip("torch")
    t = _tensors()
    path = tmp_path / f"w{ext}"
    save_weights(path, t)
    got = load_weights(path)
    assert set(got) == set(t)
    for k, v in t.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v)
    with open_weights(path) as lazy:
        assert len(lazy) == len(t) and np.array_equal(lazy["a.weight"], t["a.weight"])


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="path.*'.h5'"):
        open_weights(tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_weights(tmp_path / "w.npz")


def test_truncated_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        open_weights(path)


# ---------------------------------------------------------------------------------------
# opq_torch.save / load
# ---------------------------------------------------------------------------------------

def _net(seed):
    import torch
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("layout", ["entropy", "packed"])
def test_torch_save_load_same_outputs(tmp_path, layout):
    torch = pytest.importorskip("torch")
    import opq_torch
    net = _net(0)
    net(torch.randn(16, 2, 6, 6))          # batch-norm statistics move
    plan = opq_torch.compress(net, sparsity=0.8, bits=3)
    with torch.no_grad():                  # the latent weights move (fine-tuning)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.eval()
    path = tmp_path / "net.opq"
    f = opq_torch.save(net, path, layout=layout)
    assert f.layout == layout and f.paper_rate == pytest.approx(plan.paper_rate)
    fresh = _net(1)
    cf = opq_torch.load(path, fresh)
    fresh.eval()
    x = torch.randn(7, 2, 6, 6)
    assert torch.equal(net(x), fresh(x))
    assert opq_torch.plan_of(fresh) == cf.plan == opq_torch.plan_of(net)
    a, b = opq_torch.masks_of(net), opq_torch.masks_of(fresh)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    cw = opq_torch.compressed_weights(net)
    assert all(np.array_equal(cw[k], cf.weights[k]) for k in cw)
    assert "1.running_mean" in cf.other


def test_torch_load_other_model_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    import opq_torch
    net = _net(0)
    opq_torch.compress(net, sparsity=0.5, bits=4)
    path = tmp_path / "net.opq"
    opq_torch.save(net, path)
    before = path.read_bytes()
    other = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 12))
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'4\.(weight|bias)' has shape \(10.*in the file, \(12"):
        opq_torch.load(path, other)
    assert not opq_torch.is_compressed(other)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    smaller = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3))
    with pytest.raises(ValueError, match="no such entry|not in the file"):
        opq_torch.load(path, smaller)
    with pytest.raises(ValueError, match="not compressed"):
        opq_torch.save(_net(0), tmp_path / "dense.opq")
    with pytest.raises(ValueError, match="already compressed"):
        opq_torch.load(path, net)
    assert path.read_bytes() == before
    assert not (tmp_path / "dense.opq").exists()


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_tensor_info_reads_metadata_not_data(tmp_path, ext, monkeypatch):
    from opq_core import io as opq_io
    t = {"a.weight": np.ones((3, 4, 2), np.float16), "a.steps": np.arange(5, dtype=np.int64)}
    path = tmp_path / f"w.{ext}"
    save_weights(path, t)
    with open_weights(path) as w:
        monkeypatch.setattr(w, "_loader", lambda name: pytest.fail(f"read {name}"))
        for name, a in t.items():
            assert w.tensor_info(name) == (a.shape, a.dtype)
            assert opq_io.tensor_info(w, name) == (a.shape, a.dtype)
    assert opq_io.tensor_info({"x": [1.0, 2.0]}, "x") == ((2,), np.dtype(np.float64))
