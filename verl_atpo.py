"""AT²PO on verl: the ATPO turn loss and turn-wise credit as verl plug-ins (verl 0.9.1, `./setup.sh --verl`).

Importing this file registers, without changing atpo_loss.py or atpo_credit.py:
    policy loss  "atpo"  actor_rollout_ref.actor.policy_loss.loss_mode=atpo      (docs/method.md §3, via atpo_loss.token_losses)
    advantage    "atpo"  algorithm.adv_estimator=atpo                              (docs/method.md §2, via atpo_credit.backup)
verl imports it in the driver and in every Ray worker when VERL_USE_EXTERNAL_MODULES=verl_atpo and this folder is
on PYTHONPATH; examples/verl_search_r1.sh shows the whole launch.

What reaches us through verl 0.9.1: its trainer hands a custom advantage estimator only the token rewards, the
response mask, the algorithm config and the rollout group ids (`uid`), and its agent loop samples independent
trajectories. So through the registry each group becomes a tree whose root has one chain per trajectory (the
`chains` tree), where the reference credit (child_softmax, node_value) gives every turn its trajectory's z-scored
reward: GRPO with the population std. `tree_advantages` runs the full backup when a tree rollout also supplies,
per trajectory, the node id of each of its turns (shared prefixes share ids) and the old log-probs (for H(n)).
"""

import numpy as np
import torch
from verl.trainer.ppo.core_algos import agg_loss, register_adv_est, register_policy_loss

from atpo_credit import backup, token_advantages
from atpo_loss import token_losses, turn_ids


@register_policy_loss("atpo")
def atpo_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ATPO loss (docs/method.md §3) in verl's policy-loss signature: turn ratio and clip from atpo_loss, ε_low/ε_high from the
    actor config (clip_ratio_low/high, else clip_ratio), aggregated by verl's agg_loss with the actor's
    loss_agg_mode and data-parallel batch info, so the loss is the same on 1 or N ranks. All tensors [B, T].
    """
    if config is None:
        raise ValueError("the atpo policy loss needs verl's actor config (clip ratios, global_batch_info)")
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    losses, stats = token_losses(log_prob, old_log_prob, advantages, response_mask,
                                 level="turn", clip_low=clip_low, clip_high=clip_high)
    if rollout_is_weights is not None:  # verl's rollout-correction importance weights, as its own losses apply them
        losses = losses * rollout_is_weights
    loss = agg_loss(loss_mat=losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    metrics = {
        "actor/pg_clipfrac": stats["clip_frac"].item(),
        "actor/ppo_kl": stats["approx_kl"].item(),
        "actor/pg_clipfrac_lower": 0.0,  # atpo_loss reports one clip fraction; verl logs this key for every loss
    }
    return loss, metrics


def tree_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    turn_nodes: list[list[int]] | None = None,
    old_log_probs: torch.Tensor | None = None,
    value_mode: str = "child_softmax",
    adv_mode: str = "node_value",
) -> torch.Tensor:
    """Turn advantages (docs/method.md §2) for a verl batch: rows with the same `index` (uid) form one tree.

    token_level_rewards, response_mask, old_log_probs: [B, T]; a row's outcome reward is its token rewards' sum.
    A row's turns are the runs of 1s in its response mask (tool observations are 0). turn_nodes[r][k] is the
    node id (>= 1, numbered parent before child, root 0) of row r's (k+1)-th turn; rows sharing a prefix share its
    ids. Without turn_nodes every row is its own chain below the root. H(n) is the mean of -old_log_probs over n's
    tokens; old_log_probs may be left out only where H cannot change an advantage. Returns [B, T], 0 off the mask.
    """
    mask = response_mask.bool()
    turns = turn_ids(mask)  # [B, T], k >= 1 on the k-th turn
    turn_counts = turns.max(dim=1).values.tolist()
    rewards = token_level_rewards.sum(dim=1).tolist()
    token_nodes = torch.full_like(turns, -1)  # [B, T], index into the concatenation of all trees' nodes
    node_advantages = []
    offset = 0
    groups: dict[object, list[int]] = {}
    for row, uid in enumerate(index):
        groups.setdefault(uid, []).append(row)

    for uid, rows in groups.items():
        rows = [r for r in rows if turn_counts[r] > 0]  # a row without model tokens gets no advantage
        if not rows:
            continue
        # The tree: parents[n] for every node, the node of every (row, turn), and each leaf's reward.
        parents = [-1]
        row_nodes = {}
        for r in rows:
            if turn_nodes is None:
                row_nodes[r] = list(range(len(parents), len(parents) + turn_counts[r]))
            else:
                row_nodes[r] = list(turn_nodes[r])
                if len(row_nodes[r]) != turn_counts[r]:
                    raise ValueError(f"row {r}: {len(row_nodes[r])} turn node ids for {turn_counts[r]} turns")
            for parent, node in zip([0] + row_nodes[r][:-1], row_nodes[r]):
                if node < 1:
                    raise ValueError(f"group {uid!r}, row {r}: turn node id {node} must be >= 1 (0 is the root)")
                parents.extend([None] * (node + 1 - len(parents)))
                if parents[node] not in (None, parent):
                    raise ValueError(f"group {uid!r}: node {node} has parents {parents[node]} and {parent}")
                parents[node] = parent
        if None in parents:
            raise ValueError(f"group {uid!r}: node ids must be 1..N without gaps, node {parents.index(None)} missing")
        leaf_rewards = {}
        for r in rows:
            leaf = row_nodes[r][-1]
            if leaf in leaf_rewards:
                raise ValueError(f"group {uid!r}: rows end at the same node {leaf}; each trajectory needs its own leaf")
            leaf_rewards[leaf] = rewards[r]

        entropies = [0.0] * len(parents)
        if old_log_probs is not None:
            for r in rows:
                for k, node in enumerate(row_nodes[r], start=1):
                    entropies[node] = -old_log_probs[r][turns[r] == k].double().mean().item()
        elif value_mode == "child_softmax" and (
            adv_mode != "node_value" or any(parents.count(n) > 1 for n in range(1, len(parents)))
        ):
            raise ValueError("child_softmax needs old_log_probs (H(n)) for this tree and advantage mode")

        _, advantages = backup(parents, entropies, leaf_rewards, value_mode=value_mode, adv_mode=adv_mode)
        for r in rows:
            nodes = torch.tensor([0] + row_nodes[r], dtype=torch.long) + offset
            token_nodes[r] = torch.where(mask[r], nodes[turns[r]], -1)
        node_advantages.append(advantages)
        offset += len(parents)

    if not node_advantages:
        return torch.zeros_like(token_level_rewards)
    return token_advantages(torch.cat(node_advantages), token_nodes, mask).to(token_level_rewards.dtype)


@register_adv_est("atpo")
def compute_atpo_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray | None = None, config=None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn credit (docs/method.md §2) in verl's advantage-estimator signature: each uid group as a chains tree, the reference credit
    (child_softmax, node_value). Returns (advantages, returns), both [B, T], as verl's GRPO does.
    """
    if index is None:
        raise ValueError("the atpo advantage needs rollout groups: verl passes them as `uid` (rollout.n > 1)")
    advantages = tree_advantages(token_level_rewards, response_mask, index)
    return advantages, advantages
