"""Tree packing: the learner's forward over every trajectory of a tree in one row, each shared prefix computed once.

A tree's trajectories share their prompt and early turns. Path by path (one padded row per root -> leaf path) every
shared token is recomputed once per leaf; packed, each node's tokens appear once, depth first, and a tree attention
mask gives every token exactly the context it had in its own trajectory. For the tree P -> A -> C, P -> B (prompt
P = p1 p2, turns A = a1 a2, B = b1, C = c1; leaves C and B):

    packed      p1 p2 a1 a2 c1 b1       query row, key column: x where the query may attend
    position     0  1  2  3  4  2       (b1 sits where a1 does: both follow the prompt)
    predictor    -  p1 p2 a1 a2 p2       (a node's first token is predicted by its parent's last token)

              p1 p2 a1 a2 c1 b1
        p1     x
        p2     x  x
        a1     x  x  x
        a2     x  x  x  x
        c1     x  x  x  x  x
        b1     x  x           x        (b1 does not see its sibling's turn a1 a2 nor c1)

`tree_attention` computes attention block by block (one block per node, its queries against the keys it may see),
so the masked-out part costs nothing. `learner.load_policy` registers it with transformers, and
`learner.packed_token_log_probs` then gives each trajectory the same log-probs as its own padded row: the same loss
and gradient, fewer tokens.

torch only; it reads finished trees of atpo_tree.py (`Tree.nodes`, `parents`, `leaves`, `path`).
"""

from dataclasses import dataclass

import torch

from atpo_tree import Tree, children_lists


@dataclass
class PackedTrees:
    """Several trees laid out as one row of unique tokens, for one forward pass over every trajectory.

    Every node's tokens appear once (depth-first, each tree after the previous one); a token sees the tokens of
    its own node up to itself and every token of its ancestors (`attention_mask`), and sits at its position along
    its root -> leaf path (`position_ids`). Token t of a trajectory is predicted by the logits at `predictor`:
    the previous token of its node, or for a node's first token the last token of its parent (the same position
    for all siblings).
    """

    input_ids: torch.Tensor  # [N] long
    position_ids: torch.Tensor  # [N] long
    node_ids: torch.Tensor  # [N] long, a global node index (trees numbered one after another)
    loss_mask: torch.Tensor  # [N] long, 1 on model tokens of turns
    predictor: torch.Tensor  # [N] long, the position whose logits predict this token (-1 for each tree's first)
    ancestors: torch.Tensor  # [nodes, nodes] bool, ancestors[a, b]: b is a or an ancestor of a, in the same tree
    rows: list[list[int]]  # per trajectory (trees in order, leaves in index order): positions of its response

    def attention_mask(self) -> torch.Tensor:
        """[N, N] bool, True where query token i may attend key token j."""
        n = len(self.input_ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return self.ancestors[self.node_ids][:, self.node_ids] & causal

    def attention_blocks(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The tree mask cut into one block per node, for `tree_attention`: (first, end, keys, mask) where the node's
        tokens are first..end-1, `keys` [K] the positions its last token may attend (its ancestors' tokens and its
        own) and `mask` [end - first, K] the mask of those rows and columns. Outside the blocks the mask is False."""
        mask = self.attention_mask()
        bounds = [0] + (torch.nonzero(self.node_ids[1:] != self.node_ids[:-1])[:, 0] + 1).tolist() + [len(self.node_ids)]
        blocks = []
        for first, end in zip(bounds[:-1], bounds[1:]):
            keys = torch.nonzero(mask[end - 1])[:, 0]
            blocks.append((first, end, keys, mask[first:end][:, keys]))
        return blocks


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]], scale: float | None = None) -> torch.Tensor:
    """Attention under the tree mask, computed block by block: each node's queries against only the keys it may see,
    so the masked-out part of the N x N scores (siblings, cousins, later tokens) costs nothing.
    query [B, Hq, N, D], key and value [B, Hkv, N, D] (Hq a multiple of Hkv), blocks from `attention_blocks`.
    Returns [B, Hq, N, D]. The blocks must be on the tensors' device."""
    # every block's keys gathered at once: one gradient scatter in the backward instead of one per block
    keys = torch.cat([block_keys for _, _, block_keys, _ in blocks])
    sizes = [len(block_keys) for _, _, block_keys, _ in blocks]
    block_key_rows, block_value_rows = key.index_select(2, keys).split(sizes, 2), value.index_select(2, keys).split(sizes, 2)
    groups = query.shape[1] // key.shape[1]
    expand = query.is_cuda and groups > 1  # CUDA's memory-efficient kernel takes no enable_gqa (math would run, in float32)
    outputs = []
    for (first, end, _, mask), k, v in zip(blocks, block_key_rows, block_value_rows):
        if expand:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first:end], k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1 and not expand))
    return torch.cat(outputs, dim=2)


def pack_trees(trees: list[Tree], leaves: list[list[int]] | None = None) -> PackedTrees:
    """Lay finished trees out for a tree-masked forward pass (each shared prefix computed once); with `leaves`, only
    the paths to those leaves of each tree (a tree split along its paths), rows in leaf index order."""
    ids, positions, nodes, loss, predictor, rows = [], [], [], [], [], []
    parents_global: list[int] = []
    for t, tree in enumerate(trees):
        offset = len(parents_global)
        parents_global += [p + offset if p >= 0 else -1 for p in tree.parents]
        kept_leaves = sorted(leaves[t]) if leaves is not None else tree.leaves()
        on_path = {0}.union(*(tree.path(leaf) for leaf in kept_leaves))
        children = [[c for c in cs if c in on_path] for cs in children_lists(tree.parents)]
        last_position = {}  # node -> packed position of its last token (where its children's first token is predicted)
        start_of = {}  # node -> packed position of its first token
        depth_after = {}  # node -> path length in tokens after the node
        stack = [0]
        while stack:  # depth-first, children in index order
            node = stack.pop()
            stack += reversed(children[node])
            tokens = tree.prompt_ids if node == 0 else tree.nodes[node].token_ids + tree.nodes[node].obs_ids
            parent = tree.nodes[node].parent
            first_position = 0 if node == 0 else depth_after[parent]
            start_of[node] = len(ids)
            for i, token in enumerate(tokens):
                ids.append(token)
                positions.append(first_position + i)
                nodes.append(node + offset)
                loss.append(int(node > 0 and i < len(tree.nodes[node].token_ids)))
                if i > 0:
                    predictor.append(len(ids) - 2)
                else:
                    predictor.append(last_position[parent] if node > 0 else -1)
            if not tokens:
                raise ValueError(f"node {node} has no tokens: nothing can predict its children")
            last_position[node] = len(ids) - 1
            depth_after[node] = first_position + len(tokens)
        for leaf in kept_leaves:
            row = []
            for n in tree.path(leaf):
                row += range(start_of[n], start_of[n] + len(tree.nodes[n].token_ids) + len(tree.nodes[n].obs_ids))
            rows.append(row)
    ancestors = torch.zeros(len(parents_global), len(parents_global), dtype=torch.bool)
    for node in range(len(parents_global)):
        a = node
        while a >= 0:
            ancestors[node, a] = True
            a = parents_global[a]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedTrees(as_long(ids), as_long(positions), as_long(nodes), as_long(loss), as_long(predictor), ancestors, rows)
