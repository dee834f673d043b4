"""Package-level guarantees: the core never loads torch; the console entry point works."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return r.stdout.strip()


def test_import_opq_core_does_not_load_torch():
    out = _run("import sys, opq_core, opq_core.kernels, opq_core.allocate, opq_core.io, "
               "opq_cli; print('torch' in sys.modules)")
    assert out == "False"


def test_opq_plan_on_npz_does_not_load_torch(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "w.npz"
    np.savez(path, **{"a.weight": rng.laplace(size=(16, 8, 3, 3)).astype(np.float32),
                      "b.weight": rng.laplace(size=(10, 64)).astype(np.float32)})
    code = ("import sys, io, contextlib; from opq_cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    rc = main(['plan', {str(path)!r}, '--sparsity', '0.8', '--json'])\n"
            "import json; d = json.loads(buf.getvalue())\n"
            "print(rc, 'torch' in sys.modules, round(d['totals']['sparsity'], 6))")
    rc, torch_loaded, sparsity = _run(code).split()
    assert (rc, torch_loaded) == ("0", "False")
    assert float(sparsity) == round(round(0.8 * (16 * 72 + 640)) / (16 * 72 + 640), 6)


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "opq_cli", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert "plan" in r.stdout
