"""The ATPO turn-level policy loss (AT²PO, arXiv 2601.04767; docs/method.md §3), vectorised.

Self-contained (torch only): copy this file into TRL and call `policy_loss` where the PPO loss is, or use
`token_losses` where a trainer aggregates the per-token loss itself (verl_atpo.py registers it with verl).

    turn log-ratio     l_{i,k} = mean_{t in T_{i,k}} (log pi_theta(y_t) - log pi_old(y_t))
    token ratio        s_{i,t} = exp(min(sg[l_{i,k}] + log pi_theta(y_t) - sg[log pi_theta(y_t)], max_log_ratio))
    token loss         max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - clip_low, 1 + clip_high))
    aggregation        mean over the model tokens of each row, then mean over the rows that have any

`kl_penalty` (k3 KL to a reference policy, same aggregation) is not part of ATPO; train.py adds it only with
--kl-coef > 0. A turn is a maximal run of 1s in the response (loss) mask. `level="sequence"` makes the whole row one segment
(GSPO); `level="token"` makes every token its own segment (token-level PPO-clip).
"""

import torch

LEVELS = ("turn", "sequence", "token")


def turn_ids(response_mask: torch.Tensor) -> torch.Tensor:
    """Turns (§3.1): 0 where the mask is 0, k >= 1 on the k-th maximal run of 1s of each row.

    response_mask: [B, T] (bool or 0/1) -> LongTensor [B, T].
    """
    mask = response_mask.bool()
    previous = torch.nn.functional.pad(mask[:, :-1], (1, 0))  # the mask shifted right, False in front
    return torch.cumsum(mask & ~previous, dim=1).mul_(mask)  # turn starts so far, on model tokens only


def segment_mean(values: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Turn log-ratio (§3.2): the mean of `values` over each segment of its row, broadcast back to its tokens.

    values: [B, T], 0 outside every segment; segment_ids: [B, T] long, 0 = outside every segment, at most T
    segments per row. Returns [B, T], 0 outside every segment.
    """
    shape = (values.shape[0], values.shape[1] + 1)  # a bucket per possible segment id (no host sync for max)
    sums = values.new_zeros(shape).scatter_add_(1, segment_ids, values)
    counts = values.new_zeros(shape).scatter_add_(1, segment_ids, values.new_ones(()).expand_as(values))
    return sums.div_(counts.clamp_(min=1)).gather(1, segment_ids)  # bucket 0 sums zeros: 0 outside segments


def seq_mean_token_mean(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Aggregation (§3.5): mean over the model tokens of each row, then over the rows that have any (§5.5).

    values: [B, T], 0 wherever the mask is 0; response_mask: [B, T] bool. Returns a scalar.
    """
    tokens_per_row = response_mask.sum(dim=1).to(values.dtype)
    rows = torch.count_nonzero(tokens_per_row)
    return (values.sum(dim=1) / tokens_per_row.clamp(min=1)).sum() / rows.clamp(min=1)


def token_losses(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str = "turn",
    clip_low: float = 3e-3,
    clip_high: float = 4e-3,
    max_log_ratio: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ATPO per-token loss (§3.2-3.4) before aggregation: max(-A s, -A clip(s)) with the turn-level ratio s.

    Inputs as `policy_loss`. Returns the loss matrix [B, T] (0 where the mask is 0) and 0-dim tensor statistics
    over the model tokens (see `policy_loss`), so a trainer can aggregate the matrix its own way (verl's agg_loss).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if not (log_prob.shape == old_log_prob.shape == advantages.shape == response_mask.shape):
        raise ValueError(
            "log_prob, old_log_prob, advantages and response_mask must have the same [B, T] shape, got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    if log_prob.dim() != 2:
        raise ValueError(f"expected [B, T] tensors, got {log_prob.dim()} dimensions")

    mask = response_mask.bool()
    log_prob = torch.where(mask, log_prob, 0.0)
    old_log_prob = torch.where(mask, old_log_prob.to(log_prob.dtype), 0.0)
    advantages = torch.where(mask, advantages.to(log_prob.dtype), 0.0)
    token_log_ratio = (log_prob - old_log_prob).detach()  # [B, T], 0 off the mask

    # l_{i,k}: the mean log-ratio of the segment (turn, row or token) each model token belongs to.
    if level == "token":
        segment_log_ratio = token_log_ratio
    else:
        segment_log_ratio = segment_mean(token_log_ratio, turn_ids(mask) if level == "turn" else mask.long())

    # s_{i,t}: value exp(l_{i,k}) capped at exp(max_log_ratio); gradient d s = s * d log pi_theta(y_t).
    ratio = torch.exp(torch.clamp(segment_log_ratio + log_prob - log_prob.detach(), max=max_log_ratio))
    # max(-A s, -A clip(s)) = -min(A s, A clip(s)); both are 0 off the mask, where A is 0.
    unclipped = advantages * ratio
    clipped = advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    losses = -torch.minimum(unclipped, clipped)

    with torch.no_grad():
        tokens_per_row = mask.sum(dim=1)
        tokens = tokens_per_row.sum().clamp(min=1)
        stats = {
            "clip_frac": torch.count_nonzero(clipped < unclipped) / tokens,
            "ratio_mean": torch.where(mask, ratio, 0.0).sum() / tokens,
            "capped_frac": torch.count_nonzero(segment_log_ratio > max_log_ratio) / tokens,
            "approx_kl": -token_log_ratio.sum() / tokens,  # k1: mean of log pi_old - log pi_theta; 0 off the mask
            "rows": torch.count_nonzero(tokens_per_row).to(ratio.dtype),
        }
    return losses, stats


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    level: str = "turn",
    clip_low: float = 3e-3,
    clip_high: float = 4e-3,
    max_log_ratio: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ATPO objective (§3): turn-level geometric-mean ratio, per-token gradient, PPO clip, seq-mean-token-mean.

    log_prob, old_log_prob, advantages, response_mask: [B, T]; log-probs of the sampled tokens, one advantage
    per token (each model token of a turn carries its turn's advantage). Values where the mask is 0 are ignored,
    even if they are inf or NaN. Returns the scalar loss and float statistics over the model tokens:
    clip_frac (the clipped term is the larger one), ratio_mean (the ratio's value, capped exp(l), token-weighted),
    capped_frac (l > max_log_ratio), approx_kl (k1 estimate of KL(pi_old || pi_theta)), rows (non-empty rows).
    """
    losses, stats = token_losses(
        log_prob, old_log_prob, advantages, response_mask,
        level=level, clip_low=clip_low, clip_high=clip_high, max_log_ratio=max_log_ratio,
    )
    loss = seq_mean_token_mean(losses, response_mask.bool())
    return loss, dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one host sync


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Optional KL penalty (§5.5): k3 estimate of KL(pi_theta || pi_ref), exp(r) - r - 1 with r = log pi_ref - log pi_theta per model token
    (unbiased, never negative; GRPO's KL term), aggregated seq-mean-token-mean like `policy_loss`.

    log_prob, ref_log_prob, response_mask: [B, T]; values where the mask is 0 are ignored. Returns a scalar, 0
    where the two policies agree, with the gradient of the KL penalty with respect to log_prob.
    """
    mask = response_mask.bool()
    log_ratio = torch.where(mask, ref_log_prob.to(log_prob.dtype) - log_prob, 0.0).clamp(-20.0, 20.0)
    return seq_mean_token_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask)
