"""``opq demo``: the whole path on real data in about a minute.

Train a small CNN on scikit-learn's 8x8 digits (fixed seed, held-out stratified test
split), plan OPQ from the trained weights alone (default sparsity 0.9, 4 bits), fine-tune
the latent weights with the straight-through estimator, write ``demo.opq``, reload it into
a freshly built model and evaluate that one.

Rates shown (see the README):

.. math::

    \\text{paper\\_rate} = \\frac{32 N}{\\sum_i B_i\\,\\mathrm{nnz}_i},\\qquad
    \\text{storage\\_rate} = \\frac{4 N}{\\text{bytes of the compressed layers in the file}}

over the compressed (conv / linear) weights; biases stay float32 and are reported apart
(``file_bytes`` counts everything).
"""
from __future__ import annotations

import os
import time

import torch

from . import examples
from .compress import compress
from .finetune import finetune
from .io import load, save

__all__ = ["run_demo"]

MODEL = "digits_cnn"


def run_demo(*, epochs: int | None = None, finetune_epochs: int | None = None,
             sparsity: float = 0.9, bits: int = 4, layout: str = "entropy",
             output: str = "demo.opq", quick: bool = False, seed: int = 0,
             progress: bool = False, verbose: bool = True) -> dict:
    """Run the demo; return its summary (also printed when ``verbose``).

    Parameters
    ----------
    epochs : dense training epochs (default 15, ``quick``: 10).
    finetune_epochs : fine-tuning epochs (default 10, ``quick``: 6).
    sparsity, bits : the OPQ plan (global sparsity, bits per kept weight).
    layout : ``.opq`` layout, "entropy" or "packed".
    output : the ``.opq`` file to write.
    quick : a shorter run (tests).
    seed : data split, initialization and shuffling.

    Returns
    -------
    dict
        ``dense_accuracy``, ``compressed_accuracy`` (of the model reloaded from the file),
        ``paper_rate``, ``storage_rate``, ``seconds`` (total wall time) and the details:
        accuracy before fine-tuning, per-stage seconds, file and dense sizes, whether the
        reloaded model's outputs equal the fine-tuned model's exactly.
    """
    for arg, v in (("epochs", epochs), ("finetune_epochs", finetune_epochs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be an integer >= 1, got {v!r}")
    spec = examples.MODELS[MODEL]
    epochs = epochs or (10 if quick else spec.epochs)
    finetune_epochs = finetune_epochs or (6 if quick else 10)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise ValueError(f"output: folder {out_dir!r} does not exist")

    t_start = time.perf_counter()
    times = {}
    with examples.limit_threads(1):
        t = time.perf_counter()
        data = examples.load_digits(seed=seed)
        train, test = examples.loaders(data, batch_size=spec.batch_size, seed=seed)
        model = examples.make_model(MODEL, seed=seed)
        examples.train_dense(model, train, test_loader=None, epochs=epochs, lr=spec.lr,
                             seed=seed, progress=progress)
        dense_acc = examples.evaluate(model, test)
        times["dense_train"] = time.perf_counter() - t

        t = time.perf_counter()
        plan = compress(model, sparsity=sparsity, bits=bits)
        # Numba's OpenMP pool, started by the planner's parallel kernels, can reset the
        # OpenMP thread count torch shares with it: pin it again
        torch.set_num_threads(1)
        before_acc = examples.evaluate(model, test)
        times["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        with examples.deterministic(seed):
            finetune(model, train, epochs=finetune_epochs, progress=progress)
        tuned_acc = examples.evaluate(model, test)
        times["finetune"] = time.perf_counter() - t

        t = time.perf_counter()
        f = save(model, output, layout=layout, metadata={"model": MODEL, "data": "digits"})
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

    res = {
        "dense_accuracy": dense_acc,
        "compressed_accuracy": compressed_acc,
        "paper_rate": plan.paper_rate,
        "storage_rate": f.storage_rate,
        "seconds": time.perf_counter() - t_start,
        "accuracy_before_finetune": before_acc,
        "finetuned_accuracy": tuned_acc,
        "reload_exact": exact,
        "sparsity": plan.sparsity,
        "bits": bits,
        "layout": layout,
        "compressed_weights": plan.n,
        "compressed_bytes": f.compressed_bytes,
        "file_bytes": f.file_bytes,
        "dense_float32_bytes": 4 * plan.n + f.other_bytes,
        "file_rate": (4 * plan.n + f.other_bytes) / f.file_bytes,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "stage_seconds": {k: round(v, 3) for k, v in times.items()},
        "output": output,
    }
    if verbose:
        print(_summary(res))
    return res


def _summary(r: dict) -> str:
    st = r["stage_seconds"]
    return "\n".join([
        f"opq demo: digits CNN ({r['compressed_weights']} conv/linear weights), "
        f"sparsity {r['sparsity']:.3f}, {r['bits']} bits, {r['layout']} layout",
        f"  dense accuracy          {100 * r['dense_accuracy']:6.2f} %   "
        f"({r['epochs']} epochs, {st['dense_train']:.1f} s)",
        f"  after OPQ, no training  {100 * r['accuracy_before_finetune']:6.2f} %   "
        f"(plan {st['plan']:.2f} s)",
        f"  compressed accuracy     {100 * r['compressed_accuracy']:6.2f} %   "
        f"({r['finetune_epochs']} fine-tuning epochs, {st['finetune']:.1f} s; reloaded from "
        f"{r['output']}, outputs {'identical' if r['reload_exact'] else 'DIFFERENT'})",
        f"  paper_rate   {r['paper_rate']:7.2f}x   (32 N / sum bits*nnz)",
        f"  storage_rate {r['storage_rate']:7.2f}x   ({4 * r['compressed_weights']} float32 "
        f"bytes -> {r['compressed_bytes']} bytes in the file)",
        f"  file {r['file_bytes']} bytes with the float32 biases "
        f"({r['file_rate']:.1f}x smaller than float32); save {st['save']:.2f} s, "
        f"load {st['load']:.2f} s, total {r['seconds']:.1f} s",
    ])
