"""ANNC in PyTorch: ADMM + fine-tuning keeps the budget exactly, codes on the codebooks."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import opq_torch  # noqa: E402
from opq_core.allocate import Plan  # noqa: E402
from opq_core.codebook import codebook_codes, dequantize_codebook  # noqa: E402
from opq_torch.annc import ANNC, compress_annc  # noqa: E402


def data(seed=0, n=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    w = torch.randn(36, 4, generator=g)
    y = (x.flatten(1) @ w).argmax(1)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=g)


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(6 * 16, 24), torch.nn.ReLU(),
                               torch.nn.Linear(24, 4))


def check_compressed(model, plan, budget):
    """Count the bits from the installed masks; effective weights on the codebooks."""
    masks = opq_torch.masks_of(model)
    eff = opq_torch.compressed_weights(model)
    bits = 0
    for lp in plan.layers:
        m = masks[lp.name]
        bits += lp.bits * int(m.sum())
        w = eff[lp.name]
        assert np.all(w[~m] == 0)
        cb32 = lp.codebook.astype(np.float32)
        assert np.all(np.isin(w[m], cb32))
        assert lp.codebook.size <= 2 ** lp.bits
        # the codes of the effective weights dequantize to the same weights
        codes = codebook_codes(w, m, lp.codebook)
        assert np.all((codes[m] >= 1) & (codes[m] <= lp.codebook.size)) and np.all(codes[~m] == 0)
        assert np.array_equal(dequantize_codebook(codes, lp.codebook, np.float32), w)
    assert bits == plan.size_bits <= budget
    return bits


def test_compress_annc_budget_holds_exactly_after_finetuning():
    loader = data()
    model = net()
    opq_torch.finetune(model, loader, epochs=2, lr=0.05, progress=False)
    res = compress_annc(model, loader, rate=40, epochs_admm=2, epochs_finetune=2,
                        eval_loader=loader, progress=False)
    plan, hist = res
    n = sum(lp.n for lp in plan.layers)
    budget = int(32 * n // 40)
    assert plan.method == "annc" and plan.budget_bits == budget and plan.success
    assert opq_torch.is_compressed(model)
    assert len(hist) == 2 and len(res.admm) == 2 and len(res.records) >= 2
    assert all(r.size_bits <= budget for r in res.records)
    check_compressed(model, plan, budget)
    assert Plan.from_json(plan.to_json()) == plan
    assert opq_torch.plan_of(model) == plan
    # the budget is used nearly fully, unless everything is kept
    assert budget - plan.size_bits < 8 * len(plan.layers) or plan.kept == n
    assert "paper_rate" in repr(res)


def test_save_and_load_opq_file(tmp_path):
    loader = data(5)
    model = net(5)
    path = tmp_path / "m.opq"
    res = compress_annc(model, loader, rate=30, epochs_admm=1, epochs_finetune=1,
                        progress=False, path=path)
    fresh = net(6)
    opq_torch.load(path, fresh)
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert opq_torch.plan_of(fresh).size_bits == res.plan.size_bits <= res.plan.budget_bits
    check_compressed(fresh, res.plan, int(res.plan.budget_bits))


def test_user_loop_step_hook_and_finalize():
    loader = data(1)
    model = net(1)
    annc = ANNC(model, budget_bits=900, project_every=5, rho=1.0, lr=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = {n: p.detach().clone() for n, p in annc.params.items()}
    for x, y in loader:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        annc.step()
    assert annc.steps == len(loader) and len(annc.records) == 1 + len(loader) // 5
    assert any(not torch.equal(before[n], p) for n, p in annc.params.items())
    assert float(annc.penalty().detach()) >= 0
    plan = annc.finalize()
    check_compressed(model, plan, 900)
    # fine-tuning through the finetune helper keeps the budget and the codebooks
    opq_torch.finetune(model, loader, epochs=1, progress=False)
    check_compressed(model, plan, 900)
    with pytest.raises(ValueError, match="already finalized"):
        annc.finalize()
    with pytest.raises(ValueError, match="already compressed"):
        ANNC(model, rate=10)


def test_as_finetune_step_hook():
    loader = data(2)
    model = net(2)
    annc = ANNC(model, rate=30).attach_loader(loader)
    assert annc.project_every == len(loader)
    opq_torch.finetune(model, loader, epochs=2, step_hook=annc, progress=False)
    assert annc.steps == 2 * len(loader) and len(annc.records) == 3
    plan = annc.finalize()
    check_compressed(model, plan, annc.budget_bits)


def test_proximal_step_is_exact_minimizer():
    model = net(3)
    annc = ANNC(model, rate=10, rho=3.0, lr=0.1, project_every=10**6)
    W = {n: p.detach().clone() for n, p in annc.params.items()}
    annc.step()
    c = 0.3
    for n, p in annc.params.items():
        want = (W[n] + c * (annc.V[n] - annc.U[n])) / (1 + c)
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, msg", [
    ({"rate": 1.0}, "rate must be a finite number > 1"),
    ({"rate": -5}, "rate must be a finite number > 1"),
    ({"rate": 1e9}, "smallest feasible budget 3 bits"),
    ({"budget_bits": 2}, "budget_bits=2 is below the smallest feasible budget 3 bits"),
    ({"rate": 10, "rho": 0}, "rho must be"),
    ({"rate": 10, "rho_growth": 0.5}, "rho_growth"),
    ({"rate": 10, "project_every": 0}, "project_every"),
])
def test_bad_budgets_and_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ANNC(net(), **kw)


def test_exclude_and_no_layers():
    model = net()
    annc = ANNC(model, rate=10, exclude=["0"])
    assert list(annc.params) == ["3.weight", "5.weight"]
    with pytest.raises(ValueError, match="exclude names layer 'nope'"):
        ANNC(net(), rate=10, exclude=["nope"])
    with pytest.raises(ValueError, match="no compressible tensor"):
        ANNC(torch.nn.ReLU(), rate=10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_driver():
    loader = data(4)
    model = net(4).cuda()
    res = compress_annc(model, loader, rate=40, epochs_admm=1, epochs_finetune=1, device="cuda",
                        progress=False)
    check_compressed(model, res.plan, int(res.plan.budget_bits))
    # the CUDA fake-quant equals the NumPy kernel bit for bit
    eff = opq_torch.compressed_weights(model)
    masks = opq_torch.masks_of(model)
    from opq_core.codebook import fake_quant_codebook
    for lp in res.plan.layers:
        mod = dict(model.named_modules())[lp.name.rsplit(".", 1)[0]]
        latent = mod.parametrizations.weight.original.detach().cpu().numpy()
        assert np.array_equal(fake_quant_codebook(latent, masks[lp.name], lp.codebook),
                              eff[lp.name])


def _count_V(annc, bits):
    """Bits of the projected copy V, counted from its non-zeros."""
    return sum(int((annc.V[n] != 0).sum()) * bits[n] for n in annc.params)


@pytest.mark.parametrize("freeze", [False, True])
def test_bits_rechosen_between_projections_budget_after_each(freeze):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False),
                                torch.nn.Linear(16, 16, bias=False))
    a, b = model[0].weight, model[1].weight
    two = torch.where(torch.rand(16, 16) < 0.5, -1.0, 1.0)
    spread = torch.randn(16, 16)
    with torch.no_grad():
        a.copy_(two), b.copy_(spread)
    S = 2 * 256 * 3
    annc = ANNC(model, budget_bits=S, project_every=1, lr=1e-9, rho_growth=1.0,
                freeze_bits=freeze)
    first = annc.records[-1].bits
    assert first["0.weight"] < first["1.weight"]
    assert annc.records[-1].size_bits == _count_V(annc, first) <= S
    with torch.no_grad():  # the layers swap roles: layer 0 now needs the bits
        a.copy_(spread), b.copy_(two)
        for u in annc.U.values():
            u.zero_()
    annc.step()
    second = annc.records[-1].bits
    assert annc.records[-1].size_bits == _count_V(annc, second) <= S
    if freeze:
        assert second == first
    else:
        assert second["0.weight"] > second["1.weight"]
    plan = annc.finalize()
    assert {lp.name: lp.bits for lp in plan.layers} == second
    check_compressed(model, plan, S)


def test_rho_growth_is_capped():
    model = net(4)
    annc = ANNC(model, rate=20, rho=2.0, rho_growth=2.0, lr=0.01, project_every=1)
    for _ in range(6):
        annc.step()
    assert annc.rho == pytest.approx(10.0) == annc.rho_max  # default 0.1 / lr
    assert annc.lr * max(r.rho for r in annc.records) <= 0.1 + 1e-12
    with pytest.raises(ValueError, match="rho_max must be a finite number >= rho=2.0"):
        ANNC(net(4), rate=20, rho=2.0, rho_max=1.0)
    with pytest.raises(TypeError, match="freeze_bits must be True or False"):
        ANNC(net(4), rate=20, freeze_bits=1)
