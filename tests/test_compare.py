"""benchmarks/compare.py's aggregation on small synthetic metrics files with answers worked out by hand."""

import json
import math
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks.compare import (THREE_HOP_TASK, is_done, keep_finished_run, machine_numerics, paired_differences, paired_table,
                                per_run_table, read_metrics, report, results_table, run_curve, summarize, task_flags,
                                train_command)
from engine import resolve_dtype

ROOT = Path(__file__).resolve().parent.parent


def step_row(step: int, tokens: int, reward: float, seconds: tuple[float, float]) -> dict:
    return {"step": step, "losses/policy": 0.0, "charts/reward": reward, "charts/generated_tokens": tokens, "charts/leaves": 12,
            "time/rollout": seconds[0], "time/env": 9.0, "time/train": seconds[1], "time/sync": 1.0,
            "time/step": seconds[0] + seconds[1] + 1.0}


def eval_row(step: int, em: float, one_hop: float, two_hop: float) -> dict:
    return {"step": step, "eval/em": em, "eval/em/default-1hop": one_hop, "eval/em/default-2hop": two_hop}


def write(path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def seed_rows(ems: list[float], tokens: list[int]) -> list[dict]:
    """Evaluations at steps 0, 2, 4 with `ems`; four steps generating `tokens`."""
    rows = [eval_row(0, ems[0], ems[0], ems[0])]
    for step, t in enumerate(tokens, 1):
        rows.append(step_row(step, t, reward=step / 10, seconds=(10.0, 50.0)))
        if step % 2 == 0:
            rows.append(eval_row(step, ems[step // 2], ems[step // 2] + 0.1, ems[step // 2] - 0.1))
    return rows


def test_read_metrics_keeps_the_later_row_of_a_resumed_run(tmp_path):
    rows = seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400])
    rows.insert(3, eval_row(2, 0.9, 0.9, 0.9))  # the first attempt's evaluation at step 2; the run resumed from 2
    write(tmp_path / "m.jsonl", rows)
    metrics = read_metrics(tmp_path / "m.jsonl")
    assert [(r["step"], "eval/em" in r) for r in metrics] == [(0, True), (1, False), (2, False), (2, True), (3, False),
                                                              (4, False), (4, True)]
    assert [r["eval/em"] for r in metrics if "eval/em" in r] == [0.1, 0.3, 0.5]


def test_read_metrics_names_the_bad_line(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps(eval_row(0, 0.1, 0.1, 0.1)) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a metrics row"):
        read_metrics(tmp_path / "m.jsonl")


def test_run_curve_by_hand():
    curve = run_curve(seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400]))
    assert curve["eval_steps"] == [0, 2, 4]
    assert curve["evals"]["eval/em"] == [0.1, 0.3, 0.5]
    assert curve["tokens"] == [0, 300, 1000]  # generated before each evaluation
    assert curve["tokens_per_leaf"] == pytest.approx(1000 / 48)  # no draws logged: the trained leaves
    rows = seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400])
    for row, drawn in zip([r for r in rows if "losses/policy" in r], [2, 5, 3, 2]):  # 2 trees of 6 leaves trained
        row.update({"charts/trees_drawn": drawn, "charts/trees_trained": 2})
    assert run_curve(rows)["tokens_per_leaf"] == pytest.approx(1000 / (6 * 12))  # dropped trees' leaves too
    assert curve["seconds_per_step"] == pytest.approx(61.0)  # the step's wall time: rollout (env inside) + train + sync
    assert curve["reward"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4)
    assert math.isnan(curve["uniform_trees"])  # not logged by these rows
    rows = seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400])
    for row, share in zip([r for r in rows if "losses/policy" in r], [0.5, 0.25, 0.0, 0.25]):
        row["charts/uniform_trees"] = share
    assert run_curve(rows)["uniform_trees"] == pytest.approx(0.25)
    assert curve["evals"]["eval/em/default-1hop"] == pytest.approx([0.1, 0.4, 0.6])


def test_summarize_two_seeds_by_hand():
    a = run_curve(seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400]))
    b_rows = seed_rows([0.1, 0.5, 0.7], [200, 200, 200, 200])
    for row, tokens in zip([r for r in b_rows if "losses/policy" in r], [10.0, 20.0, 30.0, 60.0]):
        row["charts/tokens_per_leaf/default-2hop"] = tokens  # logged by b only
    b_rows[-2]["charts/tokens_per_leaf/default-1hop"] = 7.0  # on its last step only
    b = run_curve(b_rows)
    assert b["tokens_per_leaf_by_source"] == {"default-1hop": 7.0, "default-2hop": 30.0}
    s = summarize([a, b])
    assert s["seeds"] == 2 and s["steps"] == [0, 2, 4]
    assert s["evals"]["eval/em"][0] == pytest.approx((0.1, 0.0))
    assert s["evals"]["eval/em"][2] == pytest.approx((0.6, math.sqrt(0.02)))  # sample std of 0.5 and 0.7
    assert s["tokens"] == pytest.approx([0, 350, 900])
    assert s["evals"]["eval/em/default-2hop"][-1] == pytest.approx((0.5, math.sqrt(0.02)))
    assert s["tokens_per_leaf"][0] == pytest.approx((1000 / 48 + 800 / 48) / 2)
    table = results_table({"entropy": s})
    assert s["tokens_per_leaf_by_source"]["default-2hop"] == pytest.approx((30.0, 0.0, 1))
    assert "| AT²PO: entropy-guided tree, turn loss | 2 | 0.100 ± 0.000 | 0.600 ± 0.141 (step 4) | 0.700 ± 0.141 |" in table
    assert "| nan ± nan | 7.0 ± 0.0 (1 of 2 runs) | 30.0 ± 0.0 (1 of 2 runs) | 18.8 ± 2.9 | 61.0 ± 0.0 |" in table


def test_summarize_uses_only_steps_every_seed_reached():
    done = run_curve(seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400]))
    stopped = run_curve(seed_rows([0.1, 0.5, 0.7], [100, 100, 100, 100])[:4])  # evaluations at 0 and 2 only
    s = summarize([done, stopped])
    assert s["steps"] == [0, 2]
    assert s["evals"]["eval/em"][-1] == pytest.approx((0.4, math.sqrt(0.02)))


def test_a_finished_run_is_kept_and_its_checkpoints_deleted(tmp_path):
    run = tmp_path / "entropy" / "seed3"
    for checkpoint in ("checkpoint", "checkpoint.step_000010"):
        (run / checkpoint).mkdir(parents=True)
        (run / checkpoint / "state.pt").write_bytes(b"x")
    (run / "trees").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "train.log").write_text("log")
    kept = tmp_path / "results" / "compare" / "entropy" / "seed3_bfloat16-amx.jsonl"
    keep_finished_run(run, kept)
    assert kept.read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "train.log", "trees"]


def test_is_done_needs_the_final_evaluation(tmp_path):
    rows = seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400])
    write(tmp_path / "run" / "metrics.jsonl", rows[:-1])
    assert not is_done(tmp_path / "run" / "metrics.jsonl", 4)
    write(tmp_path / "run" / "metrics.jsonl", rows)
    assert is_done(tmp_path / "run" / "metrics.jsonl", 4)
    assert not is_done(tmp_path / "missing.jsonl", 4)


def test_paired_differences_by_hand():
    # final EM (step 4): entropy 0.5 on seed 1, 0.7 on seed 2; chains 0.2 and 0.8; random only on seed 3 (no pair)
    curves = {"entropy": {"seed1_x": run_curve(seed_rows([0.1, 0.3, 0.5], [100] * 4)),
                          "seed2_x": run_curve(seed_rows([0.1, 0.3, 0.7], [100] * 4))},
              "chains": {"seed1_x": run_curve(seed_rows([0.1, 0.3, 0.2], [100] * 4)),
                         "seed2_x": run_curve(seed_rows([0.1, 0.3, 0.8], [100] * 4))},
              "random": {"seed3_x": run_curve(seed_rows([0.1, 0.3, 0.9], [100] * 4))}}
    d = paired_differences(curves)
    assert set(d) == {"chains"} and d["chains"]["keys"] == ["seed1_x", "seed2_x"]
    mean, std, above = d["chains"]["eval/em"]  # differences -0.3 and +0.1
    assert mean == pytest.approx(-0.1) and std == pytest.approx(math.sqrt(0.08)) and above == 1
    assert d["chains"]["eval/em/default-2hop"][:2] == pytest.approx((-0.1, math.sqrt(0.08)))  # seed_rows: em - 0.1
    assert "eval/two_hop_second_search" not in d["chains"]  # not in these rows
    table = paired_table(d)
    assert "| GRPO: independent chains, turn loss | seed1_x, seed2_x | -0.100 ± 0.283 (1 of 2 above 0) |" in table


def test_per_run_table_by_hand():
    # seed_rows: final EM e, single-hop e + 0.1, two-hop e - 0.1; seed 10 sorts after seed 9 (by number, not text)
    curves = {"entropy": {"seed9_x": run_curve(seed_rows([0.25, 0.3, 0.5], [100] * 4)),
                          "seed10_x": run_curve(seed_rows([0.125, 0.3, 0.7], [100] * 4))},
              "chains": {"seed10_x": run_curve(seed_rows([0.125, 0.3, 0.2], [100] * 4))},
              "entropy-no-demo": {"seed1_x": run_curve(seed_rows([0.1, 0.3, 0.2], [100] * 4))}}
    assert per_run_table(curves, ["entropy", "random", "chains"]).split("\n") == [
        "| run (EM at step 0): final EM / single-hop / two-hop | AT²PO: entropy-guided tree, turn loss | "
        "GRPO: independent chains, turn loss |",
        "|---|---|---|",
        "| seed9_x (0.250) | 0.500 / 0.600 / 0.400 | — |",
        "| seed10_x (0.125) | 0.700 / 0.800 / 0.600 | 0.200 / 0.300 / 0.100 |"]


def test_three_hop_tables_by_hand():
    def three_hop_rows(final: float) -> list[dict]:  # three-hop EM final - 0.2, third search 0.5 at the end
        rows = seed_rows([0.1, 0.3, final], [100] * 4)
        for r in rows:
            if "eval/em" in r:
                r.update({"eval/em/default-3hop": r["eval/em"] - 0.2, "eval/three_hop_third_search": 0.5 * (r["step"] == 4)})
        return rows

    curves = {"entropy-3hop": {"seed1_x": run_curve(three_hop_rows(0.5))}, "chains-3hop": {"seed1_x": run_curve(three_hop_rows(0.75))}}
    assert per_run_table(curves, ["entropy-3hop", "random-3hop", "chains-3hop"], hops=3).split("\n")[::2] == [
        "| run (EM at step 0): final EM / single-hop / two-hop / three-hop | AT²PO, three-hop task | GRPO, three-hop task |",
        "| seed1_x (0.100) | 0.500 / 0.600 / 0.400 / 0.300 | 0.750 / 0.850 / 0.650 / 0.550 |"]
    d = paired_differences(curves, baseline="entropy-3hop")
    assert d["chains-3hop"]["eval/em/default-3hop"][:2] == pytest.approx((0.25, 0.0))
    assert d["chains-3hop"]["eval/three_hop_third_search"][:2] == pytest.approx((0.0, 0.0))
    assert paired_table(d, "entropy-3hop", hops=3).split("\n")[0].endswith("| EM | single-hop | two-hop | three-hop | "
                                                                           "2nd search (two-hop) | 3rd search (three-hop) |")
    header, rule, row = results_table({"chains-3hop": summarize(list(curves["chains-3hop"].values()))}, hops=3).split("\n")
    assert header.count("|") == rule.count("|") == row.count("|") == 17  # 16 columns
    assert "| 0.750 ± 0.000 (step 4) | 0.850 ± 0.000 | 0.650 ± 0.000 | 0.550 ± 0.000 | nan ± 0.000 | 0.500 ± 0.000 |" in row


def test_runs_of_one_seed_on_other_numerics_are_not_paired():
    curves = {"entropy": {"seed1_bfloat16-avx512": run_curve(seed_rows([0.1, 0.3, 0.5], [100] * 4))},
              "chains": {"seed1_bfloat16-amx": run_curve(seed_rows([0.1, 0.3, 0.2], [100] * 4))}}
    assert paired_differences(curves) == {}


def test_machine_numerics_names_the_dtype_and_the_kernels():
    dtype, kind = machine_numerics().split("-", 1)
    assert dtype == resolve_dtype("auto")
    assert kind and kind == kind.lower() and (kind != "amx" or dtype == "bfloat16")  # AMX computes bf16 only


def test_train_command_is_the_default_run_plus_the_setting(tmp_path):
    args = Namespace(out_dir=str(tmp_path), total_steps=20, eval_every=10, eval_questions=300)
    command = train_command(args, "chains", 7, threads=1)
    assert "--enforce-eager" in command  # the engine every kept run was made with
    rest = [c for c in command if c != "--enforce-eager"]
    flags = dict(zip(rest[2::2], rest[3::2]))
    assert command[1].endswith("train.py") and "--model" not in command and "--sft" not in command  # own warm start
    assert flags == {"--seed": "7", "--output-dir": str(tmp_path / "chains" / "seed7"), "--total-steps": "20",
                     "--eval-every": "10", "--eval-questions": "300", "--save-every": "10", "--save-trees-every": "10",
                     "--threads": "1", "--expansion": "chains"}
    assert train_command(args, "chains-no-demo", 7, threads=1)[-4:] == ["--expansion", "chains", "--demo-coef", "0"]
    (tmp_path / "chains" / "seed7").mkdir(parents=True)
    (tmp_path / "chains" / "seed7" / "metrics.jsonl").write_text("")  # stopped before its first checkpoint
    assert train_command(args, "chains", 7, threads=1)[-1] == "--overwrite-output-dir"
    (tmp_path / "chains" / "seed7" / "checkpoint").mkdir()
    (tmp_path / "chains" / "seed7" / "checkpoint" / "state.pt").write_bytes(b"")
    assert train_command(args, "chains", 7, threads=1)[-1] == "--resume"


def test_three_hop_settings_add_the_task_and_warm_start_on_its_transcripts(tmp_path):
    from train import Args
    from warm_start import warm_start_dir

    args = Namespace(out_dir=str(tmp_path), total_steps=20, eval_every=10, eval_questions=300)
    rest = [c for c in train_command(args, "chains-3hop", 7, threads=1) if c != "--enforce-eager"]
    flags = dict(zip(rest[2::2], rest[3::2]))
    assert flags["--expansion"] == "chains" and flags["--demo-batch"] == "3"
    assert [flags[f] for f in ("--train-data", "--test-data", "--sft-demos")] == [
        "data/default/train_3hop.jsonl", "data/default/test_3hop.jsonl", "data/default/demos_3hop.jsonl"]
    assert all((ROOT / flags[f]).exists() for f in ("--train-data", "--test-data", "--sft-demos"))
    assert task_flags("chains-3hop") == THREE_HOP_TASK and task_flags("chains") == []
    # the cache key holds the transcripts: the three-hop runs of a seed do not start from its default warm start
    assert warm_start_dir(Args(seed=7, sft_demos=str(ROOT / flags["--sft-demos"]))) != warm_start_dir(Args(seed=7))


def test_report_writes_tables_plots_and_the_results_page_block(tmp_path):
    kept = tmp_path / "results" / "compare"
    for name, ems in [("entropy", [0.1, 0.3, 0.5]), ("chains", [0.1, 0.2, 0.2]), ("loss-token", [0.1, 0.1, 0.3]),
                      ("entropy-no-demo", [0.1, 0.2, 0.4]), ("chains-no-demo", [0.1, 0.2, 0.6])]:
        for seed in (1, 2):
            write(kept / name / f"seed{seed}_float32.jsonl", seed_rows(ems, [100, 200, 300, 400]))
    write(kept / "random" / "seed1_float32.jsonl", seed_rows([0.1, 0.3, 0.5], [100, 200, 300, 400])[:5])  # unfinished
    (tmp_path / "results.md").write_text("intro\n<!-- compare:begin -->\nold table\n<!-- compare:end -->\nrest\n")
    args = Namespace(results_dir=str(tmp_path / "results"), page=str(tmp_path / "results.md"), total_steps=4,
                     eval_every=2, eval_questions=60)
    tables = report(args)  # every kept run; "random" has no finished run: left out
    summary, runs, paired, runs_no_demo, paired_no_demo = tables.split("\n\n")  # loss-token alone: no pair in its group
    assert runs.count("\n") == 3 and "| seed1_float32 (0.100) | 0.500 / 0.600 / 0.400 | 0.200 / 0.300 / 0.100 |" in runs
    assert summary.count("\n") == 6 and "Tree-GRPO" not in tables
    assert "| GRPO: independent chains, turn loss | seed1_float32, seed2_float32 | -0.300 ± 0.000 (0 of 2 above 0) |" in paired
    assert "no transcripts" not in paired  # each group pairs with its own AT²PO run
    assert "minus AT²PO, no transcripts' term, same seed" in paired_no_demo
    assert "| GRPO chains, no transcripts' term | seed1_float32, seed2_float32 | +0.200 ± 0.000 (2 of 2 above 0) |" in paired_no_demo
    for image in ("em_vs_step.png", "em_vs_tokens.png", "em_vs_step_no_demo.png", "loss_level.png"):
        assert (tmp_path / "results" / image).read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "results.md").read_text()
    assert page.startswith("intro\n<!-- compare:begin -->\n") and page.endswith(tables + "\n<!-- compare:end -->\nrest\n")
    assert "old table" not in page
    (tmp_path / "results.md").write_text("no block\n")
    with pytest.raises(SystemExit, match="no <!-- compare:begin --> ... <!-- compare:end --> block"):
        report(args)
