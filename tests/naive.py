"""Deliberately straightforward second implementations, used as test oracles and as the benchmark's baseline.

Written from docs/method.md directly, row by row and turn by turn in Python, sharing no code with the project.
"""

import torch


def turns_of(mask_row: list[int]) -> list[list[int]]:
    """Positions of each maximal run of 1s in one row's mask."""
    turns, current = [], None
    for t, m in enumerate(mask_row):
        if m:
            if current is None:
                current = []
                turns.append(current)
            current.append(t)
        else:
            current = None
    return turns


def loop_token_losses(log_prob, old_log_prob, advantages, response_mask, clip_low=3e-3, clip_high=4e-3, max_log_ratio=10.0):
    """The ATPO per-token loss with a Python loop over rows and turns (docs/method.md §3): a list per row of its model tokens'
    losses (an empty list for a row without model tokens)."""
    rows = []
    for i, mask_row in enumerate(response_mask.tolist()):
        token_losses = []
        for turn in turns_of(mask_row):
            idx = torch.tensor(turn)
            lp, old, adv = log_prob[i, idx], old_log_prob[i, idx], advantages[i, idx]
            turn_log_ratio = (lp - old).mean()
            log_s = torch.clamp(turn_log_ratio.detach() + lp - lp.detach(), max=max_log_ratio)
            s = torch.exp(log_s)
            token_losses.append(torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - clip_low, 1 + clip_high)))
        rows.append(torch.cat(token_losses) if token_losses else [])
    return rows


def loop_policy_loss(log_prob, old_log_prob, advantages, response_mask, **clip):
    """The ATPO loss (docs/method.md §3): the mean of each row's token losses, then the mean over non-empty rows."""
    row_losses = [row.mean() for row in loop_token_losses(log_prob, old_log_prob, advantages, response_mask, **clip)
                  if len(row)]
    if not row_losses:
        return log_prob.sum() * 0
    return torch.stack(row_losses).mean()
