"""What the tests build: tiny random HF checkpoints written by transformers itself (the oracle), a tiny model
folder with a real byte-level BPE tokenizer, a corpus, and train.py's flags for a run of seconds.

Everything the tests compare with a CPU reference is pinned to the CPU (--device cpu, models built on the CPU):
on a GPU machine device "auto" would move it to CUDA. Tests marked `cuda` run only where CUDA is."""
import copy
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "extras"))  # the extras' own tests import them as modules, after the reference
sys.path.insert(0, ROOT)

# One thread: the tests' tensors are tiny, and on a machine shared with other work two OpenMP threads waiting on
# each other made them up to 50x slower. Programs the tests start get OMP_NUM_THREADS=1.
torch.set_num_threads(1)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (skipped elsewhere: needs CUDA)")
    config.addinivalue_line("markers", "compile: runs torch.compile (deselect with -m 'not compile')")


SLOWEST = ("test_qwen_gguf.py", "test_gpu_check.py", "test_train.py", "test_device.py")  # a minute or so each


def pytest_collection_modifyitems(items):
    """The slowest files first: with -n 2 --dist loadfile, the two workers then end at about the same time."""
    items.sort(key=lambda item: item.fspath.basename not in SLOWEST)


TINY = dict(layers=4, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=128, tied=False)  # make_checkpoint's shape


def make_checkpoint(path, arch="qwen2", max_shard_size=None, disk_dtype=torch.float32, seed=0, **kw):
    """Save a random model with transformers' save_pretrained; return the HF model (fp32, eager). kw:
    the shape (TINY's keys) and any other config field.

    Every weight is random: biases non-zero, norm weights away from 1, so no term can hide."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    Config, Model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    s = {**TINY, **{k: kw.pop(k) for k in list(kw) if k in TINY}}
    cfg = Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                 num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                 tie_word_embeddings=s["tied"], rope_theta=kw.pop("rope_theta", 10000.0), rms_norm_eps=1e-6, **kw)
    cfg._attn_implementation = "eager"  # the oracle: transformers' plain-matmul attention and mask
    torch.manual_seed(seed)
    model = Model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        if disk_dtype != torch.float32:  # the oracle keeps fp32 buffers (RoPE) but sees the rounded weights
            for p in model.parameters():
                p.copy_(p.to(disk_dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    copy.deepcopy(model).to(disk_dtype).save_pretrained(path, **kw)
    return model


def ouroboros(path, dtype=torch.float32, **oc):
    """The Ouroboros model of a folder, on the CPU, with the OuroborosConfig of `oc` (prelude, recurrent, ...)."""
    from load_qwen import load_ouroboros
    from model import OuroborosConfig
    return load_ouroboros(path, OuroborosConfig(**oc), dtype, "cpu")


def splits(sources, model, held_out=0.05, text_field="text", cache=None):
    """data.load_splits of these sources and model folder: the (train, held_out) token streams."""
    import data
    from train import TrainConfig
    cfg = TrainConfig(model=model, data=list(sources), held_out=held_out, text_field=text_field)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "CACHE", cache or data.CACHE)
        return data.load_splits(cfg)


def randomise_trainable(model, seed=0, scale=0.3):
    """Move every trainable tensor off its initial value so the modulations are really non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))


def byte_tokens():
    """GPT-2's byte -> printable character table: the 256 base tokens of a byte-level BPE."""
    bs = [b for lo, hi in (("!", "~"), ("¡", "¬"), ("®", "ÿ")) for b in range(ord(lo), ord(hi) + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]


def tokenizer_vocab():
    """Special tokens first (ids 0-2, eos = 2 as in SmolLM2), then bytes, then merged tokens."""
    return SPECIAL + byte_tokens() + ["Ġt", "he", "Ġthe", "Ġa", "in"]


def make_model_folder(path, layers=5, seed=0):
    """A tiny Llama folder with a real byte-level BPE tokenizer.json, ready for train.py."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = tokenizer_vocab()
    make_checkpoint(path, arch="llama", layers=layers, vocab=len(vocab), tied=True, seed=seed,
                    eos_token_id=2, bos_token_id=1)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.save(os.path.join(path, "tokenizer.json"))
    return path


WORDS = "the cat sat on a mat and then the dog ran in the park while birds sang".split()


def make_corpus(path, n_docs=30, seed=0):
    """Text documents, each with a unique marker so tests can tell which side a document fell on."""
    import random
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    for i in range(n_docs):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        with open(os.path.join(path, f"doc{i:03d}.txt"), "w") as f:
            f.write(f"DOC{i:03d}X {body}\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Every test's token files go to a private cache, never the repository's cache/tokens."""
    import data
    cache, real = str(tmp_path_factory.mktemp("tokens")), data.CACHE
    data.CACHE = cache
    yield cache
    data.CACHE = real


@pytest.fixture(scope="module")
def setup(tmp_path_factory, token_cache):
    """(a tiny model folder, a corpus, the token cache), for the training and evaluation tests."""
    tmp = tmp_path_factory.mktemp("train")
    model = make_model_folder(str(tmp / "model"))
    corpus = make_corpus(str(tmp / "corpus"))
    return model, corpus, token_cache


def train_args(setup, out, *extra):
    """train.py's flags for a tiny run of `setup` (model, corpus, token cache) into `out`, on the CPU."""
    model, corpus, _ = setup
    return ["--model", model, "--data", corpus, "--out", out, "--prelude", "1", "--recurrent", "2", "--coda", "1",
            "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--eval-interval", "2", "--save-interval", "2",
            "--eval-windows", "4", "--log-interval", "1", "--depths", "1,2,3", "--rank", "8",
            "--device", "cpu", *extra]


def logged_losses(text):
    """The losses train.py logged, in order."""
    return [float(line.split("  loss ")[1].split()[0]) for line in text.splitlines()
            if line.startswith("step") and "  loss " in line]


# A program run as `python <script> ...` whose token files go to the cache named first: python WITH_CACHE cache
# script args (with -c). The script runs as __main__, as from the shell; data.CACHE is set before it imports data.
WITH_CACHE = """import runpy, sys
sys.path.insert(0, {root!r})
import data
data.CACHE = sys.argv.pop(1)
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cli_error(main, argv):
    """The one line train.cli ends `main(argv)` with on a mistake (the exit status is 1 whenever sys.exit gets a
    string); fails if it returned instead."""
    from train import cli
    with pytest.raises(SystemExit) as e:
        cli(main, argv)
    assert isinstance(e.value.code, str), f"exit status {e.value.code}, not an error line"
    return e.value.code
