"""The console shows the run: libraries quiet by default, everything with logging.verbosity=all."""

import logging
import os
import warnings

from capo_fast.train import quiet_libraries


def test_run_verbosity_quiets_libraries_but_not_the_run(monkeypatch, caplog):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
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
