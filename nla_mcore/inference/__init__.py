"""Using a trained NLA with transformers only: `NLAClient` (AV: vector -> explanation),
`NLACritic` (AR: explanation -> vector, with scores) and `nla-mcore explain`."""

from nla_mcore.inference.client import Explanation, NLAClient
from nla_mcore.inference.critic import NLACritic, Scores
from nla_mcore.inference.model_dirs import NLAModelError

__all__ = ["Explanation", "NLAClient", "NLACritic", "NLAModelError", "Scores"]
