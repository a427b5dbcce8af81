"""The device check: one command on a machine with one NVIDIA GPU, every stage in a process of its own under a
shared time budget, the results in $OUT (summary.md, summary.json, log.txt), rewritten after every stage.

    python3 extras/gpu_check.py                   # on the GPU machine (~7 min; GC_BUDGET=seconds to change)
    python extras/gpu_check.py --cpu-smoke        # every stage at tiny shapes on the CPU (the test suite runs it)
    GC_STAGES=env,decode python3 extras/gpu_check.py

Nothing is downloaded: the model folders hold random weights of Qwen2.5-0.5B's and -3B's shapes and a byte-level
tokenizer; the corpus is this repository's own sources. Stages:
    env       versions; the bf16 matmul ceiling that MFU is measured against
    train     train.py at the 0.5B shape: tok/s, MFU (extras/bench.py's train_flops) and peak memory per depth
    resume    SIGTERM inside a save, --resume, and the checkpoint bit for bit against an uninterrupted run
    shapes    the 3B shape at depths 4/8/16, with and without --checkpoint-steps, against extras/memory.py's estimate
    generate  eval.py; generate.py cached against --no-cache (fp32: the same ids), and its tok/s eager and compiled
    decode    batch 1, greedy, bf16: ours eager and compiled (CUDA graphs) against transformers' generate()
    pytest    the test suite, on the GPU
"""
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "extras")]
SMOKE = "--cpu-smoke" in sys.argv
OUT, WORK = os.environ.get("OUT") or "/tmp/gc_out", os.environ.get("GC_WORK") or "/tmp/gc_work"
BUDGET = float(os.environ.get("GC_BUDGET") or (110 if SMOKE else 420))
SHAPES = {"0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6),
          "3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, rope_theta=1e6),
          "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)}
P = dict(shape="tiny", big="tiny", split=(1, 2, 1, 8), big_split=(1, 2, 1, 8), seq=64, steps=8, depths="2,3",
         big_depths=(2, 4), ctx=32, new=12, compile=dict(backend="aot_eager")) if SMOKE else \
    dict(shape="0.5b", big="3b", split=(8, 12, 8, 32), big_split=(8, 18, 8, 32), seq=2048, steps=30, depths="4,8",
         big_depths=(4, 8, 16), ctx=512, new=64, compile=dict(mode="reduce-overhead"))


def emit(**facts):  # a stage's result: its last line that starts with "GC "
    print("GC " + json.dumps(facts), flush=True)


def gpu() -> bool:
    import torch
    return torch.cuda.is_available() and not SMOKE


def sync():
    import torch
    if gpu():
        torch.cuda.synchronize()


def timed(fn, reps, warm=2) -> float:
    for _ in range(warm):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


# ----------------------------------------------------------------------------------------------
# the stages' own code, each run as `python gpu_check.py STAGE ARGS`

def versions():
    import torch
    import transformers
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    if gpu():
        p = torch.cuda.get_device_properties(0)
        facts |= {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
    n, dtype = (8192, torch.bfloat16) if gpu() else (256, torch.float32)
    a, b = (torch.randn(n, n, device="cuda" if gpu() else "cpu").to(dtype) for _ in range(2))  # zeros run faster
    facts["peak_flops"] = 2 * n**3 / timed(lambda: a @ b, 10)
    emit(**facts, matmul_tflops=round(facts["peak_flops"] / 1e12, 1))


def folder(path, shape, weights="1"):
    """A Qwen2 folder: config.json, and with weights, model.safetensors (random, bf16) and a byte-level tokenizer.
    The embedding (the tied head) is scaled up so that greedy decoding has clear margins, as a trained model's has."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    s, (d, f, L, V) = SHAPES[shape], (SHAPES[shape][k] for k in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers", "vocab_size"))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(dict(s, model_type="qwen2", hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=32768,
                       eos_token_id=2, tie_word_embeddings=True, torch_dtype="bfloat16"), fh)
    if weights != "1":
        return emit(config_only=True)
    kv, g = s["num_key_value_heads"] * d // s["num_attention_heads"], torch.Generator().manual_seed(0)
    r = lambda *shape, std=0.02: (std * torch.randn(*shape, generator=g)).to(torch.bfloat16)
    one = lambda: torch.ones(d, dtype=torch.bfloat16)
    t = {"model.embed_tokens.weight": r(V, d, std=1.0), "model.norm.weight": one()}
    for i in range(L):
        t |= {f"model.layers.{i}.{k}": v for k, v in {
            "input_layernorm.weight": one(), "post_attention_layernorm.weight": one(),
            "self_attn.q_proj.weight": r(d, d), "self_attn.q_proj.bias": r(d), "self_attn.k_proj.weight": r(kv, d),
            "self_attn.k_proj.bias": r(kv), "self_attn.v_proj.weight": r(kv, d), "self_attn.v_proj.bias": r(kv),
            "self_attn.o_proj.weight": r(d, d), "mlp.gate_proj.weight": r(f, d), "mlp.up_proj.weight": r(f, d),
            "mlp.down_proj.weight": r(d, f)}.items()}
    save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    byte = [chr(b) for b in range(33, 127)] + [chr(b) for b in range(161, 256) if b != 173]  # GPT-2's byte table
    byte += [chr(256 + i) for i in range(256 - len(byte))]
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                                                                   + byte)}, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.save(os.path.join(path, "tokenizer.json"))
    emit(params_b=round(sum(v.numel() for v in t.values()) / 1e9, 3))


def train_wrap(*argv):
    """train.py, its steps stamped: lr_at runs at the start of every optimiser step, after the step before has
    synchronised; Windows.draw gives each step's depth. GC_STOP_AT: SIGTERM to itself inside that step's save."""
    import atexit
    import torch
    import data
    import train
    stamps, depths, seen, stop_at = [], [], {}, int(os.environ.get("GC_STOP_AT", 0))
    lr_at, draw, save = train.lr_at, data.Windows.draw, train.save_checkpoint

    def stamped(step, cfg):
        stamps.append(time.perf_counter())
        seen["cfg"] = cfg
        return lr_at(step, cfg)

    def drawn(self, cfg, step, micro, *rest):
        idx, depth = draw(self, cfg, step, micro, *rest)
        depths.append(depth)
        return idx, depth

    def saving(path, model, opt, step):
        save(path, model, opt, step)
        if step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def report():
        from bench import train_flops
        from load_qwen import load_config
        facts, cfg = {"steps": len(stamps)}, seen.get("cfg")
        if torch.cuda.is_available():
            facts["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        steps = [(b - a, d) for a, b, d in zip(stamps[2:], stamps[3:], depths[-len(stamps) + 2:])]  # 2 warm-up steps
        for depth in sorted({d for _, d in steps}):
            t, peak = statistics.median(s for s, d in steps if d == depth), float(os.environ.get("GC_PEAK") or 0)
            flops = train_flops(load_config(cfg.model), cfg, cfg.batch_size, cfg.seq_len, depth)[0]
            facts[f"depth_{depth}"] = {"step_s": round(t, 4), "tok_s": round(cfg.batch_size * cfg.seq_len / t),
                                       "tflops": round(flops / t / 1e12, 1), "mfu": round(flops / t / peak, 3)
                                       if peak else None}
        emit(**facts)
    train.lr_at, data.Windows.draw, train.save_checkpoint = stamped, drawn, saving
    atexit.register(report)
    train.cli(train.main, list(argv))


def shapes():
    """The larger shape, built in memory: a training step's time, MFU and peak memory at each depth, with and without
    --checkpoint-steps."""
    import torch
    from bench import random_ouroboros, train_flops
    B, T, peak, dev = 2, P["seq"], float(os.environ.get("GC_PEAK") or 0), "cuda" if gpu() else "cpu"
    pre, r, post, rank = P["big_split"]
    model = random_ouroboros(SHAPES[P["big"]], torch.bfloat16 if gpu() else torch.float32, torch.device(dev),
                             prelude=pre, recurrent=r, coda=post, rank=rank)
    ids, rows = torch.randint(0, SHAPES[P["big"]]["vocab_size"], (B, T), device=dev), []
    opt = torch.optim.AdamW(model.trainable().values(), lr=1e-4)
    for model.checkpoint_steps in (False, True):
        for depth in P["big_depths"]:
            def step():
                with torch.autocast(dev, torch.bfloat16, enabled=gpu()):
                    model(ids, depth, labels=ids).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            step()
            if gpu():
                torch.cuda.reset_peak_memory_stats()
            t, flops = timed(step, 3, warm=0), train_flops(model.base.config, model.config, B, T, depth)[0]
            rows.append(dict(depth=depth, checkpoint_steps=model.checkpoint_steps, step_s=round(t, 4),
                             tok_s=round(B * T / t), mfu=round(flops / t / peak, 3) if peak else None,
                             peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu() else None))
            print(json.dumps(rows[-1]), flush=True)
    emit(rows=rows)


def gen_multi(run):
    """generate.py in one process: fp32 cached and --no-cache (the same ids), bf16 eager and (on a GPU) compiled."""
    import contextlib
    import io
    import generate
    base = ["--run", run, "--prompt", "def main():\n    import os", "--max-new-tokens", str(P["new"]), "--json",
            "--temperature", "0", "--device", "cuda" if gpu() else "cpu", "--depth", P["depths"].split(",")[-1]]
    out = {}
    for name, extra in (("fp32", ["--precision", "fp32"]), ("fp32_no_cache", ["--precision", "fp32", "--no-cache"]),
                        ("bf16", ["--precision", "bf16"]), ("bf16_compiled", ["--precision", "bf16", "--compile"])):
        if name == "bf16_compiled" and SMOKE:  # the test suite compiles the step on the CPU already
            continue
        with contextlib.redirect_stdout(buf := io.StringIO()):
            generate.main(base + extra)
        out[name] = json.loads(buf.getvalue())
    emit(cached_equals_no_cache=out["fp32"]["ids"] == out["fp32_no_cache"]["ids"],
         tok_s={k: round(v["tokens_per_s"], 1) for k, v in out.items()})


def decode(path):
    """Batch 1, greedy, bf16: our cached decoding, eager and compiled (CUDA graphs on a GPU), against transformers'
    generate() on the same folder; `new` tokens after a `ctx`-token prompt, the tokens compared, the sides taking
    turns. Each side's time leaves out its prompt's pass."""
    import torch
    from transformers import AutoModelForCausalLM
    from load_qwen import load_model
    dev, dtype = torch.device("cuda" if gpu() else "cpu"), torch.bfloat16 if gpu() else torch.float32
    ctx, new = P["ctx"], P["new"]
    ours = load_model(path, dtype, dev)
    ours.setup_caches(1, ctx + new)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    prompt = torch.randint(3, 259, (1, ctx), generator=torch.Generator().manual_seed(0)).to(dev)
    forward = lambda ids, pos: ours(ids, pos=pos)
    compiled = torch.compile(forward, fullgraph=True, **P["compile"])

    def greedy(step):
        token, out = ours(prompt, pos=torch.arange(ctx, device=dev))[:, -1:].argmax(-1), []
        sync()
        t = time.perf_counter()
        for i in range(new):
            out.append(token.item())
            if i < new - 1:
                token = step(token, torch.tensor([ctx + i], device=dev))[:, -1:].argmax(-1)
        return out, time.perf_counter() - t

    def hf():
        sync()
        t0 = time.perf_counter()
        theirs.generate(prompt, max_new_tokens=1, do_sample=False)  # the prompt's pass, and the first token
        t1 = time.perf_counter()
        ids = theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ctx:].tolist()
        return ids, (time.perf_counter() - t1) - (t1 - t0)
    with torch.no_grad():
        t = time.perf_counter()
        greedy(compiled)  # compiles, and records the CUDA graphs
        compile_s, runs = round(time.perf_counter() - t, 1), {"eager": [], "compiled": [], "transformers": []}
        for _ in range(3):
            for name, fn in (("eager", lambda: greedy(forward)), ("compiled", lambda: greedy(compiled)),
                             ("transformers", hf)):
                runs[name].append(fn())
    ids = {k: v[0][0] for k, v in runs.items()}
    tok_s = {k: round((new - 1) / statistics.median(s for _, s in v), 1) for k, v in runs.items()}
    emit(compile_s=compile_s, tok_s=tok_s, compiled_over_transformers=round(tok_s["compiled"] / tok_s["transformers"],
                                                                            2),
         same_tokens={k: ids[k] == ids["transformers"] for k in ("eager", "compiled")})


def compare(a, b):
    """Whether two runs' checkpoints are equal bit for bit: every trainable tensor and AdamW's moments."""
    import torch
    from safetensors.torch import load_file
    x, y = (load_file(os.path.join(d, "checkpoint.safetensors")) for d in (a, b))
    differ = sorted(k for k in set(x) | set(y) if k not in x or k not in y or not torch.equal(x[k], y[k]))
    emit(tensors=len(x), bit_exact=not differ, differing=differ[:3])


# ----------------------------------------------------------------------------------------------
# the orchestrator

class Check:
    def __init__(self):
        self.t0, self.records, self.peak = time.time(), [], ""
        os.makedirs(OUT, exist_ok=True)
        os.makedirs(WORK, exist_ok=True)

    def left(self) -> float:
        return BUDGET - (time.time() - self.t0)

    def run(self, argv, limit, **env):
        """(exit status, the result of a stage's code or the last line, the output) of a command; stage code by
        its name, a program by its path."""
        if not argv[0].endswith(".py") and argv[0] != sys.executable:
            argv = [sys.executable, os.path.abspath(__file__), *argv, *["--cpu-smoke"] * SMOKE]
        elif argv[0].endswith(".py"):
            argv = [sys.executable, *argv]
        env = {**os.environ, "GC_PEAK": self.peak, "PYTHONUNBUFFERED": "1", **env}
        try:
            p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=max(1, min(limit, self.left())))
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = str(e.stdout or "") + str(e.stderr or ""), 124
        with open(os.path.join(OUT, "log.txt"), "a") as log:
            log.write(f"\n$ {' '.join(argv)}  (at {time.time() - self.t0:.0f} s, exit {rc})\n{text}")
        results = [json.loads(x[3:]) for x in text.splitlines() if x.startswith("GC ")]
        last = ([x for x in text.splitlines() if x.strip()] or [""])[-1][:300]
        return rc, results[-1] if results else {"last": last}, text

    def call(self, fn, *args):
        """run()'s answer for fn(*args) run here: no process to start, where isolation buys nothing."""
        import contextlib
        import io
        with contextlib.redirect_stdout(buf := io.StringIO()):
            try:
                fn(*args)
                rc = 0
            except SystemExit as e:  # a program's main: its error line, or its exit status
                rc = e.code if isinstance(e.code, int) else print(e.code) or 1
        text = buf.getvalue()
        with open(os.path.join(OUT, "log.txt"), "a") as log:
            log.write(f"\n$ {fn.__module__}.{fn.__name__}{args}  (at {time.time() - self.t0:.0f} s, exit {rc})\n{text}")
        results = [json.loads(x[3:]) for x in text.splitlines() if x.startswith("GC ")]
        return rc, results[-1] if results else {}, text

    def stage(self, name, fn, needs):
        if os.environ.get("GC_STAGES") and name not in os.environ["GC_STAGES"].split(","):
            return
        t = time.time()
        if self.left() < needs:
            status, facts = "SKIPPED", {"why": f"{self.left():.0f} s of the budget left, {needs} s needed"}
        else:
            try:
                status, facts = fn()
            except Exception as e:  # the check's own bug: recorded, and the other stages still run
                status, facts = "ERROR", {"error": repr(e)[:300]}
        self.records.append({"stage": name, "status": status, "seconds": round(time.time() - t, 1), "facts": facts})
        doc = {"mode": "cpu-smoke" if SMOKE else "gpu", "budget_s": BUDGET, "elapsed_s": round(time.time() - self.t0),
               "stages": self.records}
        with open(os.path.join(OUT, "summary.json"), "w") as f:
            json.dump(doc, f, indent=1)
        rows = [f"| {r['stage']} | {r['status']} | {r['seconds']} | {json.dumps(r['facts']).replace('|', '/')} |"
                for r in self.records]
        with open(os.path.join(OUT, "summary.md"), "w") as f:
            f.write("\n".join([f"# device check, {doc['mode']}: {doc['elapsed_s']} s of {BUDGET:.0f}", "",
                               "| stage | status | s | facts |", "|---|---|---|---|", *rows]) + "\n")


def main():
    import eval as evaluation
    import memory
    import train as trainer
    c, dev = Check(), "cpu" if SMOKE else "cuda"
    model, big, corpus, run = (os.path.join(WORK, x) for x in ("model", "big", "corpus", "run"))
    os.makedirs(corpus, exist_ok=True)
    for d in (ROOT, os.path.join(ROOT, "extras")):  # a corpus every machine has: these sources, 40 lines a document
        for f in (f for f in os.listdir(d) if f.endswith(".py")):
            lines = open(os.path.join(d, f)).read().splitlines(keepends=True) * (1 if SMOKE else 20)
            for i in range(0, len(lines), 40):
                with open(os.path.join(corpus, f"{f}.{i // 40}.txt"), "w") as out:
                    out.write("".join(lines[i:i + 40]))
    pre, r, post, rank = P["split"]
    common = ["--model", model, "--data", corpus, "--prelude", str(pre), "--recurrent", str(r), "--coda", str(post),
              "--rank", str(rank), "--device", dev, "--eval-windows", "4", "--batch-size", "2"]

    def env():
        rc, facts, _ = c.call(versions)
        c.peak = str(facts.get("peak_flops", ""))
        return ("PASS" if rc == 0 else "FAIL"), facts

    def train():
        c.run(["folder", model, P["shape"]], 120)
        flags = [*common, "--seq-len", str(P["seq"]), "--depths", P["depths"], "--steps", str(P["steps"])]
        rc, facts, _ = c.run(["train-wrap", *flags, "--out", run], 240)
        dry = c.call(trainer.cli, memory.main, flags)[2].strip().splitlines()[-2:]
        return ("PASS" if rc == 0 else "FAIL"), facts | {"dry_run": dry}

    def resume():
        flags = [*common, "--seq-len", str(P["seq"] // 4), "--depths", P["depths"], "--steps", "8", "--save-interval",
                 "3", "--eval-interval", "1000"]
        a, b, a2 = (os.path.join(WORK, x) for x in ("ra", "rb", "ra2"))
        codes = [c.run(["train-wrap", *flags, "--out", a], 120)[0],
                 c.run(["train-wrap", *flags, "--out", b], 120, GC_STOP_AT="3")[0],
                 c.run(["train-wrap", *flags, "--out", b, "--resume"], 120)[0]]
        same = c.call(compare, a, b)[1]
        if SMOKE:  # a CPU is deterministic: no control run
            return ("PASS" if same.get("bit_exact") else "FAIL"), {"exit_codes": codes, "resumed": same}
        codes.append(c.run(["train-wrap", *flags, "--out", a2], 120)[0])  # nondeterministic kernels would show here
        control = c.call(compare, a, a2)[1]
        status = "PASS" if same.get("bit_exact") else "FAIL" if control.get("bit_exact") else "INCONCLUSIVE"
        return status, {"exit_codes": codes, "resumed": same, "two_uninterrupted": control}

    def shapes():
        pre, r, post, rank = P["big_split"]
        folder(big, P["big"], weights="0")  # config.json alone: all memory.py reads
        flags = ["--model", big, "--prelude", str(pre), "--recurrent", str(r), "--coda", str(post), "--rank", str(rank),
                 "--batch-size", "2", "--seq-len", str(P["seq"]), "--depths", ",".join(map(str, P["big_depths"]))]
        text = c.call(trainer.cli, memory.main, [*flags, "--device", dev])[2]
        rc, facts, _ = c.run(["shapes"], 200)
        estimate = {int(d): (float(a), float(b)) for d, a, b in
                    re.findall(r"depth +(\d+): [\d.]+ -> ([\d.]+); with --checkpoint-steps [\d.]+ -> ([\d.]+)", text)}
        for row in facts.get("rows", []):
            row["dry_run_gib"] = estimate.get(row["depth"], (None, None))[row["checkpoint_steps"]]
        return ("PASS" if rc == 0 else "FAIL"), facts

    def generate():
        rc = c.call(trainer.cli, evaluation.main, ["--run", run, "--depths", "1," + P["depths"], "--windows", "4",
                                                   "--device", dev])[0]
        rc2, facts, _ = c.run(["gen-multi", run], 300)
        return ("PASS" if rc == rc2 == 0 and facts.get("cached_equals_no_cache") else "FAIL"), facts | {"eval_exit": rc}

    def decode():
        rc, facts, _ = c.run(["decode", model], 300)
        return ("PASS" if rc == 0 else "FAIL"), facts

    def pytest():
        rc, facts, text = c.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-n", "8",
                                 "-rfE"], c.left())
        failed = sorted({x.split()[1] for x in text.splitlines() if x.startswith(("FAILED", "ERROR"))})
        return ("PASS" if rc == 0 else "FAIL"), facts | {"failed": failed[:20]}

    for name, fn, needs in (("env", env, 10), ("train", train, 60), ("resume", resume, 40), ("shapes", shapes, 30),
                            ("generate", generate, 30), ("decode", decode, 40), ("pytest", pytest, 60)):
        if not (SMOKE and name == "pytest"):  # the smoke runs inside the test suite
            c.stage(name, fn, needs)
    print(open(os.path.join(OUT, "summary.md")).read())


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--cpu-smoke"]
    stages = {"env": versions, "folder": folder, "train-wrap": train_wrap, "shapes": shapes, "gen-multi": gen_multi,
              "decode": decode, "compare": compare}
    stages[args[0]](*args[1:]) if args else main()
