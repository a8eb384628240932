"""nla-mcore: a Megatron-Core native trainer for Natural Language Autoencoders (AV + AR)."""

import warnings as _warnings

__version__ = "0.1.0"

# Megatron-Core 0.16.1 announces each fallback it takes when Transformer Engine / Apex are
# absent (always true on CPU, and on GPUs without TE), once per module and rank; the fallbacks
# are expected and documented, so keep the console for our own progress output.
for _pattern in (
    r"(Transformer Engine and )?Apex (is|are) not installed",
    r"Transformer Engine and Apex are not installed",
    r"full scope is deprecated",
):
    _warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)
