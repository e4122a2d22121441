"""`lowbit check` (the main job): passes on a correct build and fails loudly on a broken one."""

import subprocess
import sys

import torch

import lowbit.check
from lowbit.backends import cpu


def test_lowbit_check_passes():
    run = subprocess.run([sys.executable, "-m", "lowbit.cli", "check", "--device", "cpu"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cases passed" in run.stdout
    passed, total = run.stdout.split("cpu: ")[-1].split(" cases passed")[0].split(" / ")
    assert passed == total and int(total) > 300


def test_lowbit_check_fails_on_a_wrong_kernel(monkeypatch, capsys):
    """A backend whose matmul is off by one part in a thousand makes `lowbit check` exit non-zero."""
    real = cpu.gather_qmm

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * (1 + 2e-3)

    monkeypatch.setattr(cpu, "gather_qmm", off_by_a_little)
    assert lowbit.check.main(device="cpu") == 1
    assert "cases passed" in capsys.readouterr().out


def test_lowbit_check_fails_on_a_batch_dependent_kernel(monkeypatch):
    """A matmul whose rows depend on M (tiny M-dependent perturbation) is caught by the invariance rows."""
    real = cpu.gather_qmm

    def m_dependent(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        return out + torch.finfo(out.dtype).eps * out * (x.shape[-2] % 2)

    monkeypatch.setattr(cpu, "gather_qmm", m_dependent)
    rows = lowbit.check.run_device("cpu", False, lambda: None)
    invariance = [r for (op, _), r in rows.items() if op == "batch invariance"]
    assert any(r.passed < r.total for r in invariance)
