"""A trained run on disk, and the settings that make one.

A run folder holds config.json (its TrainConfig) and checkpoint.safetensors (the trainable tensors
and AdamW's moments), each replaced atomically. Every setting is declared once, in TrainConfig and
the OuroborosConfig inside it: its default, its help and its valid range. The command lines' flags
are made from those declarations and checked against them here, and so is a run's config.json.
"""
import argparse
import dataclasses
import fcntl
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from load_qwen import CheckpointError, load_ouroboros, read_json
from model import OuroborosConfig, setting

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class TrainConfig:
    model: str = setting("", "HF-format Qwen2 / Llama folder (default: SmolLM2-135M-Instruct, set up by setup.sh)",
                         "table")
    data: tuple = setting((), "files, folders, globs of .txt .md .rst .py .jsonl .jsonl.gz .parquet "
                          "(default: the Python docs)", "table")
    text_field: str = setting("text", "the .jsonl field / parquet column that holds the text", "table")
    held_out: float = setting(0.05, "fraction of documents held out", "table", gt=0, lt=1)
    seq_len: int = setting(256, "tokens per training window", "table", low=1)
    ouroboros: OuroborosConfig = field(default_factory=OuroborosConfig)
    depths: tuple = setting((4, 8), "comma-separated recurrent depths, one drawn per batch (paper: 4,8,16)",
                            items=int)
    readout: str = setting("last", "the loss read out after the drawn depth's last step, or the mean over every "
                           "step's (every: stopping after any step is trained)", choices=("last", "every"))
    label_offset: int = setting(1, "predict token t + this; 2 is the authors' double-shift objective", low=1)
    batch_size: int = setting(8, "sequences per micro-batch, per process", low=1)
    grad_accum: int = setting(1, "micro-batches per optimiser step", low=1)
    steps: int = setting(80, "optimiser steps", low=1)
    lr: float = setting(3e-3, "peak learning rate (paper: 3e-4 over 300K steps; 10x for a run 4000x shorter)", gt=0)
    min_lr_ratio: float = setting(0.1, "the cosine decays to lr x this", low=0, high=1)
    warmup: int = setting(None, "linear warmup steps (default: min(10, steps // 8))", low=0, type=int)
    weight_decay: float = setting(0.01, "AdamW weight decay, on matrices only", low=0)
    beta2: float = setting(0.95, "AdamW beta2", low=0, lt=1)
    clip: float = setting(1.0, "gradient-norm clip", gt=0)
    seed: int = setting(0, "seed of the data order, the depths and the initialisation", "seed", low=0)
    out: str = setting("", "run folder (default: runs/<variant>-s<seed>, e.g. runs/controller-causal-s0)", None)
    log_interval: int = setting(5, "optimiser steps between log lines", None, low=1)
    eval_interval: int = setting(20, "optimiser steps between held-out losses", None, low=1)
    eval_windows: int = setting(16, "held-out windows in the logged loss", None, low=1)
    save_interval: int = setting(20, "optimiser steps between checkpoints (also at the end and on a signal)",
                                 None, low=1)
    device: str = setting("auto", "auto (cuda, mps, cpu) or a torch device", None)
    precision: str = setting("auto", "bf16: bf16 base + autocast, fp32 masters; auto: bf16 on GPUs (and, to decode, "
                             "on CPUs with native bf16: AVX512-BF16 or AMX), fp32 otherwise", None,
                             choices=("auto", "fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the recurrent step", None)
    checkpoint_steps: bool = setting(False, "recompute each recurrent step in backward (memory flat in depth)", None)
    final_eval: bool = setting(True, "run eval.py on the run when training ends", None)


def declared() -> dict:
    """{name: field} of every setting, OuroborosConfig's in place of the field that holds it."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        out |= {g.name: g for g in dataclasses.fields(f.type)} if dataclasses.is_dataclass(f.type) else {f.name: f}
    return out


def rule(m) -> str:
    """A declared range in words."""
    if "choices" in m:
        return f"one of {', '.join(m['choices'])}"
    if m.get("low") is not None and m.get("high") is not None:
        return f"in {m['low']}..{m['high']}"
    return " and ".join(f"{w} {m[k]}" for k, w in WORDS.items() if m.get(k) is not None)


WORDS = {"low": "at least", "gt": "above", "lt": "below", "high": "at most"}
BOUNDS = {"low": lambda v, b: v >= b, "gt": lambda v, b: v > b, "lt": lambda v, b: v < b, "high": lambda v, b: v <= b}
SETTINGS = declared()
OUROBOROS = {f.name for f in dataclasses.fields(OuroborosConfig)}  # the settings that live in cfg.ouroboros
RULES = {name: rule(f.metadata) for name, f in SETTINGS.items()}


class Parser(argparse.ArgumentParser):
    """argparse, where a flag it cannot parse is bad input like any other: the one `error:` line."""

    def error(self, message):
        raise ValueError(f"{message} (see --help)")


def add_flags(parser, names=None, defaults=True):
    """`parser` with a flag for every declared setting (or those in `names`): its help and range, and its
    default, unless `defaults` is False: then a flag left out is absent from the parsed namespace."""
    for name, f in SETTINGS.items():
        if names is not None and name not in names:
            continue
        m, flag, default = f.metadata, "--" + name.replace("_", "-"), f.default
        text = m["help"] + (f" ({RULES[name]})" if RULES[name] else "") + (f"; default {default}" if default else "")
        kw = {} if defaults else {"default": argparse.SUPPRESS}
        if isinstance(default, bool):
            parser.add_argument(f"--no-{flag[2:]}" if default else flag, dest=name, help=text,
                                action="store_false" if default else "store_true", **kw)
        elif isinstance(default, tuple) and "items" not in m:
            parser.add_argument(flag, nargs="*", help=text, **({"default": list(default)} | kw))
        else:  # a tuple of items is given comma-separated
            kind = str if "items" in m else m.get("type", type(default))
            parser.add_argument(flag, type=kind, help=text, choices=m.get("choices"), **({"default": default} | kw))
    return parser


def settings(flat: dict) -> TrainConfig:
    """The TrainConfig of {name: value} (the parsed flags, a run's config.json), a name left out taking
    its default; paths made absolute and the defaults that follow other settings filled in. Not checked:
    problems() says what is wrong with it."""
    flat = {k: v for k, v in flat.items() if k in SETTINGS}
    cfg = TrainConfig(**{k: v for k, v in flat.items() if k not in OUROBOROS},
                      ouroboros=OuroborosConfig(**{k: v for k, v in flat.items() if k in OUROBOROS}))
    if isinstance(cfg.data, (list, tuple)):  # stored absolute: a run works from any directory
        cfg.data = tuple(os.path.abspath(s) if isinstance(s, str) else s for s in cfg.data)
    if isinstance(cfg.model, str) and cfg.model:
        cfg.model = os.path.abspath(cfg.model)
    if isinstance(cfg.depths, str):  # --depths 4,8; left as given when it is no list of integers
        cfg.depths = depth_list(cfg.depths)
    elif isinstance(cfg.depths, list):
        cfg.depths = tuple(cfg.depths)
    if cfg.warmup is None:
        cfg.warmup = max(0, min(10, cfg.steps // 8))  # a short run keeps room to decay
    if isinstance(cfg.out, str):
        cfg.out = os.path.abspath(cfg.out or os.path.join(ROOT, "runs", f"{variant(cfg)}-s{cfg.seed}"))
    return cfg


def variant(cfg: TrainConfig) -> str:
    """A run's variant, the name its seeds share: controller-causal, static, gate+norm, ... (-r8: rank 8
    instead of the default; -t+2: trained on token t+2)."""
    oc = cfg.ouroboros
    if oc.variant == "none":
        name = "gate+norm" if oc.gate else "norm-only"
    else:
        name = {"controller": f"controller-{oc.pool}", "static": "static"}.get(oc.variant, str(oc.variant))
        name += ("" if oc.gate else "-nogate") + ("" if oc.rank == SETTINGS["rank"].default else f"-r{oc.rank}")
    return name + ("" if cfg.label_offset == 1 else f"-t+{cfg.label_offset}")


def depth_list(text: str):
    """'4,8,16' -> (4, 8, 16); the text itself when it is not a list of integers (problems() says so)."""
    try:
        return tuple(int(d) for d in text.split(","))
    except ValueError:
        return text


def flag(name: str) -> str:
    """The flag of a declared setting: --name, or --no-name for a switch that is on by default."""
    return ("--no-" if SETTINGS[name].default is True else "--") + name.replace("_", "-")


def problems(cfg: TrainConfig) -> list:
    """Every setting outside its declared type or range, and those that can only fail together."""
    found = []
    for name, f in SETTINGS.items():
        v, flag = getattr(cfg.ouroboros if name in OUROBOROS else cfg, name), "--" + name.replace("_", "-")
        m, kind = f.metadata, type(f.default) if f.default is not None else f.metadata["type"]
        if name == "depths" and not isinstance(v, tuple):
            found.append(f"--depths {v!r}: give comma-separated integers, e.g. 4,8,16")
        elif type(v) is not kind and not (kind is float and type(v) is int):
            found.append(f"{flag} {v!r} is not {'a list' if kind is tuple else kind.__name__}")
        elif isinstance(v, tuple):
            item = m.get("items", str)
            if not all(type(x) is item for x in v) or (name == "depths" and not v):
                found.append(f"{flag} {v!r}: give {'integers' if item is int else 'paths'}")
        elif isinstance(v, float) and not math.isfinite(v):
            found.append(f"{flag} {v} must be finite" + (f" and {RULES[name]}" if RULES[name] else ""))
        elif v not in m.get("choices", (v,)) or any(not test(v, m[k]) for k, test in BOUNDS.items() if k in m):
            found.append(f"{flag} {v} must be {RULES[name]}")
    if found:
        return found
    if not 0 <= cfg.warmup < cfg.steps:
        found.append(f"--warmup {cfg.warmup} must be in 0..{cfg.steps - 1} (below --steps)")
    if not all(1 <= d <= cfg.ouroboros.max_steps for d in cfg.depths):
        found.append(f"--depths {','.join(map(str, cfg.depths))}: each depth must be in 1..{cfg.ouroboros.max_steps}")
    return found


def values(cfg: TrainConfig) -> dict:
    """{name: value} of every setting, flat, as the flags name them."""
    return {name: getattr(cfg.ouroboros if name in OUROBOROS else cfg, name) for name in SETTINGS}


def placement(device: str = "auto", precision: str = "auto", decoding: bool = False):
    """(torch device, base dtype, autocast). auto: CUDA, then MPS, then the CPU. bf16 precision means a
    bf16 base under bf16 autocast with fp32 trainable masters; auto takes it on GPUs and, for decoding,
    on a CPU with native bf16 (not measured here; README, Decoding speed)."""
    if device == "auto":
        if torch.cuda.is_available():
            where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            where = torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    else:
        try:  # refused now, not when the first tensor moves there
            where = torch.device(device)
            if where.type == "cuda" and where.index is None:  # set_device and DDP need an index: this rank's GPU
                where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.empty(0, device=where)
        except Exception as e:  # a bad name, a backend this torch lacks (each fails its own way), no such device
            raise ValueError(f"--device {device}: no such device here ({str(e).splitlines()[0][:100]}); "
                             "use auto or cpu") from None
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: choose auto, fp32 or bf16")
    native = where.type in ("cuda", "mps") or (decoding and where.type == "cpu" and native_bf16_cpu())
    half = precision == "bf16" or (precision == "auto" and native)
    return where, torch.bfloat16 if half else torch.float32, torch.autocast(where.type, torch.bfloat16, enabled=half)


def native_bf16_cpu() -> bool:
    """Whether this x86 CPU computes in bf16 itself (AVX512-BF16 or AMX tiles) rather than converting to fp32;
    False on others (Arm's bf16 is not detected)."""
    return any(getattr(torch.cpu, f"_is_{isa}_supported", lambda: False)() for isa in ("avx512_bf16", "amx_tile"))


# ----------------------------------------------------------------------------------------------
# the run on disk

def write_atomic(file: str, data: bytes):
    """Replace `file` with `data` all at once: a temporary file, synced to disk, then a rename. A failed
    write (a full disk) raises OSError, removes the temporary file and leaves `file` as it was."""
    tmp = file + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_settings(run: str) -> TrainConfig:
    """The TrainConfig a run was trained with, from its config.json, checked as the flags are."""
    file = os.path.join(run, "config.json")
    raw = read_json(file, "--run takes a folder written by train.py", "it was not written by train.py")
    flat = {k: v for k, v in raw.items() if k != "ouroboros"} | (raw.get("ouroboros") or {})
    missing = [name for name in SETTINGS if name not in flat]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it was not written by train.py")
    cfg = settings(flat)
    if bad := problems(cfg):
        raise CheckpointError(f"{file}: {'; '.join(bad)}; it was not written by train.py, or was edited")
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise CheckpointError(f"{file} names the model folder {cfg.model}, which is not there (moved or deleted?): "
                              f"put it back, or set \"model\" in {file} to where it is now")
    return cfg


RUN_FILES = {"config.json", "checkpoint.safetensors", "exit.safetensors", "lock"}  # what a run folder holds


@contextmanager
def claim(given: dict, resume: bool):
    """The settings of the run train.py is about to write, once its --out is known to take it: a new or
    empty folder, or a run of train.py's own, never a model folder or anything else; not being written
    by another train.py (its lock is held while the block runs); and on --resume, the settings the run
    was trained with. Everything that can only fail is refused at once, before anything loads."""
    cfg = settings(given)
    found, out = problems(cfg), cfg.out
    ckpt, own = os.path.join(out, "checkpoint.safetensors"), os.path.join(out, "config.json")
    others = sorted(set(os.listdir(out)) - RUN_FILES) if os.path.isdir(out) else []
    if os.path.exists(out) and not os.path.isdir(out):
        found.append(f"--out {out} is a file: name a folder for the run")
    elif os.path.isdir(out) and (os.path.exists(own) and not is_run(out) or others and not os.path.exists(own)):
        found.append(f"--out {out} holds {', '.join(others[:3]) or 'config.json'}{' ...' * (len(others) > 3)}, "
                     "not a run of train.py: name a new or empty folder, or a run's")
    elif os.path.exists(ckpt) and not resume:
        found.append(f"{ckpt} exists: pass --resume to continue that run, or --out for a new one")
    elif resume and not os.path.exists(ckpt):
        found.append(f"--resume: {out} holds no checkpoint to continue")
    if found:
        raise ValueError("; ".join(found))
    if resume:
        cfg = resumed(out, given, cfg)
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for them all
        yield cfg
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "lock"), "w") as lock:  # the OS releases a killed process's lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another train.py is writing {out}: wait for it to end, or choose another "
                             "--out") from None
        yield cfg


def is_run(folder: str) -> bool:
    try:
        read_settings(folder)
        return True
    except ValueError:
        return False


def resumed(out: str, given: dict, asked: TrainConfig) -> TrainConfig:
    """The run's own settings, with those given on the command line that may change: more --steps, and
    those that change nothing the run computes (where it logs, evaluates, saves, runs)."""
    stored = read_settings(out)
    free = [n for n, f in SETTINGS.items() if f.metadata["scope"] is None] + ["steps"]
    old, new = values(stored), values(asked)
    differ = [n for n in given if n not in free and new[n] != old[n]]
    if differ:
        raise ValueError(f"--resume: {out} was trained with " + ", ".join(f"{n} {old[n]!r}" for n in differ)
                         + ", not " + ", ".join(f"{new[n]!r}" for n in differ) + ": a resumed run keeps what "
                         f"makes its model and data; only more --steps and {', '.join(map(flag, free[:-1]))} "
                         "may change (leave the others out to keep the run's)")
    try:
        with safe_open(os.path.join(out, "checkpoint.safetensors"), framework="pt") as f:
            at = int(f.metadata()["step"])
    except Exception as e:  # safetensors' own error type, a missing or bad step
        raise CheckpointError(f"cannot read {out}/checkpoint.safetensors ({e!r}): it is corrupt, or not one of ours")
    cfg = settings(old | {n: v for n, v in new.items() if n in given})
    if cfg.steps <= at:
        raise ValueError(f"--resume --steps {cfg.steps}: {out} holds step {at} already; give --steps above {at}")
    return cfg


def save_checkpoint(path: str, model, opt, step: int, cfg: TrainConfig):
    """The trainable tensors and AdamW's moments, in one safetensors file. A failed write (a full disk)
    raises OSError and leaves the previous checkpoint as it was."""
    params = model.trainable()
    tensors = {f"model.{n}": p.detach().cpu() for n, p in params.items()}
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{n}.{k}"] = v.detach().cpu().reshape(v.shape)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:  # a finite update that overflowed: the loop's non-finite guard cannot see it coming
        raise ValueError(f"{bad[0]} is not finite after step {step}: the run diverged; lower --lr (now {cfg.lr:g}). "
                         f"{path} was left as it was")
    # serialised here, written by write_atomic: safetensors' save_file reports a full disk as no OSError
    write_atomic(path, save(tensors, metadata={"step": str(step)}))


def load_checkpoint(path: str, model, opt=None) -> int:
    """Restore the trainable tensors (and AdamW's state); returns the step it was saved at."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: that run has not saved a checkpoint (it saves every --save-interval)")
    try:
        with safe_open(path, framework="pt") as f:
            step = int(f.metadata()["step"])
        tensors = load_file(path)
        if step < 0:
            raise ValueError(f"step {step}")
    except Exception as e:  # safetensors' own error type, a missing or bad step
        raise CheckpointError(f"cannot read checkpoint {path}: {e!r}; it is corrupt, or not one of ours") from e
    params = model.trainable()
    names = {k[len("model."):] for k in tensors if k.startswith("model.")}
    if names != set(params):
        raise CheckpointError(f"{path} holds {sorted(names ^ set(params))[:4]}... that do not fit this model: "
                              "train with the same --variant / --no-gate / --rank as the run that saved it")
    # Every tensor must be one a run writes, of its shape, and finite (a run never saves a NaN).
    want = {f"model.{n}": p.shape for n, p in params.items()}
    want |= {f"optim.{n}.{k}": s for n, p in params.items() for k, s in
             (("step", ()), ("exp_avg", p.shape), ("exp_avg_sq", p.shape))}
    bad = [f"{k} {tuple(t.shape)} {t.dtype}" for k, t in tensors.items()
           if k not in want or t.shape != want[k] or not t.is_floating_point() or not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} unexpected, "
                              "of the wrong shape or not finite; it is corrupt, or not one of ours")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"model.{n}"])
    if opt is not None:
        for n, p in params.items():
            state = {k.rsplit(".", 1)[1]: v if k.endswith(".step") else v.to(p.device)  # AdamW keeps step on the CPU
                     for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
            if state:
                opt.state[p] = state
    return step


def load_run(run: str, dtype=torch.float32, device="cpu", config=None):
    """(model, settings) of a trained run: the pruned base with the run's controller, gate and norms.
    `config`: its model's Qwen2Config, if already read. (Its exit head, if any: exits.attach_exit_head.)"""
    cfg = read_settings(run)
    model = load_ouroboros(cfg.model, cfg.ouroboros, dtype, device, config)
    load_checkpoint(os.path.join(run, "checkpoint.safetensors"), model)
    return model.eval(), cfg


def cli(main, argv):
    """Run a command line's main(argv): bad input ends in one line and exit status 1. Bad input is what
    this project raises for it: ValueError (CheckpointError is one) for a value or a file's content it
    refuses, OSError for a file it cannot read or write. Anything else is a bug: it keeps its traceback."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
