"""Tree packing (atpo_packing.py, and learner.py's forward over it) against the path-by-path oracle, on the real
default model in float32."""

import random

import pytest
import torch

import engine
import learner
from atpo_loss import policy_loss
from atpo_packing import PackedTrees, pack_trees, tree_attention
from atpo_tree import BatchSampler, StepResult, grow_trees
from tests.handmade import PROMPT, SHAPES, GradientRecorder, make_tree


def loss_and_grads(model, tree_list, packing, gradient_checkpointing="off"):
    """The production path: training_rows -> response_log_probs -> policy_loss, gradients of every parameter."""
    import train

    args = train.Args(packing=packing, dtype="float32", gradient_checkpointing=gradient_checkpointing)
    rows, _ = train.training_rows(tree_list, args)
    model.zero_grad()
    log_probs = learner.response_log_probs(model, rows, tree_list, args, pad_id=2)
    mask = learner.pad([r.traj.response_mask for r in rows], 0, torch.long)
    advantages = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))  # any advantages will do
    old = log_probs.detach() + 0.01 * torch.randn(log_probs.shape, generator=torch.Generator().manual_seed(0))
    loss, _ = policy_loss(log_probs, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return log_probs.detach() * mask, grads


@pytest.mark.parametrize("shape", list(SHAPES))
def test_packed_equals_path_by_path(model, tokenizer, shape):
    tree = make_tree(tokenizer, PROMPT, SHAPES[shape])
    lp_path, g_path = loss_and_grads(model, [tree], "path")
    lp_tree, g_tree = loss_and_grads(model, [tree], "tree")
    assert (lp_path - lp_tree).abs().max().item() <= 1e-4
    assert ((g_path - g_tree).norm() / g_path.norm()).item() <= 1e-5
    assert g_path.norm() > 0


@pytest.mark.parametrize("packing", ["tree", "path"])
def test_gradient_checkpointing_changes_no_gradient_and_auto_follows_free_memory(model, tokenizer, packing, monkeypatch):
    import types

    tree = make_tree(tokenizer, PROMPT, SHAPES["mixed"])
    lp_off, g_off = loss_and_grads(model, [tree], packing, "off")
    assert not model.is_gradient_checkpointing
    lp_on, g_on = loss_and_grads(model, [tree], packing, "on")
    assert model.is_gradient_checkpointing
    assert (lp_off - lp_on).abs().max().item() <= 1e-6
    assert ((g_off - g_on).norm() / g_off.norm()).item() <= 1e-6
    # auto: on only when 95 (float32) bytes x layers x hidden x tokens exceed half the free memory or the training
    # state, 16 bytes a parameter
    monkeypatch.setattr(learner.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**40))
    loss_and_grads(model, [tree], packing, "auto")
    assert not model.is_gradient_checkpointing
    monkeypatch.setattr(learner.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**20))
    loss_and_grads(model, [tree], packing, "auto")
    assert model.is_gradient_checkpointing
    monkeypatch.setattr(learner.psutil, "virtual_memory", lambda: types.SimpleNamespace(available=2**40))
    per_token = 95 * model.config.num_hidden_layers * model.config.hidden_size
    state_tokens = 16 * sum(p.numel() for p in model.parameters()) / per_token  # SmolLM2-135M: ~1,300 tokens
    learner.fit_checkpointing(model, int(state_tokens) + 1, "auto", "float32")
    assert model.is_gradient_checkpointing
    learner.fit_checkpointing(model, int(state_tokens) - 1, "auto", "float32")
    assert not model.is_gradient_checkpointing


def test_packing_counts_each_shared_token_once(tokenizer):
    tree = make_tree(tokenizer, PROMPT, SHAPES["mixed"])
    packed = pack_trees([tree])
    unique = len(tree.prompt_ids) + sum(len(n.token_ids) + len(n.obs_ids) for n in tree.nodes[1:])
    assert len(packed.input_ids) == unique
    assert sum(len(r.response_ids) for r in tree.trajectories()) + len(tree.trajectories()) * len(tree.prompt_ids) > unique
    # siblings' first tokens are predicted from the same position: the parent's last token
    first = {n: packed.node_ids.tolist().index(n) for n in range(1, len(tree.nodes))}
    for n in range(1, len(tree.nodes)):
        parent = tree.parents[n]
        parent_last = max(i for i, x in enumerate(packed.node_ids.tolist()) if x == parent)
        assert packed.predictor[first[n]].item() == parent_last
        assert packed.position_ids[first[n]].item() == len(tree.context(parent))
    for row, traj in zip(packed.rows, tree.trajectories()):
        assert packed.input_ids[row].tolist() == traj.response_ids


def broken(packed: PackedTrees, what: str) -> PackedTrees:
    if what == "dfs_offsets_as_positions":
        return PackedTrees(**{**packed.__dict__, "position_ids": torch.arange(len(packed.input_ids))})
    if what == "causal_mask_only":  # every earlier token visible, siblings included
        return PackedTrees(**{**packed.__dict__, "ancestors": torch.ones_like(packed.ancestors)})
    raise ValueError(what)


@pytest.mark.parametrize("what", ["dfs_offsets_as_positions", "causal_mask_only"])
def test_broken_mask_or_positions_are_caught(model, tokenizer, what):
    """The pitfalls give large errors, so the comparison above would fail on them."""

    tree = make_tree(tokenizer, PROMPT, SHAPES["siblings_differ_at_first_token"])
    packed = pack_trees([tree])
    with torch.no_grad():
        good = learner.packed_token_log_probs(model, packed, 1.0, torch.device("cpu"))
        bad = learner.packed_token_log_probs(model, broken(packed, what), 1.0, torch.device("cpu"))
    assert (good - bad).abs().max().item() > 0.1


def test_positions_without_the_mask_are_wrong(model, tokenizer):
    """Tree position ids with no mask make HF treat the row as packed sequences: wrong log-probs."""

    tree = make_tree(tokenizer, PROMPT, SHAPES["siblings_differ_at_first_token"])
    packed = pack_trees([tree])
    with torch.no_grad():
        good = learner.packed_token_log_probs(model, packed, 1.0, torch.device("cpu"))
        hidden = model.get_decoder()(input_ids=packed.input_ids[None], position_ids=packed.position_ids[None]).last_hidden_state[0]
        picked = packed.loss_mask.bool()
        logits = model.get_output_embeddings()(hidden[packed.predictor[picked]])
        bad = torch.log_softmax(logits, -1).gather(1, packed.input_ids[picked][:, None])[:, 0]
    assert (good[picked] - bad).abs().max().item() > 0.1


def test_tree_attention_equals_dense_masked_attention(tokenizer):
    """Block by block = one dense attention under the [N, N] tree mask; grouped-query heads, batch of 2, gradients."""
    trees = [make_tree(tokenizer, PROMPT, SHAPES["mixed"]), make_tree(tokenizer, "Another prompt", SHAPES["deep_chain"], seed=1)]
    packed = pack_trees(trees)
    n = len(packed.input_ids)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, n, 8, generator=g, dtype=torch.float64)
    blocks = tree_attention(query, key, value, packed.attention_blocks(), scale=0.3)
    grads_blocks = torch.autograd.grad((blocks * weights).sum(), (query, key, value))
    dense = torch.nn.functional.scaled_dot_product_attention(query, key.repeat_interleave(3, 1), value.repeat_interleave(3, 1),
                                                             attn_mask=packed.attention_mask(), scale=0.3)
    grads_dense = torch.autograd.grad((dense * weights).sum(), (query, key, value))
    assert (blocks - dense).abs().max().item() < 1e-12
    for a, b in zip(grads_blocks, grads_dense):
        assert (a - b).abs().max().item() < 1e-12
    # the blocks cover the mask exactly: every allowed (query, key) pair once, nothing else
    covered = torch.zeros(n, n, dtype=torch.bool)
    for first, end, keys, mask in packed.attention_blocks():
        covered[first:end][:, keys] |= mask
    assert torch.equal(covered, packed.attention_mask())
    assert sum((end - first) * len(keys) for first, end, keys, _ in packed.attention_blocks()) < n * n / 2


def test_two_trees_in_one_row_equal_separately(model, tokenizer):

    trees = [make_tree(tokenizer, PROMPT, SHAPES["mixed"]), make_tree(tokenizer, "Another prompt here", SHAPES["deep_chain"], seed=1)]
    with torch.no_grad():
        together = pack_trees(trees)
        lp_together = learner.packed_token_log_probs(model, together, 1.0, torch.device("cpu"))
        apart = torch.cat([learner.packed_token_log_probs(model, pack_trees([t]), 1.0, torch.device("cpu")) for t in trees])
    assert (lp_together - apart).abs().max().item() <= 1e-4
    # and rows index the right tokens of each tree
    assert len(together.rows) == sum(len(t.leaves()) for t in trees)
    assert together.input_ids[together.rows[-1]].tolist() == trees[1].trajectories()[-1].response_ids


def test_grown_tree_packs(tokenizer):
    """A tree from grow_trees (random token ids) packs with the same invariants."""
    rng = random.Random(0)

    def generate(contexts):
        out = []
        for _ in contexts:
            ids = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 5))]
            out.append((ids, [-1.0] * len(ids)))
        return out

    def step(requests):
        return [StepResult([7, 8], False, None, {}) if rng.random() < 0.6 and r.turn_number < 4 else StepResult([], True, 1.0, {})
                for r in requests]

    tree = grow_trees([[1, 2, 3]], [None], BatchSampler(generate), step, m=3, l=2, k=2)[0]
    packed = pack_trees([tree])
    for row, traj in zip(packed.rows, tree.trajectories()):
        assert packed.input_ids[row].tolist() == traj.response_ids
        assert packed.loss_mask[row].tolist() == traj.response_mask
        assert packed.position_ids[row].tolist() == list(range(3, 3 + len(traj.response_ids)))


def test_units_of_several_trees_in_any_order(model, tokenizer):
    """train.py shuffles trees into micro-batches: rows must line up with the packed row whatever the order."""
    import train

    trees = [make_tree(tokenizer, PROMPT, SHAPES["mixed"]), make_tree(tokenizer, PROMPT, SHAPES["siblings_differ_at_first_token"], seed=2)]
    rows, _ = train.training_rows(trees, train.Args(dtype="float32"))
    unit = [r for r in rows if r.tree == 1] + [r for r in rows if r.tree == 0]  # second tree first
    with torch.no_grad():
        by_tree = learner.response_log_probs(model, unit, trees, train.Args(packing="tree", dtype="float32"), 2)
        by_path = learner.response_log_probs(model, unit, trees, train.Args(packing="path", dtype="float32"), 2)
    mask = learner.pad([r.traj.response_mask for r in unit], 0, torch.long)
    assert ((by_tree - by_path) * mask).abs().max().item() <= 1e-4
    part = unit[1:-1]  # a tree split along its paths: some of its leaves, still in leaf order
    with torch.no_grad():
        by_tree = learner.response_log_probs(model, part, trees, train.Args(packing="tree", dtype="float32"), 2)
        by_path = learner.response_log_probs(model, part, trees, train.Args(packing="path", dtype="float32"), 2)
    mask = learner.pad([r.traj.response_mask for r in part], 0, torch.long)
    assert ((by_tree - by_path) * mask).abs().max().item() <= 1e-4
    for bad in (unit[1:2] + unit[0:1], [unit[0], unit[-1], unit[1]]):  # out of leaf order; a tree's rows apart
        with pytest.raises(ValueError, match="each tree's rows together, in leaf order"):
            learner.response_log_probs(model, bad, trees, train.Args(packing="tree", dtype="float32"), 2)


def test_threads_change_no_gradient(model, tokenizer):
    tree = make_tree(tokenizer, PROMPT, SHAPES["mixed"])
    before = torch.get_num_threads()
    try:
        engine.set_threads(1)
        assert torch.get_num_threads() == 1
        lp_one, g_one = loss_and_grads(model, [tree], "tree")
        engine.set_threads(2)
        assert torch.get_num_threads() == 2
        lp_two, g_two = loss_and_grads(model, [tree], "tree")
    finally:
        engine.SET_NUM_THREADS(before)
    assert (lp_one - lp_two).abs().max().item() <= 1e-5
    assert ((g_one - g_two).norm() / g_one.norm()).item() <= 1e-5


@pytest.mark.parametrize("packing", ["tree", "path"])
def test_token_budget_micro_batches_take_the_same_gradient(model, tokenizer, packing):
    """--micro-batch-tokens: units by a token budget, a tree larger than it split along its paths, give the update the
    gradient of whole-tree micro-batches (float32, 1e-6); the split really happened and every unit keeps to the budget."""
    import train

    trees = [make_tree(tokenizer, PROMPT, SHAPES["mixed"], seed=1), make_tree(tokenizer, PROMPT, SHAPES["mixed"], seed=2),
             make_tree(tokenizer, PROMPT, SHAPES["siblings_differ_at_first_token"], seed=3)]
    longest_path = max(len(t.prompt_ids) + len(r.response_ids) for t in trees for r in t.trajectories())

    def gradient(**flags):
        args = train.Args(dtype="float32", gradient_checkpointing="off", demo_coef=0.0, max_grad_norm=1e9, packing=packing,
                          log_kl_to_start="off", **flags)
        rows, _ = train.training_rows(trees, args)
        groups = [[r for r in rows if r.tree == t] for t in range(len(trees))] if packing == "tree" else [[r] for r in rows]
        units = learner.micro_batches(groups, trees, args)
        optimizer = GradientRecorder(model)
        train.update(model, None, optimizer, rows, trees, [], tokenizer, 2, random.Random(0), args)
        return optimizer.grads, units

    by_count, _ = gradient(micro_batch=2)
    by_budget, units = gradient(micro_batch_tokens=longest_path + 10)
    # the same sums in another order (a split tree's shared turns add up over two backward passes): float32 rounding,
    # measured at ~1e-6 of the gradient, bounded as the packed-vs-path comparison is
    assert ((by_count - by_budget).norm() / by_count.norm()).item() <= 1e-5
    trees_in = [{r.tree for r in unit} for unit in units]
    if packing == "tree":
        assert any(sum(t in ts for ts in trees_in) > 1 for t in range(len(trees)))  # a tree was split along its paths
        for unit in units:
            packed = pack_trees([trees[t] for t in dict.fromkeys(r.tree for r in unit)],
                                [[r.traj.leaf for r in unit if r.tree == t] for t in dict.fromkeys(r.tree for r in unit)])
            assert len(packed.input_ids) <= longest_path + 10
    else:
        assert all(len(unit) * max(len(trees[r.tree].prompt_ids) + len(r.traj.response_ids) for r in unit) <= longest_path + 10
                   for unit in units)
    assert sorted((r.tree, r.traj.leaf) for unit in units for r in unit) == sorted(
        (t, leaf) for t, tree in enumerate(trees) for leaf in tree.leaves())  # every row once
