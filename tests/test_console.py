"""console.py: progress bars in a log file, the one-line step record."""


def test_progress_bars_in_a_log_file_write_no_cursor_codes(capsys):
    """An evaluation bar inside the RL bar, written to a file (not a terminal): plain lines, no "move up" escapes."""
    import console

    outer = console.progress_bar(total=2, desc="RL", unit="step")
    with console.progress_bar(total=3, desc="evaluation", unit="question", leave=False) as bar:
        bar.update(3)
    outer.update()
    outer.close()
    log = capsys.readouterr().err
    assert "RL" in log and "evaluation" in log and "\x1b[" not in log


def test_console_line_uses_the_metric_names_grouped_by_namespace():
    import console

    record = {"step": 3, "charts/reward": 0.25, "charts/trees_trained": 2, "charts/uniform_trees": 0.5, "losses/policy": -0.001,
              "losses/kl_to_start": 0.0123456, "time/step": 12.345, "charts/tokens_per_s": 11.26}
    # CONSOLE's order and selection (uniform_trees is in metrics.jsonl only), the namespace once per group
    assert console.console_line(record) == ("charts: reward 0.250 trees_trained 2 tokens_per_s 11.3 | "
                                          "losses: policy -0.0010 kl_to_start 0.0123 | time: step 12.3")
    assert console.console_line({"step": 0, "eval/em": 0.48, "eval/em/default-1hop": 0.4}) == "eval: em 0.480 em/default-1hop 0.400"
