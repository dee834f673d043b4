"""``opq demo``: the whole path on real data in about a minute.

Train a small CNN on scikit-learn's 8x8 digits (fixed seed, held-out stratified test
split), compress it, fine-tune the latent weights with the straight-through estimator,
write ``demo.opq``, reload it into a freshly built model and evaluate that one.

Two compression methods, compared on the same footing (same model, data, file format):

* ``"opq"`` (default): plan OPQ from the trained weights alone (default sparsity 0.9,
  4 bits, i.e. a paper rate of 80), then fine-tune.
* ``"annc"``: :func:`opq_torch.annc.compress_annc` learns weights, per-layer sparsity and
  per-layer bit-widths together by ADMM under a size budget (default paper rate 80), fixes
  masks and codebooks, then fine-tunes; the budget holds exactly.

Rates shown (see the README):

.. math::

    \\text{paper\\_rate} = \\frac{32 N}{\\sum_i B_i\\,\\mathrm{nnz}_i},\\qquad
    \\text{storage\\_rate} = \\frac{4 N}{\\text{bytes of the compressed layers in the file}}

over the compressed (conv / linear) weights; biases stay float32 and are reported apart
(``file_bytes`` counts everything).

:func:`digits_task` is the training-data hook of ``opq compress --method annc --train``:
it rebuilds the demo's model from a checkpoint and hands back the digits loaders.
"""
from __future__ import annotations

import os
import time

import torch

from . import examples
from ..compress import compress
from ..finetune import finetune
from ..io import load, save

__all__ = ["run_demo", "digits_task", "METHODS"]

MODEL = "digits_cnn"
#: compression methods of the demo
METHODS = ("opq", "annc")
#: default paper rate of the ANNC demo: that of OPQ's default sparsity 0.9 at 4 bits
ANNC_RATE = 80.0
#: learning rate of both ANNC stages (SGD with momentum 0.9, no weight decay: the
#: defaults of :func:`opq_torch.annc.compress_annc`)
ANNC_LR = 0.01


def _check_epochs(arg, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")


def _save_dense(model, path):
    from opq_core.io import save_weights
    save_weights(path, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def run_demo(*, method: str = "opq", epochs: int | None = None,
             finetune_epochs: int | None = None, admm_epochs: int | None = None,
             sparsity: float | None = None, bits: int | None = None,
             rate: float | None = None, layout: str = "entropy", output: str = "demo.opq",
             save_dense: str | None = None, quick: bool = False, seed: int = 0,
             progress: bool = False, verbose: bool = True) -> dict:
    """Run the demo; return its summary (also printed when ``verbose``).

    Parameters
    ----------
    method : "opq" or "annc".
    epochs : dense training epochs (default 15, ``quick``: 10).
    finetune_epochs : fine-tuning epochs (default 10, ``quick``: 6 for OPQ, 3 for ANNC).
    admm_epochs : ANNC only: ADMM epochs before masks and codebooks are fixed (default 5,
        ``quick``: 2).
    sparsity, bits : OPQ only: global sparsity (default 0.9) and bits per kept weight
        (default 4).
    rate : target paper rate. ANNC: default 80. OPQ: a size budget instead of
        ``sparsity`` (bits then chosen per layer among 1..8 unless ``bits`` is given).
    layout : ``.opq`` layout, "entropy" or "packed".
    output : the ``.opq`` file to write.
    save_dense : also write the dense trained weights (a state_dict) to this file
        (``.pt``, ``.safetensors`` or ``.npz``), e.g. to try ``opq compress`` on it.
    quick : a shorter run (tests).
    seed : data split, initialization and shuffling.

    Returns
    -------
    dict
        ``method``, ``dense_accuracy``, ``compressed_accuracy`` (of the model reloaded from
        the file), ``paper_rate``, ``storage_rate``, ``seconds`` (total wall time) and the
        details: accuracy before fine-tuning, per-stage seconds, file and dense sizes,
        whether the reloaded model's outputs equal the fine-tuned model's exactly; for
        ANNC also ``rate``, ``budget_bits``, ``size_bits`` and the bits of every layer.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for arg, v in (("epochs", epochs), ("finetune_epochs", finetune_epochs),
                   ("admm_epochs", admm_epochs)):
        _check_epochs(arg, v)
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or not float(rate) > 1.0):
        raise ValueError(f"rate must be a number > 1, got {rate!r}")
    if method == "annc":
        for arg, v in (("sparsity", sparsity), ("bits", bits)):
            if v is not None:
                raise ValueError(f"{arg}: ANNC chooses every layer's sparsity and bits under a "
                                 f"size budget; give rate instead of {arg}={v!r}")
        rate = ANNC_RATE if rate is None else float(rate)
    else:
        if admm_epochs is not None:
            raise ValueError(f"admm_epochs: only for method='annc', got {admm_epochs!r}")
        if rate is not None and sparsity is not None:
            raise ValueError(f"sparsity: give sparsity or rate, not both (sparsity={sparsity!r}, "
                             f"rate={rate!r})")
        if rate is None:
            sparsity = 0.9 if sparsity is None else sparsity
            bits = 4 if bits is None else bits
    spec = examples.MODELS[MODEL]
    epochs = epochs or (10 if quick else spec.epochs)
    if method == "annc":
        admm_epochs = admm_epochs or (2 if quick else 5)
        finetune_epochs = finetune_epochs or (3 if quick else 10)
    else:
        finetune_epochs = finetune_epochs or (6 if quick else 10)
    for arg, path in (("output", output), ("save_dense", save_dense)):
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{arg}: folder {folder!r} does not exist")
    if save_dense is not None:
        ext = os.path.splitext(str(save_dense))[1].lower()
        if ext not in (".pt", ".pth", ".safetensors", ".npz"):
            raise ValueError(f"save_dense: expected a .pt, .safetensors or .npz file name, got "
                             f"{save_dense!r}")

    t_start = time.perf_counter()
    times = {}
    extra = {}
    with examples.limit_threads(1):
        t = time.perf_counter()
        data = examples.load_digits(seed=seed)
        train, test = examples.loaders(data, batch_size=spec.batch_size, seed=seed)
        model = examples.make_model(MODEL, seed=seed)
        examples.train_dense(model, train, test_loader=None, epochs=epochs, lr=spec.lr,
                             seed=seed, progress=progress)
        dense_acc = examples.evaluate(model, test)
        times["dense_train"] = time.perf_counter() - t
        if save_dense is not None:
            _save_dense(model, save_dense)

        t = time.perf_counter()
        if method == "annc":
            from ..annc import compress_annc
            # ADMM, then the final projection fixes masks, codebooks and bits; the
            # fine-tuning stage below is the one compress_annc would run (same optimizer)
            with examples.deterministic(seed):
                res = compress_annc(model, train, rate=rate, epochs_admm=admm_epochs,
                                    epochs_finetune=0, lr=ANNC_LR, progress=progress)
            plan = res.plan
            extra = {"rate": rate, "budget_bits": int(plan.budget_bits),
                     "size_bits": plan.size_bits, "admm_epochs": admm_epochs,
                     "layer_bits": {lp.name: lp.bits for lp in plan.layers},
                     "projections": len(res.records)}
        else:
            kw = {"sparsity": sparsity} if rate is None else {"rate": rate}
            plan = compress(model, bits=bits, **kw)
        # a guard: torch's thread count must stay 1 whatever the compression step's
        # parallel kernels did (opq_core._jit picks a Numba threading layer that leaves
        # it alone)
        torch.set_num_threads(1)
        before_acc = examples.evaluate(model, test)
        times["compress"] = time.perf_counter() - t

        t = time.perf_counter()
        with examples.deterministic(seed):
            if method == "annc":
                finetune(model, train, epochs=finetune_epochs, lr=ANNC_LR, momentum=0.9,
                         weight_decay=0.0, progress=progress)
            else:
                finetune(model, train, epochs=finetune_epochs, progress=progress)
        tuned_acc = examples.evaluate(model, test)
        times["finetune"] = time.perf_counter() - t

        t = time.perf_counter()
        f = save(model, output, layout=layout,
                 metadata={"model": MODEL, "data": "digits", "method": method})
        times["save"] = time.perf_counter() - t

        t = time.perf_counter()
        fresh = examples.make_model(MODEL, seed=seed + 1)
        load(output, fresh)
        torch.set_num_threads(1)
        compressed_acc = examples.evaluate(fresh, test)
        times["load"] = time.perf_counter() - t

        model.eval()
        fresh.eval()
        with torch.no_grad():
            x = data.x_test
            exact = bool(torch.equal(model(x), fresh(x)))

    layer_bits = sorted({lp.bits for lp in plan.layers})
    res = {
        "method": method,
        "dense_accuracy": dense_acc,
        "compressed_accuracy": compressed_acc,
        "paper_rate": plan.paper_rate,
        "storage_rate": f.storage_rate,
        "seconds": time.perf_counter() - t_start,
        "accuracy_before_finetune": before_acc,
        "finetuned_accuracy": tuned_acc,
        "reload_exact": exact,
        "sparsity": plan.sparsity,
        "bits": layer_bits[0] if len(layer_bits) == 1 else layer_bits,
        "layout": layout,
        "compressed_weights": plan.n,
        "compressed_bytes": f.compressed_bytes,
        "file_bytes": f.file_bytes,
        "dense_float32_bytes": 4 * plan.n + f.other_bytes,
        "file_rate": (4 * plan.n + f.other_bytes) / f.file_bytes,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        **extra,
        "stage_seconds": {k: round(v, 3) for k, v in times.items()},
        "output": output,
        "dense_checkpoint": save_dense,
    }
    if verbose:
        print(_summary(res))
    return res


def _summary(r: dict) -> str:
    st = r["stage_seconds"]
    bits = r["bits"]
    bits = f"{bits} bits" if isinstance(bits, int) else f"{min(bits)}-{max(bits)} bits per layer"
    if r["method"] == "annc":
        head = (f"opq demo: digits CNN ({r['compressed_weights']} conv/linear weights), ANNC "
                f"at rate {r['rate']:g} (budget {r['budget_bits']} bits), {r['layout']} layout")
        after = (f"  after ANNC, fixed masks {100 * r['accuracy_before_finetune']:6.2f} %   "
                 f"({r['admm_epochs']} ADMM epochs, {st['compress']:.1f} s; sparsity "
                 f"{r['sparsity']:.3f}, {bits})")
    else:
        head = (f"opq demo: digits CNN ({r['compressed_weights']} conv/linear weights), "
                f"sparsity {r['sparsity']:.3f}, {bits}, {r['layout']} layout")
        after = (f"  after OPQ, no training  {100 * r['accuracy_before_finetune']:6.2f} %   "
                 f"(plan {st['compress']:.2f} s)")
    lines = [
        head,
        f"  dense accuracy          {100 * r['dense_accuracy']:6.2f} %   "
        f"({r['epochs']} epochs, {st['dense_train']:.1f} s)",
        after,
        f"  compressed accuracy     {100 * r['compressed_accuracy']:6.2f} %   "
        f"({r['finetune_epochs']} fine-tuning epochs, {st['finetune']:.1f} s; reloaded from "
        f"{r['output']}, outputs {'identical' if r['reload_exact'] else 'DIFFERENT'})",
        f"  paper_rate   {r['paper_rate']:7.2f}x   (32 N / sum bits*nnz)",
        f"  storage_rate {r['storage_rate']:7.2f}x   ({4 * r['compressed_weights']} float32 "
        f"bytes -> {r['compressed_bytes']} bytes in the file)",
        f"  file {r['file_bytes']} bytes with the float32 biases "
        f"({r['file_rate']:.1f}x smaller than float32); save {st['save']:.2f} s, "
        f"load {st['load']:.2f} s, total {r['seconds']:.1f} s",
    ]
    if r.get("dense_checkpoint"):
        lines.append(f"  dense weights saved to {r['dense_checkpoint']} (try: opq compress "
                     f"{r['dense_checkpoint']} -o x.opq --method annc --rate 50 --train "
                     f"opq_torch.demo:digits_task)")
    return "\n".join(lines)


def digits_task(checkpoint) -> dict:
    """Training-data hook for ``opq compress --method annc --train opq_torch.demo:digits_task``.

    Builds the demo's digits CNN, loads the state_dict ``checkpoint`` into it (``.pt`` /
    ``.pth``, ``.safetensors`` or ``.npz``, read by :func:`opq_core.io.load_weights`) and
    returns the digits data of the demo (split and shuffling seeded with 0).

    Returns
    -------
    dict
        ``model`` (the CNN with the checkpoint's weights), ``train_loader``,
        ``eval_loader`` (the held-out test split).

    Raises
    ------
    ValueError
        The checkpoint does not fit the model (a missing, unexpected or differently shaped
        tensor is named).
    """
    from opq_core.io import load_weights
    weights = load_weights(checkpoint)
    model = examples.make_model(MODEL, seed=0)
    sd = model.state_dict()
    where = f"checkpoint: {str(checkpoint)!r} is not a {MODEL} state_dict"
    for k, v in weights.items():
        if k not in sd:
            raise ValueError(f"{where}: unexpected tensor {k!r} (shape {tuple(v.shape)})")
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the model "
                             f"expects {tuple(sd[k].shape)}")
    missing = [k for k in sd if k not in weights]
    if missing:
        raise ValueError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    model.load_state_dict({k: torch.from_numpy(weights[k].copy()).to(sd[k].dtype) for k in sd})
    spec = examples.MODELS[MODEL]
    data = examples.load_digits(seed=0)
    train, test = examples.loaders(data, batch_size=spec.batch_size, seed=0)
    return {"model": model, "train_loader": train, "eval_loader": test}
