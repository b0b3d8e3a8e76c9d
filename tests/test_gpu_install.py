"""`make install-gpu`: requirements-gpu.lock is requirements.lock with torch's CUDA build."""

from conftest import REPO


def pins(name):
    lines = (REPO / name).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_gpu_lock_differs_from_the_cpu_lock_only_in_torchs_build():
    cpu, gpu = pins("requirements.lock"), pins("requirements-gpu.lock")
    assert cpu["torch"] == "2.13.0+cpu" and gpu["torch"].startswith("2.13.0+cu")
    assert {k: v for k, v in gpu.items() if k != "torch"} == {k: v for k, v in cpu.items() if k != "torch"}
    # The Makefile installs from the index of that CUDA build.
    assert f"TORCH_CUDA := {gpu['torch'].split('+')[1]}" in (REPO / "Makefile").read_text()
