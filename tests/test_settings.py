"""The settings: declared once (run.py), made into flags, checked before anything loads, and written
to and read back from a run's config.json."""
import argparse
import dataclasses
import json

import pytest

import run
import train
from conftest import train_args
from run import add_flags, problems, read_settings, settings


@pytest.fixture(autouse=True)
def private_cache(setup, monkeypatch):
    import data
    monkeypatch.setattr(data, "CACHE", setup[2])


def test_every_setting_is_a_flag_with_its_help_and_range():
    """Each declared setting, OuroborosConfig's included, has help text and a flag; the flags' defaults
    are the declared ones, and a range shows in the help."""
    p = argparse.ArgumentParser()
    add_flags(p)
    flags = {a.dest: a for a in p._actions if a.dest != "help"}
    assert set(flags) == set(run.SETTINGS) and "rank" in flags and "held_out" in flags
    assert all(f.metadata["help"] for f in run.SETTINGS.values())
    assert settings(vars(p.parse_args([]))) == settings({})
    assert "(at least 1)" in flags["steps"].help and "(above 0 and below 1)" in flags["held_out"].help
    assert flags["gate"].option_strings == ["--no-gate"]
    assert flags["variant"].choices == ("controller", "static", "none")


def test_a_runs_config_json_gives_back_its_settings(setup, tmp_path):
    cfg = settings({"model": setup[0], "out": str(tmp_path), "rank": 8, "depths": "1,3", "data": ["a.txt"],
                    "variant": "static"})
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert read_settings(str(tmp_path)) == cfg and cfg.depths == (1, 3) and cfg.ouroboros.rank == 8
    bad = dict(dataclasses.asdict(cfg), clip=-1.0)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="--clip -1.0 must be above 0; it was not written by train.py, or was edited"):
        read_settings(str(tmp_path))
    assert problems(settings({})) == []


def test_warmup_follows_short_runs_but_not_the_default_run():
    assert settings({}).warmup == 10                      # the default run is unchanged
    assert [settings({"steps": n}).warmup for n in (5, 40, 1000)] == [0, 5, 10]
    assert settings({"steps": 5, "warmup": 2}).warmup == 2
    assert problems(settings({"steps": 5, "warmup": 5})) == ["--warmup 5 must be in 0..4 (below --steps)"]

@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--warmup", "4"], r"--warmup 4 must be in 0..3"),
    (["--held-out", "1.5"], "--held-out 1.5 must be above 0 and below 1"),
    (["--depths", "4,x"], "give comma-separated integers"),
    (["--depths", "65"], "each depth must be in 1..64"),
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--recurrent", "0"], "recurrent layer 0 must lie between"),
    (["--data", "/nonexistent/*.txt"], "matches no files"),
    (["--device", "cuda:99"], "--device cuda:99: no such device here"),
    (["--lr", "nan"], "--lr nan must be finite and above 0"),
])
def test_impossible_settings_fail_with_one_clear_error(setup, tmp_path, extra, message):
    out = tmp_path / "run"
    with pytest.raises((ValueError, OSError), match=message):
        train.main(train_args(setup, str(out), *extra))
    assert not (out / "checkpoint.safetensors").exists()

def test_out_naming_a_file_and_every_bad_setting_at_once(setup, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    with pytest.raises(ValueError) as e:
        train.main(train_args(setup, str(file), "--steps", "0", "--save-interval", "0", "--depths", "x"))
    msg = str(e.value)
    assert msg.count("\n") == 0 and all(m in msg for m in (
        "is a file", "--steps 0 must be at least 1", "--save-interval 0 must be at least 1", "comma-separated"))
    assert file.read_text() == "keep me"
    with pytest.raises(ValueError, match="holds no checkpoint to continue"):
        train.main(train_args(setup, str(tmp_path / "new"), "--resume"))

def test_dry_run_qwen25_3b_counts(tmp_path, capsys):
    """The paper's 3B configuration: 9,214,592 trainable parameters (its 9.2M less two unused vectors)."""
    cfg = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768,
           "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 70, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    train.main(["--model", str(tmp_path), "--dry-run", "--prelude", "8", "--recurrent", "18", "--coda", "8",
                "--rank", "32"])
    out = capsys.readouterr().out
    total = [l for l in out.splitlines() if l.startswith("total")][0]
    assert total.split()[-1] == "9,214,592"
    assert "19 removed" in out and "1,662,976" in out  # the SVD bases: 7 targets x r x (in + out)
