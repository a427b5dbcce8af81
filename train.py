"""Train Ouroboros: the controller, gate and step norms over a frozen, pruned decoder.

    python train.py                        # SmolLM2-135M on the Python docs, offline
    python train.py --model DIR --data DIR --prelude 8 --recurrent 18 --coda 8 --depths 4,8,16 ...
    torchrun --nproc_per_node 8 train.py   # DistributedDataParallel
"""
import argparse, dataclasses, inspect, json, math, os, re, signal, sys, time
from types import SimpleNamespace
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from safetensors import safe_open
from safetensors.torch import load_file, save

from controller import VARIANTS
from data import Windows, load_splits, write_atomic
from load_qwen import DEFAULT_MODEL, load_config, load_ouroboros
from model import Ouroboros, OuroborosConfig

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class TrainConfig(OuroborosConfig):  # every setting, once: a flag each, the comment its help
    model: str = DEFAULT_MODEL  # an HF-format Qwen2 / Llama folder
    data: list[str] = dataclasses.field(default_factory=list)  # files, folders, globs (default: Python's docs)
    text_field: str = "text"  # the text's .jsonl field or parquet column
    held_out: float = 0.05  # the fraction of documents held out
    seq_len: int = 256  # tokens per window
    depths: list[int] = dataclasses.field(default_factory=lambda: [4, 8])  # one drawn per batch
    readout: Literal["last", "every"] = "last"  # the loss after the last step, or every step's mean
    label_offset: int = 1  # predict token t + this (2: the authors' double shift)
    batch_size: int = 8  # sequences per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # the peak learning rate (the paper: 3e-4)
    min_lr_ratio: float = 0.1  # the cosine decays to lr x this
    warmup: int = -1  # linear warmup steps (-1: min(10, steps // 8))
    weight_decay: float = 0.01  # AdamW's, on matrices
    beta2: float = 0.95  # AdamW's beta2
    clip: float = 1.0  # the gradient-norm clip
    seed: int = 0  # the data order, the depths and the initialisation
    # From here on, how a run runs: --resume may change these.
    steps: int = 80  # optimiser steps
    out: str = ""  # the run folder (default: runs/<variant>-s<seed>)
    log_interval: int = 5  # steps between log lines
    eval_interval: int = 20  # steps between held-out losses
    eval_windows: int = 16  # held-out windows in that loss
    save_interval: int = 20  # steps between checkpoints (also at the end and on a signal)
    device: str = "auto"  # auto (cuda:LOCAL_RANK, else cpu) or a torch device
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16: a bf16 base under autocast (auto: on GPUs)
    tf32: bool = False  # fp32 matmuls on CUDA in TF32
    compile: bool = False  # torch.compile the recurrent step
    checkpoint_steps: bool = False  # recompute each step in backward: memory flat in depth


SETTINGS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
FREE = set(list(SETTINGS)[list(SETTINGS).index("steps"):])  # what --resume may change


def parse(argv=None, description=__doc__):
    """(TrainConfig, --resume) of a command line; a resumed run keeps its config.json's settings."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # only the flags given
    source = inspect.getsource(OuroborosConfig) + inspect.getsource(TrainConfig)
    helps, flag = dict(re.findall(r"^ +(\w+): .*?# (.*)$", source, re.M)), lambda k: "--" + k.replace("_", "-")
    for key, kind in SETTINGS.items():
        default, help = getattr(TrainConfig(), key), helps[key]
        if isinstance(default, bool):
            p.add_argument(flag(key), action=argparse.BooleanOptionalAction, help=help)
        elif key == "data":
            p.add_argument(flag(key), nargs="*", help=help)
        elif key == "depths":
            p.add_argument(flag(key), type=lambda s: [int(d) for d in s.split(",")], help=f"{help} (default: 4,8)")
        else:
            choices = list(VARIANTS) if key == "variant" else get_args(kind) or None
            p.add_argument(flag(key), type=type(default), choices=choices, help=f"{help} (default {default})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    given = vars(p.parse_args(argv))
    resume = given.pop("resume", False)
    given |= {k: os.path.abspath(given[k]) for k in ("model", "out") if k in given}
    given |= {"data": list(map(os.path.abspath, given["data"]))} if "data" in given else {}
    cfg = TrainConfig(**given)
    cfg.out = cfg.out or os.path.join(ROOT, "runs", f"{cfg.variant}-s{cfg.seed}")
    if resume:
        stored = read_config(cfg.out)
        if changed := [f"{flag(k)} {getattr(stored, k)}" for k, v in given.items()
                       if k not in FREE and v != getattr(stored, k)]:
            raise ValueError(f"--resume: {cfg.out} was trained with {', '.join(changed)}; only more --steps and "
                             f"{', '.join(map(flag, sorted(FREE - {'steps'})))} may change")
        cfg = dataclasses.replace(stored, **given | {"out": cfg.out})
    cfg.warmup = min(10, cfg.steps // 8) if cfg.warmup < 0 else cfg.warmup
    bad = [(not all(1 <= d <= cfg.max_depth for d in cfg.depths), f"--depths: each in 1..{cfg.max_depth}"),
           (not 0 < cfg.held_out < 1, "--held-out must lie between 0 and 1"),
           (min(cfg.seq_len, cfg.batch_size, cfg.grad_accum, cfg.steps, cfg.rank, cfg.style, cfg.label_offset,
                cfg.log_interval, cfg.eval_interval, cfg.eval_windows, cfg.save_interval) < 1,
            "counts and intervals (--steps, --rank, ...) must be at least 1"),
           (not 0 <= cfg.warmup < cfg.steps, f"--warmup {cfg.warmup} must be below --steps {cfg.steps}"),
           (not (cfg.lr > 0 and cfg.clip > 0), "--lr and --clip must be positive")]
    if found := [what for wrong, what in bad if wrong]:
        raise ValueError("; ".join(found))
    return cfg, resume


def read_config(run: str) -> TrainConfig:  # a setting added since the run takes its default
    with open(os.path.join(run, "config.json")) as f:
        return TrainConfig(**{k: v for k, v in json.load(f).items() if k in SETTINGS})


def placement(device: str, precision: str):
    """(device, the base's dtype, autocast); what trains stays fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.device(device)
    if where.type == "cuda" and where.index is None:  # this process's GPU
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    half = precision == "bf16" or (precision == "auto" and where.type != "cpu")
    return where, torch.bfloat16 if half else torch.float32, torch.autocast(where.type, torch.bfloat16, enabled=half)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def setup(cfg: TrainConfig, resume: bool) -> SimpleNamespace:
    """Processes, device, data, model, optimiser, and the checkpoint to resume."""
    s = SimpleNamespace(rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)))
    s.device, dtype, s.autocast = placement(cfg.device, cfg.precision)
    if s.device.type == "cuda":
        torch.cuda.set_device(s.device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    config = load_config(cfg.model)
    cfg.split(config.num_hidden_layers)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context ({config.max_position_embeddings})")
    # The data first: a wrong --data fails fast, and no collective waits on the tokenising.
    s.train, s.held = (Windows(t, cfg.seq_len, cfg.label_offset) for t in load_splits(cfg))
    if s.world > 1:
        dist.init_process_group("nccl" if s.device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)  # the controller's initialisation
    s.model = load_ouroboros(cfg.model, cfg, dtype, s.device, config)
    s.model.checkpoint_steps = cfg.checkpoint_steps
    if cfg.compile:  # after one recompile the step index is symbolic: two graphs for any depth
        s.model.step = torch.compile(s.model.step)
    s.params, s.opt = s.model.trainable(), s.model.optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2))
    s.net = s.model if s.world == 1 else DDP(s.model, device_ids=None if s.device.type == "cpu" else [s.device.index])
    s.log = print if s.rank == 0 else lambda *a, **k: None
    s.start = load_checkpoint(f"{cfg.out}/checkpoint.safetensors", s.model, s.opt) if resume else 0
    s.log(f"device {s.device}, {s.train.n:,} training / {s.held.n:,} held-out windows of {cfg.seq_len} tokens, "
          f"{sum(p.numel() for p in s.params.values()):,} trainable parameters" + f"; from step {s.start}" * resume)
    if s.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(f"{cfg.out}/config.json", json.dumps(dataclasses.asdict(cfg), indent=1).encode())
    s.caught = []  # SIGTERM or SIGINT: the step finishes, saves and exits
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: s.caught.append(signum))
    return s


def train(cfg: TrainConfig, resume: bool = False):
    """The loop: learning rate, micro-steps, clip, step, log, eval, save."""
    s = setup(cfg, resume)
    t0, loss_sum, good, bad, done, stop = time.time(), torch.zeros((), device=s.device), 0, 0, s.start, False
    for step in range(s.start, cfg.steps):
        done, lr = step + 1, lr_at(step, cfg)
        for group in s.opt.param_groups:
            group["lr"] = lr
        loss = 0.0
        for micro in range(cfg.grad_accum):
            idx, depth = s.train.draw(cfg, step, micro, s.rank, s.world)
            x, y = s.train.batch(idx, s.device)
            with s.autocast:  # DDP syncs every micro-step: few parameters train
                micro_loss = s.net(x, depth=depth, labels=y, every=cfg.readout == "every")
                (micro_loss / cfg.grad_accum).backward()
            loss += micro_loss.detach()  # no .item(): no sync per micro-step
        norm = torch.nn.utils.clip_grad_norm_(s.params.values(), cfg.clip)
        flags = torch.stack([(~(loss + norm).isfinite()).float(), torch.tensor(len(s.caught) + 0.0, device=s.device)])
        if s.world > 1:  # every process skips? stops?
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, stop = (f > 0 for f in flags.tolist())
        if skip:  # nothing is updated; three in a row end the run
            s.log(f"step {done:5d}/{cfg.steps}  update skipped: a non-finite loss or gradient norm")
            if (bad := bad + 1) == 3:
                raise ValueError(f"steps {done - 2}..{done} were all non-finite: the run diverged; lower --lr")
        else:
            s.opt.step()
            loss_sum, good, bad = loss_sum + loss, good + 1, 0
        s.opt.zero_grad(set_to_none=True)
        line = ""
        if done % cfg.log_interval == 0 or done == cfg.steps:
            if s.world > 1:
                dist.all_reduce(loss_sum)
            tok_s = (done - s.start) * cfg.batch_size * cfg.grad_accum * s.world * cfg.seq_len / (time.time() - t0)
            mean = loss_sum.item() / s.world / good / cfg.grad_accum if good else math.nan
            line, loss_sum, good = f"  loss {mean:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s", loss_sum.zero_(), 0
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            t = "" if cfg.label_offset == 1 else f", token t+{cfg.label_offset}"
            line += f"  held-out {held_out_loss(s, cfg):.4f} (depth {max(cfg.depths)}{t})"
        if line:
            s.log(f"step {done:5d}/{cfg.steps}{line}", flush=True)
        if s.rank == 0 and (done == cfg.steps or stop or done % cfg.save_interval == 0 and not bad):
            save_checkpoint(f"{cfg.out}/checkpoint.safetensors", s.model, s.opt, done)
        if stop:
            break
    if s.world > 1:  # leave together: a teardown during rank 0's save can abort it
        dist.barrier()
        dist.destroy_process_group()
    if stop or s.caught:  # a signal to any process, or one during the last save
        signum = (s.caught or [signal.SIGTERM])[0]
        s.log(f"stopped by {signal.Signals(signum).name} after step {done}: --resume continues")
        sys.exit(128 + signum)
    s.log(f"trained {done - s.start} steps in {(time.time() - t0) / 60:.1f} min")


@torch.no_grad()
def held_out_loss(s: SimpleNamespace, cfg: TrainConfig) -> float:
    idx, total = s.held.spread(cfg.eval_windows), 0.0
    for i in range(0, len(idx), cfg.batch_size):
        x, y = s.held.batch(idx[i:i + cfg.batch_size], s.device)
        with s.autocast:
            total += s.model(x, depth=max(cfg.depths), labels=y).float().item() * len(x)
    return total / len(idx)


def save_checkpoint(path: str, model: Ouroboros, opt, step: int):  # what trains, and AdamW's moments
    tensors = {f"model.{n}": p.detach().cpu() for n, p in model.trainable().items()}
    for n, p in model.trainable().items():
        tensors |= {f"optim.{n}.{k}": v.detach().cpu() for k, v in opt.state.get(p, {}).items()}
    write_atomic(path, save(tensors, metadata={"step": str(step)}))


def load_checkpoint(path: str, model: Ouroboros, opt=None) -> int:  # -> the step it was saved at
    with safe_open(path, "pt") as f:
        step, tensors = int(f.metadata()["step"]), load_file(path)
    with torch.no_grad():
        for n, p in model.trainable().items():
            p.copy_(tensors[f"model.{n}"])
            if opt:  # AdamW keeps its step count on the CPU
                opt.state[p] = {k.rsplit(".", 1)[1]: v if k.endswith(".step") else v.to(p.device)
                                for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
    return step


def cli(main, argv=None):  # a mistake (ValueError, OSError) ends in one `error:` line
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")


def main(argv=None):
    cfg, resume = parse(argv)
    ckpt, own = f"{cfg.out}/checkpoint.safetensors", f"{cfg.out}/config.json"
    ours = os.path.isfile(own) and '"depths"' in open(own).read()  # a run of train.py's
    if os.path.exists(cfg.out) and not ours and (os.path.isfile(cfg.out) or os.listdir(cfg.out)):
        raise ValueError(f"--out {cfg.out} is not a run of train.py, nor a new or empty folder")
    if os.path.exists(ckpt) != resume:
        raise ValueError(f"--resume: {cfg.out} holds no checkpoint" if resume else
                         f"{ckpt} exists: pass --resume to continue that run, or another --out")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        train(cfg, resume)
    finally:  # the process's own, again
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    cli(main)
