"""warm_start.py: the gold transcripts' draw and cross-entropy, on the real default model in float32."""

import random

import torch

import warm_start
from tests.handmade import DEMOS, demo_nll_by_hand


def test_gold_transcripts_are_split_evenly_over_the_sources():
    one_hop = [{"id": f"1-{i}"} for i in range(6)]  # 3:1 as in the default task's demos.jsonl
    two_hop = [{"id": f"2-{i}"} for i in range(2)]
    for seed in range(20):
        ids = [d["id"] for d in warm_start.draw_demos([one_hop, two_hop], 2, random.Random(seed))]
        assert ids[0].startswith("1-") and ids[1].startswith("2-")  # one of each, whatever the pool sizes
        ids = [d["id"] for d in warm_start.draw_demos([one_hop, two_hop], 3, random.Random(seed))]
        assert [i[0] for i in ids] == ["1", "1", "2"] and len(set(ids)) == 3  # the first pool takes the extra one
        ids = [d["id"] for d in warm_start.draw_demos([two_hop, one_hop], 4, random.Random(seed))]
        assert sorted(ids[:2]) == ["2-0", "2-1"] and len(set(ids)) == 4  # without replacement within a pool
    # one source: the same draw as random.sample on it (what --demo-source default-2hop did before the split)
    assert warm_start.draw_demos([one_hop], 2, random.Random(5)) == random.Random(5).sample(one_hop, 2)


def test_demo_nll_is_the_token_mean_cross_entropy_of_the_model_turns(model, tokenizer):
    import train

    rows = [warm_start.demo_row(tokenizer, d) for d in DEMOS]
    args = train.Args(dtype="float32", gradient_checkpointing="off")
    tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
    # micro-batches of one transcript each add up to the batch's token mean
    nll = sum(warm_start.demo_nll(model, [r], tokens, args, torch.device("cpu"), pad_id=2).item() for r in rows)
    with torch.no_grad():
        by_hand = demo_nll_by_hand(model, rows).item()
    assert tokens == sum(len(tokenizer.encode(t, add_special_tokens=False)) for d in DEMOS for role, t in d["segments"] if role == "model")
    assert abs(nll - by_hand) <= 1e-4
