"""checkpoint.py: at every instant one complete checkpoint exists; the line a run stopped mid-way ends with."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import last_checkpoint, resume_hint, save_checkpoint


def test_a_checkpoint_swap_always_leaves_one_complete_checkpoint(tmp_path, monkeypatch):
    from checks import check_args
    from train import Args

    model = torch.nn.Linear(2, 2)
    def save_pretrained(path):  # what a HF folder holds, as far as --resume looks
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        save_file(model.state_dict(), Path(path) / "model.safetensors")

    model.save_pretrained = save_pretrained
    tokenizer = type("Tok", (), {"save_pretrained": lambda self, path: (Path(path) / "tok.json").write_text("{}")})()
    optimizer = torch.optim.AdamW(model.parameters())
    args = Args(output_dir=str(tmp_path))
    assert last_checkpoint(tmp_path) is None
    save_checkpoint(args, 1, model, tokenizer, optimizer)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint"
    # a kill between the two renames of the next save: checkpoint/ is gone, checkpoint.old/ is complete
    real_rename = Path.rename

    def killed_after_first_rename(self, target):
        real_rename(self, target)
        if Path(target).name == "checkpoint.old":
            raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(Path, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(args, 2, model, tokenizer, optimizer)
    monkeypatch.setattr(Path, "rename", real_rename)
    last = last_checkpoint(tmp_path)
    assert last == tmp_path / "checkpoint.old" and torch.load(last / "state.pt", weights_only=False)["step"] == 1
    check_args(Args(output_dir=str(tmp_path), resume=True))  # --resume finds it
    save_checkpoint(args, 3, model, tokenizer, optimizer)  # the next save replaces it: one checkpoint on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "run.lock"]  # the lock check_args took
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3 and set(state["optimizer"]) == {"state", "param_groups"}
    # --no-save-optimizer: the step and flags only; --resume still finds it (and starts a fresh AdamW)
    args.save_optimizer = False
    save_checkpoint(args, 4, model, tokenizer, optimizer)
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4 and "optimizer" not in state and state["args"]["save_optimizer"] is False
    check_args(Args(output_dir=str(tmp_path), resume=True))


def test_resume_hint_names_the_checkpoint_and_the_command(tmp_path):
    reason = "error: retrieval server http://x failed"
    assert resume_hint(reason, str(tmp_path), ["--seed", "2"]) == (
        "error: retrieval server http://x failed; no checkpoint was saved yet; start again with: python train.py --seed 2")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"")
    assert resume_hint(reason, str(tmp_path), ["--resume", "--seed", "2"]) == (
        f"error: retrieval server http://x failed; the last checkpoint is {tmp_path / 'checkpoint'}; "
        f"resume with: python train.py --seed 2 --resume")
