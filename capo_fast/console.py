"""What the console shows: the run's own lines, and of the libraries' only what matters."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

# vLLM replaces its loggers' handlers whenever an engine starts (vllm/logger.py
# _configure_vllm_root_logger, a dictConfig that resets every child of "vllm"), so a handler added
# here would not survive: vLLM is given this file as its whole logging config instead
# (VLLM_LOGGING_CONFIG_PATH), errors only, plus the reload warnings below.
VLLM_LOGGING_CONFIG = Path(__file__).parent / "vllm_logging.json"
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class BenignReloadWarnings(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights", which its layerwise reload logs at every
    weight sync because the cos/sin cache is no checkpoint weight (vllm/model_executor/model_loader/
    reload/layerwise.py:266). For any other layer the line means the sync did not deliver a weight."""

    def filter(self, record: logging.LogRecord) -> bool:  # RotaryEmbedding, Llama3RotaryEmbedding, MRotary...
        return not re.match(r"\w*RotaryEmbedding: ", record.getMessage())


def quiet_libraries(verbosity: str) -> None:
    """`run`: the run's own lines at INFO, libraries' logs at ERROR and their Python warnings off, except
    warnings that matter (a layer whose weights did not load). `all`: everything at INFO, as the
    libraries print it. vLLM reads its settings from the environment when an engine starts, later."""
    logging.basicConfig(level=logging.INFO if verbosity == "all" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("capo_fast").setLevel(logging.INFO)
    if verbosity == "all":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") != "0":  # vLLM refuses a config file with logging off
        os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", str(VLLM_LOGGING_CONFIG))
    for name in ("vllm", "deepspeed", "DeepSpeed", "datasets", "httpx", "torch.distributed", "math_verify"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(vllm|deepspeed|torch|transformers|triton)\b")
