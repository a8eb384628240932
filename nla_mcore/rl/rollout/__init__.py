"""Rollout engines behind one interface (`interface.RolloutEngine`): the native engine on the
trainer's own Megatron-Core weights (`native.NativeEngine`)."""

from nla_mcore.rl.rollout.interface import (
    FINISH_LENGTH,
    FINISH_STOP,
    Rollout,
    RolloutEngine,
    SamplingParams,
)
from nla_mcore.rl.rollout.native import NativeEngine

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "NativeEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
]
