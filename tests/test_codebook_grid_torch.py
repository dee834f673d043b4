"""grid="codebook" plans through the PyTorch adapter and the ONNX export, bit for bit."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import opq_core  # noqa: E402
import opq_torch  # noqa: E402
from opq_torch.ste import CodebookSTE, fake_quant_codebook_torch  # noqa: E402


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))


def weights(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def effective(m, names):
    return {n: getattr(m.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]).detach().numpy()
            for n in names}


def test_torch_ops_equal_the_kernel_with_scales():
    rng = np.random.default_rng(0)
    w = torch.from_numpy((rng.laplace(size=(7, 33)) * 2).astype(np.float32))
    m = torch.from_numpy(rng.random((7, 33)) < 0.6)
    cb = torch.tensor([-1.5, -0.5, -0.125, 0.25, 0.75, 2.0], dtype=torch.float64)
    s = torch.tensor(rng.uniform(0.1, 3, 7).astype(np.float16).astype(np.float64))
    from opq_core.codebook import fake_quant_codebook
    want = fake_quant_codebook(w.numpy(), m.numpy(), cb.numpy(), scale=s.numpy())
    assert np.array_equal(fake_quant_codebook_torch(w, m, cb, s).numpy(), want)
    wl = w.clone().requires_grad_(True)
    y = CodebookSTE.apply(wl, m, cb, s)
    assert np.array_equal(y.detach().numpy(), want)
    g = torch.randn_like(w)
    y.backward(g)
    assert torch.equal(wl.grad, torch.where(m, g, torch.zeros(())))


@pytest.mark.parametrize("grid", ["codebook", "auto"])
def test_compress_strip_save_load_are_bit_exact(tmp_path, grid):
    model = net()
    w = weights(model)
    p = opq_core.plan(w, sparsity=0.6, bits=3, grid=grid)
    dense = p.apply(w)
    opq_torch.compress(model, p)
    got = effective(model, p.names)
    for n in p.names:
        assert np.array_equal(got[n], dense[n])
    x = torch.randn(4, 24)
    y = model(x)
    opq_torch.save(model, tmp_path / "m.opq")
    fresh = net()
    opq_torch.load(tmp_path / "m.opq", fresh)
    assert torch.equal(fresh(x), y)
    st = opq_torch.strip(model)
    for n in p.names:
        assert np.array_equal(effective(st, [n])[n], dense[n])


def test_onnx_decodes_the_scaled_codebook_bit_exactly(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    from opq_core.export_onnx import compress_onnx, write_onnx
    from opq_core.format import layer_codes
    rng = np.random.default_rng(1)
    w = {"fc": (rng.standard_t(3, size=(12, 40)) * rng.uniform(0.2, 3, (12, 1))).astype(np.float32)}
    p = opq_core.plan(w, sparsity=0.5, bits=3, grid="codebook")
    masks = p.masks(w)
    codes = {"fc": layer_codes(p["fc"], w["fc"], masks["fc"])}
    graph = helper.make_graph(
        [helper.make_node("Identity", ["fc"], ["w"])], "cb", [],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [12, 40])],
        initializer=[numpy_helper.from_array(w["fc"], "fc")])
    template = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model, rep = compress_onnx(template, p, codes, masks)
    assert [e.encoding for e in rep.layers] == ["bitmask+codes-codebook"]
    write_onnx(onnx_model, tmp_path / "cb.onnx")
    s = ort.InferenceSession(str(tmp_path / "cb.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(s.run(None, {})[0], p.apply(w)["fc"])


def test_pack_decodes_the_scaled_codebook():
    from opq_core._packed import pack_layer, packed_matmul
    from opq_core.format import layer_codes
    rng = np.random.default_rng(2)
    w = {"fc": (rng.laplace(size=(10, 30)) * rng.uniform(0.2, 3, (10, 1))).astype(np.float32)}
    p = opq_core.plan(w, sparsity=0.5, bits=4, grid="codebook")
    m = p.masks(w)["fc"]
    pl = pack_layer(p["fc"], layer_codes(p["fc"], w["fc"], m), m)
    dense = p.apply(w)["fc"]
    assert np.array_equal(pl.decode(), dense)
    x = rng.normal(size=(3, 30)).astype(np.float32)
    import reference as ref
    oracle = ref.packed_matmul(x, pl.codes(), p["fc"].kernel_scale, None, 0.0, 4, "codebook",
                               p["fc"].codebook)
    for blocks in (1, 3, 10):
        pb = pack_layer(p["fc"], layer_codes(p["fc"], w["fc"], m), m, blocks=blocks)
        for parallel in (False, True):
            assert np.array_equal(packed_matmul(pb, x, parallel=parallel), oracle)
