"""Fused kernels and their PyTorch references (`nla_mcore.kernels`).

- `normalized_mse`: per-row normalised MSE (AR loss, RL reward, FVE), one pass forward and backward.
- `vocab_parallel_logprobs`: per-token log-probs (and entropy) over vocab-parallel logits (GRPO).

Triton is optional: it is imported only when a Triton backend runs (see `_triton.py`).

This folder is the package `nla_mcore.kernels`.  When the repository root is on `sys.path`
(`python -m ...` from a clone, pytest) it is also visible as a top-level `kernels`, a name that
belongs to Hugging Face's `kernels` distribution, which transformers >= 5.2x imports; imported
under that name, this file hands the import over to the installed distribution
(`_hand_over_to_installed`) instead of shadowing it.
"""

if __name__ == "kernels":

    def _hand_over_to_installed() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None:
            raise ImportError(
                "no installed module named 'kernels' (the repository's kernels/ folder is "
                "nla_mcore.kernels and is not importable as 'kernels')"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module  # the import statement returns what sys.modules holds
        spec.loader.exec_module(module)

    _hand_over_to_installed()
else:
    from .logprob import vocab_parallel_logprobs
    from .nmse import normalize, normalized_mse, normalized_mse_reference

    __all__ = ["normalize", "normalized_mse", "normalized_mse_reference", "vocab_parallel_logprobs"]
