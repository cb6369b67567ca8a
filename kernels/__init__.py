"""capo_fast.kernels: fused policy-loss ops for RL on LLMs (needs only torch and triton).

    from capo_fast.kernels import fused_policy_loss, fused_linear_policy_loss, fused_logprobs

Each op is a `torch.library` custom op in the `capo` namespace: C++ on CPU, Triton on CUDA.
`capo_fast.kernels.reference` has the plain PyTorch definition of each.
"""

from capo_fast.kernels.aggregation import AGGREGATIONS, AggregationMode, aggregation_weights
from capo_fast.kernels.linear_policy_loss import (
    apply_linear_policy_loss,
    fused_linear_logprobs,
    fused_linear_policy_loss,
)
from capo_fast.kernels.policy_loss import (
    PolicyLossInputs,
    PolicyLossOptions,
    PolicyLossOutput,
    apply_policy_loss,
    fused_logprobs,
    fused_policy_loss,
)

__all__ = [
    "AGGREGATIONS",
    "AggregationMode",
    "PolicyLossInputs",
    "PolicyLossOptions",
    "PolicyLossOutput",
    "aggregation_weights",
    "apply_linear_policy_loss",
    "apply_policy_loss",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "fused_logprobs",
    "fused_policy_loss",
]
