"""The console shows the run: libraries quiet by default, everything with logging.verbosity=all."""

import logging
import os
import warnings

from capo_fast.console import quiet_libraries


def test_run_verbosity_quiets_libraries_but_not_the_run(monkeypatch, caplog):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("VLLM_LOGGING_CONFIG_PATH", raising=False)  # restored after the test
    with warnings.catch_warnings():
        quiet_libraries("run")
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR"  # read by vLLM when it is imported, later
        assert logging.getLogger("deepspeed").getEffectiveLevel() == logging.ERROR
        with caplog.at_level(logging.INFO, logger="capo_fast"):
            logging.getLogger("capo_fast").warning("25% of critiques failed")
        assert "25% of critiques failed" in caplog.text
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    for name in ("vllm", "deepspeed", "DeepSpeed", "datasets", "httpx", "torch.distributed", "capo_fast"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # leave no trace for the other tests
    quiet_libraries("all")
    logging.getLogger("capo_fast").setLevel(logging.NOTSET)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO"
    assert logging.getLogger("deepspeed").level == logging.NOTSET  # left to the root logger


def test_a_layer_whose_weights_did_not_load_still_shows(tmp_path):
    """vLLM's reload warning for rotary embeddings (at every sync, harmless) is hidden; for any other layer
    it is shown, also after vLLM reconfigures its logging as every engine start does
    (vllm/entrypoints/llm.py:339, configure_logging_if_needed with the engine's LoggingConfig)."""
    import subprocess
    import sys

    script = (
        "from capo_fast.console import quiet_libraries, RELOAD_LOGGER\n"
        "quiet_libraries('run')\n"
        "from vllm.engine.arg_utils import EngineArgs\n"
        "from vllm.logger import configure_logging_if_needed, init_logger\n"
        "configure_logging_if_needed(EngineArgs(model='m').create_logging_config())\n"
        "import vllm.model_executor.model_loader.reload.layerwise as layerwise\n"
        "assert layerwise.logger.name == RELOAD_LOGGER\n"
        "layerwise.logger.warning('%s: Failed to load weights', 'RotaryEmbedding')\n"
        "layerwise.logger.warning('%s: Failed to load weights', 'Llama3RotaryEmbedding')\n"
        "layerwise.logger.warning('%s: Failed to load weights', 'QKVParallelLinear')\n"
        "init_logger('vllm.engine').warning('a routine vLLM warning')\n"
        "init_logger('vllm.engine').error('a vLLM error')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_LOGGING")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shown = result.stdout + result.stderr
    assert shown.count("QKVParallelLinear: Failed to load weights") == 1 and "a vLLM error" in shown
    assert "RotaryEmbedding" not in shown and "a routine vLLM warning" not in shown
