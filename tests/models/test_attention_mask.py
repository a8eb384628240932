"""The context-parallel chunk layout and masks used by SDPAttention, against brute force."""

from __future__ import annotations

import torch

from nla_mcore.models.attention import causal_window_mask, cp_chunk_positions


def test_cp_positions_match_megatron_batch_split(monkeypatch):
    """Our positions must be exactly the tokens get_batch_on_this_cp_rank gives each rank."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    seq, cp = 24, 3
    ids = torch.arange(seq).unsqueeze(0)
    for rank in range(cp):
        # get_batch_on_this_cp_rank reads only size()/rank() of the group: a stand-in suffices.
        group = type("G", (), {"size": lambda self: cp, "rank": lambda self, r=rank: r})()
        local = get_batch_on_this_cp_rank({"tokens": ids.clone()}, cp_group=group)["tokens"][0]
        assert torch.equal(local, cp_chunk_positions(seq, cp, rank))


def test_cp_positions_cover_sequence_once():
    seq, cp = 32, 4
    allpos = torch.cat([cp_chunk_positions(seq, cp, r) for r in range(cp)])
    assert torch.equal(allpos.sort().values, torch.arange(seq))


def test_causal_window_mask_brute_force():
    q = torch.tensor([3, 4, 10, 11])
    k = torch.arange(12)
    for window in (None, 1, 3, 8):
        mask = causal_window_mask(q, k, window)
        for i, qi in enumerate(q.tolist()):
            for j, kj in enumerate(k.tolist()):
                expected = kj <= qi and (window is None or qi - kj < window)
                assert bool(mask[i, j]) == expected, (qi, kj, window)
