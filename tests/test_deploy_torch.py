"""Running compressed models: opq_torch.pack (packed modules) and ONNX export (opq_torch.
export_onnx, ``opq export``) checked against the compressed PyTorch model, in onnxruntime."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import opq_core
import opq_torch
from opq_torch.demo.examples import make_model

pytestmark = pytest.mark.filterwarnings("ignore:plan. the global rule prunes every weight")
from opq_torch.packing import PackedConv, PackedLinear, is_packed, packed_nbytes

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class TinyTransformer(nn.Module):
    """A transformer-like block: embedding-free, Linear layers + LayerNorm on (B, T, D)."""

    def __init__(self, d=24, hidden=48, out=5):
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, hidden)
        self.ff2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.ff2(torch.relu(self.ff1(self.ln2(h))))
        return self.head(h.mean(dim=1))


def _cnn(**kw):
    torch.manual_seed(0)
    net = make_model("digits_cnn").eval()
    opq_torch.compress(net, **kw)
    return net


def _transformer(**kw):
    torch.manual_seed(0)
    net = TinyTransformer().eval()
    opq_torch.compress(net, **kw)
    return net


def _ort_run(path, x, float_matmul=False):
    so = ort.SessionOptions()
    if float_matmul:  # DequantizeLinear -> MatMul fused into MatMulNBits: float32 activations
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


# ---------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,shape", [(_cnn, (1, 8, 8)), (_transformer, (6, 12))])
@pytest.mark.parametrize("kw", [dict(sparsity=0.8, bits=4), dict(sparsity=0.5, bits=3,
                                                                  grid="symmetric")])
def test_pack_equals_the_compressed_model(make, shape, kw):
    net = make(**kw)
    packed = opq_torch.pack(net)
    assert is_packed(packed) and not is_packed(net) and opq_torch.is_compressed(net)
    mods = {n: m for n, m in packed.named_modules() if isinstance(m, (PackedLinear, PackedConv))}
    plan = opq_torch.plan_of(net)
    assert sorted(m.name for m in mods.values()) == sorted(plan.names)
    orig = dict(net.named_modules())
    for path, m in mods.items():
        # bit for bit the compressed model's weights
        assert torch.equal(m.weight_dense(), orig[path].weight.detach())
        assert not any(isinstance(b, torch.Tensor) and b.is_floating_point() and
                       b.shape == orig[path].weight.shape for b in m.buffers())
    with torch.no_grad():
        for batch in (1, 3, 40):  # the packed kernel (<= 32 rows) and the decoded weight
            x = torch.randn(batch, *shape)
            assert torch.allclose(packed(x), net(x), rtol=1e-5, atol=1e-5)


def test_pack_memory_is_the_packed_file(tmp_path):
    net = _transformer(sparsity=0.85, bits=4)
    f = opq_torch.save(net, tmp_path / "t.opq", layout="packed")
    held = packed_nbytes(opq_torch.pack(net))
    for rec in f.layers:
        # codes + index as in the file, scales float64 (the file: float16), + checkpoints
        rows = rec.shape[0]
        assert held[rec.name] <= rec.parts["mask"] + rec.parts["codes"] + 16 * rows \
            + 32 * (rows + 1)


def test_pack_inplace_state_dict_and_grad():
    net = _cnn(sparsity=0.8, bits=4)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        want = net(x)
    packed = opq_torch.pack(net, inplace=True)
    assert packed is net and not opq_torch.is_compressed(net)
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-5)
    sd = net.state_dict()
    assert any(k.endswith("code_bytes") for k in sd)
    x.requires_grad_(True)
    net(x).sum().backward()  # autograd goes through the decoded weights
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_pack_errors_are_one_line():
    with pytest.raises(ValueError, match="not compressed"):
        opq_torch.pack(nn.Linear(3, 4))
    net = _cnn(sparsity=0.5, bits=4)
    with pytest.raises(ValueError, match="small_batch must be"):
        opq_torch.pack(net, small_batch=-1)
    with pytest.raises(ValueError, match="index must be"):
        opq_torch.pack(net, index="rle")
    packed = opq_torch.pack(net)
    with pytest.raises(ValueError, match=r"PackedLinear 'fc1.weight': input has 255 features"):
        packed.fc1(torch.randn(1, 255))


def _fresh(make):
    torch.manual_seed(1)  # other weights than the saved model: load_packed must set them all
    return (make_model("digits_cnn") if make is _cnn else TinyTransformer()).eval()


@pytest.mark.parametrize("make,shape", [(_cnn, (1, 8, 8)), (_transformer, (6, 12))])
@pytest.mark.parametrize("layout,index", [("entropy", "auto"), ("packed", "gap"),
                                          ("packed", "bitmask")])
def test_load_packed_equals_pack_of_load(tmp_path, make, shape, layout, index):
    net = make(sparsity=0.85, bits=4)
    f = tmp_path / "m.opq"
    opq_torch.save(net, f, layout=layout)
    loaded = _fresh(make)
    opq_torch.load(f, loaded)
    want = opq_torch.pack(loaded, index=index)
    fresh = _fresh(make)
    got = opq_torch.load_packed(f, fresh, index=index)
    assert got is fresh and is_packed(got) and not opq_torch.is_compressed(got)
    gsd, wsd = got.state_dict(), want.state_dict()
    assert sorted(gsd) == sorted(wsd)
    for k, v in wsd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(gsd[k], v), k
        else:
            assert gsd[k] == v, k
    with torch.no_grad():
        for batch in (1, 40):
            x = torch.randn(batch, *shape)
            assert torch.equal(got(x), want(x))
            assert torch.allclose(got(x), net(x), rtol=1e-5, atol=1e-5)


def test_load_packed_refuses_before_touching_the_model(tmp_path):
    net = _transformer(sparsity=0.8, bits=4)
    f = tmp_path / "m.opq"
    opq_torch.save(net, f)
    with pytest.raises(ValueError, match="already compressed"):
        opq_torch.load_packed(f, net)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        opq_torch.load_packed(f, object())
    with pytest.raises(ValueError, match="index must be"):
        opq_torch.load_packed(f, TinyTransformer(), index="rle")
    other = TinyTransformer(hidden=40)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"m.opq' does not fit this model: tensor 'ff1.bias' has "
                                         r"shape \(48,\) in the file, \(40,\) in the model"):
        opq_torch.load_packed(f, other)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4))
    opq_torch.compress(emb, sparsity=0.5, bits=4)
    g = tmp_path / "e.opq"
    opq_torch.save(emb, g)
    with pytest.raises(ValueError, match=r"load_packed: layer '0.weight' is a Embedding; only "
                                         "Linear"):
        opq_torch.load_packed(g, nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="corrupt|truncated|not an .opq"):
        bad = tmp_path / "bad.opq"
        bad.write_bytes(f.read_bytes()[:100])
        opq_torch.load_packed(bad, TinyTransformer())


# ---------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------

EXPORTS = [
    (dict(sparsity=0.8, bits=4), "small", "bitmask+codes-offset"),
    (dict(sparsity=0.7, bits=4, grid="symmetric"), "small", "bitmask+codes-symmetric"),
    (dict(sparsity=0.5, bits=5, grid="symmetric"), "qdq", "int8-dq"),
    (dict(sparsity=0.3, bits=3, grid="symmetric"), "qdq", "int4-dq"),
    (dict(sparsity=0.6, bits=8, grid="symmetric"), "qdq", "int16-dq"),
    (dict(sparsity=0.0, bits=2), "small", "codes-offset"),
]


@pytest.mark.parametrize("make,shape", [(_cnn, (1, 8, 8)), (_transformer, (6, 12))])
@pytest.mark.parametrize("kw,prefer,encoding", EXPORTS)
def test_onnx_export_equals_the_compressed_model(tmp_path, make, shape, kw, prefer, encoding):
    net = make(**kw)
    path = tmp_path / "m.onnx"
    rep = opq_torch.export_onnx(net, torch.randn(1, *shape), path, prefer=prefer,
                                input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    encodings = {e.encoding for e in rep.layers}
    # (layers pruned beyond ~88 % take the run-byte form of the same grid)
    assert encoding in encodings and encodings <= {encoding, "zeros",
                                                   encoding.replace("bitmask+", "gap+")}
    assert ("zeros" in encodings) == any(lp.kept == 0 for lp in opq_torch.plan_of(net).layers)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    plan = opq_torch.plan_of(net)
    names = {t.name for t in m.graph.initializer}
    assert not names & set(plan.names)  # no dense copy of a compressed weight
    # smaller than the dense model's own ONNX file (the same graph, float initializers)
    from opq_torch.export import onnx_template
    dense = onnx_template(opq_torch.strip(net).eval(), torch.randn(1, *shape),
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert os.path.getsize(path) < len(dense)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        want = net(x).numpy()
    got = _ort_run(path, x, float_matmul=prefer == "qdq")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_onnx_default_export_decodes_bit_exactly(tmp_path, grid):
    """The decode subgraph is float64 with the kernel's operation order."""
    from onnx import helper, TensorProto
    net = _transformer(sparsity=0.8, bits=4, grid=grid)
    path = tmp_path / "m.onnx"
    opq_torch.export_onnx(net, torch.randn(1, 6, 12), path)
    m = onnx.load(str(path))
    m.graph.output.extend([helper.make_tensor_value_info("ff1.weight", TensorProto.FLOAT,
                                                         None)])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(["ff1.weight"], {s.get_inputs()[0].name: np.zeros((1, 6, 12), np.float32)})[0]
    assert np.array_equal(got, opq_torch.compressed_weights(net)["ff1.weight"])


@pytest.mark.parametrize("grid", ["offset", "symmetric"])
def test_onnx_gap_form_of_very_sparse_layers_decodes_bit_exactly(tmp_path, grid):
    """Layers beyond ~88 % sparsity store run bytes instead of a bitmask; every weight
    decoded by onnxruntime equals the compressed model's, and the layer is smaller."""
    from onnx import helper, TensorProto
    from opq_core.export_onnx import run_bytes
    net = _transformer(sparsity=0.97, bits=4, grid=grid)
    path = tmp_path / "m.onnx"
    rep = opq_torch.export_onnx(net, torch.randn(1, 6, 12), path)
    gap = [e.name for e in rep.layers if e.encoding.startswith("gap+")]
    assert gap, [e.encoding for e in rep.layers]
    plan, masks = opq_torch.plan_of(net), opq_torch.masks_of(net)
    for name in gap:
        lp = plan[name]
        n = int(np.prod(lp.shape))
        stored = run_bytes(np.asarray(masks[name])).size
        assert stored <= lp.kept + n // 255  # the bound layer_payload_bytes counts
        assert stored < (n + 7) // 8  # below the bitmask
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    m.graph.output.extend([helper.make_tensor_value_info(nm, TensorProto.FLOAT, None)
                           for nm in plan.names])
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(list(plan.names), {s.get_inputs()[0].name: np.zeros((1, 6, 12), np.float32)})
    want = opq_torch.compressed_weights(net)
    for nm, g in zip(plan.names, got):
        assert np.array_equal(g, np.asarray(want[nm])), nm
    # onnxruntime folds the decoding once at load: no decode node is left to run
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = {nd.op_type for nd in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert not ops & {"ScatterElements", "CumSum", "BitShift", "Gather"}, ops


def test_run_bytes_round_trip_with_long_runs():
    from opq_core.export_onnx import run_bytes
    rng = np.random.default_rng(5)
    for trial in range(30):
        n = int(rng.integers(1, 3000))
        m = rng.random(n) < rng.choice([0.001, 0.01, 0.3])
        if trial % 3 == 0:  # runs of exactly 255, 510 and 254 pruned entries
            m = np.zeros(n + 1100, bool)
            m[[254, 510, 1020, 1021, 1100 + n - 1]] = True
        r = run_bytes(m).astype(np.int64)
        step = np.where(r == 255, 255, r + 1)
        pos = (np.cumsum(step) - 1)[r != 255]  # what the graph computes
        assert np.array_equal(pos, np.flatnonzero(m))
        assert r.size <= m.sum() + m.size // 255


def test_codebook_layers_export(tmp_path):
    from dataclasses import replace
    net = _transformer(sparsity=0.7, bits=3)
    plan, masks = opq_torch.plan_of(net), opq_torch.masks_of(net)
    rng = np.random.default_rng(3)
    layers = []
    for lp in plan.layers:
        cb = np.unique(rng.normal(scale=0.2, size=8).astype(np.float32).astype(np.float64))
        layers.append(replace(lp, grid="codebook", codebook=cb[cb != 0]))
    fresh = TinyTransformer().eval()
    fresh.load_state_dict({k.replace(".parametrizations.weight.original", ".weight"): v
                           for k, v in net.state_dict().items() if "parametrizations" not in k
                           or k.endswith(".original")})
    opq_torch.compress(fresh, replace(plan, layers=tuple(layers), grid="codebook"), masks=masks)
    path = tmp_path / "cb.onnx"
    rep = opq_torch.export_onnx(fresh, torch.randn(1, 6, 12), path, input_names=["x"],
                                dynamic_axes={"x": {0: "batch"}})
    # (layers pruned beyond ~88 % take the run-byte form)
    assert {e.encoding for e in rep.layers} <= {"bitmask+codes-codebook", "gap+codes-codebook"}
    assert "bitmask+codes-codebook" in {e.encoding for e in rep.layers}
    x = torch.randn(3, 6, 12)
    with torch.no_grad():
        want = fresh(x).numpy()
    np.testing.assert_allclose(_ort_run(path, x), want, rtol=1e-5, atol=1e-5)
    # and pack handles codebook layers too
    with torch.no_grad():
        assert torch.allclose(opq_torch.pack(fresh)(x), fresh(x), atol=1e-5)


def test_onnx_refusals_name_the_layer(tmp_path):
    from opq_core.export_onnx import compress_onnx
    from opq_core.format import layer_codes
    from opq_torch.export import onnx_template
    net = _cnn(sparsity=0.8, bits=4)
    with pytest.raises(ValueError, match="not compressed"):
        opq_torch.export_onnx(make_model("digits_cnn"), torch.randn(1, 1, 8, 8),
                              tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="prefer must be"):
        opq_torch.export_onnx(net, torch.randn(1, 1, 8, 8), tmp_path / "x.onnx", prefer="big")
    plan, masks = opq_torch.plan_of(net), opq_torch.masks_of(net)
    w = opq_torch.compressed_weights(net)
    codes = {lp.name: layer_codes(lp, w[lp.name], masks[lp.name]) for lp in plan.layers}
    template = onnx.load_from_string(onnx_template(opq_torch.strip(net), torch.randn(1, 1, 8, 8)))
    renamed = onnx.ModelProto()
    renamed.CopyFrom(template)
    for t in renamed.graph.initializer:
        if t.name == "fc1.weight":
            t.name = "fc1_w"
    with pytest.raises(ValueError) as ei:
        compress_onnx(renamed, plan, codes, masks)
    assert "layer 'fc1.weight' is not an initializer" in str(ei.value)
    assert "\n" not in str(ei.value)
    other = make_model("digits_cnn", num_classes=7).eval()
    t7 = onnx.load_from_string(onnx_template(other, torch.randn(1, 1, 8, 8)))
    with pytest.raises(ValueError, match=r"layer 'fc2.weight' has shape \(10, 64\) in the plan, "
                                         r"\(7, 64\)"):
        compress_onnx(t7, plan, codes, masks)
    with pytest.raises(TypeError, match="must be an onnx.ModelProto"):
        compress_onnx(b"not a model", plan, codes, masks)


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------

def test_cli_export_and_inspect(tmp_path, capsys):
    import json
    from opq_cli.main import main
    from opq_torch.export import onnx_template
    torch.manual_seed(0)
    dense = make_model("digits_cnn").eval()
    (tmp_path / "dense.onnx").write_bytes(onnx_template(dense, torch.randn(1, 1, 8, 8),
                                                        input_names=["x"],
                                                        dynamic_axes={"x": {0: "b"}}))
    net = dense
    opq_torch.compress(net, sparsity=0.8, bits=4)
    with torch.no_grad():  # the .opq's other tensors replace the template's
        net.fc2.bias.add_(0.5)
    opq_torch.save(net, tmp_path / "m.opq")
    out = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m.opq"), "-o", str(out), "--template",
                 str(tmp_path / "dense.onnx"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["onnx_bytes"] == os.path.getsize(out) < summary["template_bytes"]
    assert summary["updated_other"] == 5
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(_ort_run(out, x), want, rtol=1e-5, atol=1e-5)
    # refusals: one line, exit status 2, inputs untouched
    before = (tmp_path / "dense.onnx").read_bytes()
    assert main(["export", str(tmp_path / "m.opq"), "-o", str(tmp_path / "dense.onnx"),
                 "--template", str(tmp_path / "dense.onnx")]) == 2
    assert main(["export", str(tmp_path / "m.opq"), "-o", str(tmp_path / "y.onnx"),
                 "--template", str(tmp_path / "missing.onnx")]) == 2
    assert main(["export", str(tmp_path / "m.opq"), "-o", str(tmp_path / "y.txt"),
                 "--template", str(tmp_path / "dense.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("opq export: error:") for e in err)
    assert (tmp_path / "dense.onnx").read_bytes() == before
    assert not (tmp_path / "y.onnx").exists()
    assert main(["inspect", str(tmp_path / "m.opq"), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "what the exports keep compressed" in text
    assert "bitmask+codes-offset" in text and "4-bit codes + bitmask" in text
    assert main(["inspect", str(tmp_path / "m.opq"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [e["onnx"] for e in d["exports"]] == ["bitmask+codes-offset"] * 5


def test_core_export_of_a_hand_made_graph_with_a_deduplicated_weight(tmp_path):
    """compress_onnx on a graph built by hand: ``b.weight`` is an Identity of ``a.weight``
    (as exporters write two equal initializers); both are compressed layers."""
    from onnx import TensorProto, helper, numpy_helper
    from opq_core.export_onnx import compress_onnx, write_onnx
    from opq_core.format import layer_codes
    rng = np.random.default_rng(0)
    wa = rng.laplace(size=(6, 10)).astype(np.float32)
    wb = rng.laplace(size=(6, 10)).astype(np.float32)
    p = opq_core.plan({"a.weight": wa, "b.weight": wb}, sparsity=0.6, bits=4)
    masks = p.masks({"a.weight": wa, "b.weight": wb})
    codes = {lp.name: layer_codes(lp, {"a.weight": wa, "b.weight": wb}[lp.name],
                                  masks[lp.name]) for lp in p.layers}
    dense = p.apply({"a.weight": wa, "b.weight": wb})
    nodes = [helper.make_node("Identity", ["a.weight"], ["b.weight"]),
             helper.make_node("Gemm", ["x", "a.weight"], ["ya"], transB=1),
             helper.make_node("Gemm", ["x", "b.weight"], ["yb"], transB=1),
             helper.make_node("Add", ["ya", "yb"], ["y"])]
    graph = helper.make_graph(
        nodes, "dedup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        initializer=[numpy_helper.from_array(wa, "a.weight")])
    template = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model, rep = compress_onnx(template, p, codes, masks)
    assert [e.name for e in rep.layers] == ["a.weight", "b.weight"] and rep.opset == 21
    assert not any(list(nd.input) == ["a.weight"] and list(nd.output) == ["b.weight"]
                   for nd in model.graph.node)
    path = tmp_path / "dedup.onnx"
    write_onnx(model, path)
    x = rng.standard_normal((2, 10)).astype(np.float32)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {"x": x})[0]
    want = x @ dense["a.weight"].T + x @ dense["b.weight"].T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_doctests():
    import doctest
    import opq_torch.export as E
    import opq_torch.packing as P
    for mod in (P, E):
        res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert res.attempted > 0 and res.failed == 0, mod.__name__
