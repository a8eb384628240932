"""Fused kernels and their PyTorch references (`nla_mcore.kernels`).

- `normalized_mse`: per-row normalised MSE (AR loss, RL reward, FVE), one pass forward and backward.
- `vocab_parallel_logprobs`: per-token log-probs (and entropy) over vocab-parallel logits (GRPO).

Triton is optional: it is imported only when a Triton backend runs (see `_triton.py`).

This folder is the package `nla_mcore.kernels`.  When the repository root is on `sys.path`
(`python -m ...` from a clone, pytest) it is also visible as a top-level `kernels`, a name that
belongs to Hugging Face's `kernels` distribution, which transformers >= 5.2x imports.  Imported
under that name while that distribution is installed, this file hands the import over to it
(`_installed_kernels`) instead of shadowing it; without it, the import goes on as before (and
transformers, finding no `kernels` distribution metadata, treats it as absent).
"""


def _installed_kernels():
    """The import spec of an installed top-level `kernels` outside this repository, or None."""
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    return importlib.machinery.PathFinder.find_spec("kernels", path)


if __name__ == "kernels" and (_spec := _installed_kernels()) is not None:
    import importlib.util as _util
    import sys as _sys

    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_module)
else:
    from .logprob import vocab_parallel_logprobs
    from .nmse import normalize, normalized_mse, normalized_mse_reference

    __all__ = ["normalize", "normalized_mse", "normalized_mse_reference", "vocab_parallel_logprobs"]
