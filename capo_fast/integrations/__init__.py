"""capo-fast inside other RL trainers. Each submodule imports its trainer library (an optional extra);
this package imports nothing, so `capo_fast` and `capo_fast.kernels` never pull those libraries in.

    from capo_fast.integrations.trl import CapoGRPOTrainer, CapoCreditGRPOTrainer   # pip install 'capo-fast[trl]'
"""
