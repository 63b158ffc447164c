"""Tests for project 3: the LLaMA-style model against independent references (PyTorch ops, HF transformers),
the HF export/import round trip, data preparation, training (resume, overfit) and the bad-input errors.

Run: uv run pytest -q phase1_foundation/project3_pretrain        (slow ones: -m slow)
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course.errors import CourseError
from phase1_foundation.project3_pretrain.hf_interop import (export_hf, import_hf, llama_config_from_hf,
                                                            permute_rope, unpermute_rope)
from phase1_foundation.project3_pretrain.model import (CachePlan, Llama, LlamaConfig, RMSNorm, apply_rope,
                                                       rope_tables)

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)


def tiny(**kw) -> Llama:
    torch.manual_seed(kw.pop("seed", 0))
    return Llama(LlamaConfig(**{**TINY, **kw})).eval()


# ---- components against independent references ---------------------------------------------------
def test_rmsnorm_matches_torch():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    ours = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
    ref = torch.nn.RMSNorm(16, eps=1e-6)
    ref.weight.data.copy_(ours.weight.data)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)


def test_rope_split_half_equals_complex_rotation_of_permuted_pairs():
    """Our split-half RoPE on W equals Meta's complex (neighbour-pair) RoPE on unpermute_rope(W)."""
    torch.manual_seed(2)
    n_heads, d, T, dim = 3, 8, 6, 24
    w = torch.randn(n_heads * d, dim)
    x = torch.randn(T, dim)
    cos, sin = rope_tables(d, T)
    ours = apply_rope((x @ w.T).view(T, n_heads, d).transpose(0, 1), cos, sin)  # (H, T, d)
    # Meta's reference: pairs (2i, 2i+1) as complex numbers times e^{i pos theta_i}
    meta = (x @ unpermute_rope(w, n_heads).T).view(T, n_heads, d // 2, 2)
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    rot = torch.polar(torch.ones(T, d // 2), torch.outer(torch.arange(T).float(), freqs))
    meta = torch.view_as_real(torch.view_as_complex(meta) * rot[:, None, :]).reshape(T, n_heads, d)
    torch.testing.assert_close(ours, permute_rope(meta.reshape(T, -1).T.contiguous(), n_heads).T.reshape(
        T, n_heads, d).transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permute_rope(unpermute_rope(w, n_heads), n_heads), w)


def test_rope_is_relative():
    """q_m . k_n after RoPE depends only on m - n."""
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    cos, sin = rope_tables(16, 20)
    dot = lambda m, n: (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()
    assert torch.allclose(dot(5, 2), dot(15, 12), atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 3), atol=1e-3)


def test_forward_shapes_loss_and_causality():
    model = tiny()
    idx = torch.randint(0, 97, (2, 10))
    logits, loss = model(idx, torch.randint(0, 97, (2, 10)))
    assert logits.shape == (2, 10, 97) and loss.ndim == 0
    assert abs(loss.item() - math.log(97)) < 0.5  # small init: close to uniform
    idx2 = idx.clone()
    idx2[:, 6] = (idx2[:, 6] + 1) % 97
    l2, _ = model(idx2)
    torch.testing.assert_close(logits[:, :6], l2[:, :6])  # the future never leaks into the past
    assert not torch.allclose(logits[:, 6:], l2[:, 6:])


def test_logits_to_keep_returns_the_last_positions_only():
    model = tiny()
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full, _ = model(idx)
        for k in (1, 3, 10):
            last, _ = model(idx, logits_to_keep=k)
            assert last.shape == (2, k, 97)
            torch.testing.assert_close(last, full[:, -k:], rtol=0, atol=1e-6)
    for bad in (dict(logits_to_keep=-1), dict(logits_to_keep=1, targets=idx)):
        with pytest.raises(CourseError, match="logits_to_keep"):
            model(idx, **bad)


def test_forward_traces_as_one_graph_for_every_length():
    """torch.compile(dynamic=True, fullgraph=True) must trace the whole forward, the sequence length a symbol: a
    graph break (is_causal=T > 1 was one: a symbolic bool) makes dynamo run the model eager, and skip that code in
    every later compile of the process too. The "eager" backend: dynamo's tracing alone, no C++ compiler needed."""
    model = tiny()
    compiled = torch.compile(model, backend="eager", dynamic=True, fullgraph=True)
    with torch.no_grad():
        for T in (3, 7):
            idx = torch.randint(0, 97, (2, T))
            torch.testing.assert_close(compiled(idx)[0], model(idx)[0], rtol=0, atol=0)
            torch.testing.assert_close(compiled(idx, logits_to_keep=1)[0], model(idx)[0][:, -1:], rtol=0, atol=1e-6)


def test_tied_and_untied_parameter_counts():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.lm_head.weight is tied.tok_emb.weight


def test_gpu_preset_is_about_125m():
    with torch.device("meta"):
        n = Llama(LlamaConfig.from_preset("gpu")).num_params()
    assert 120e6 <= n <= 130e6, n


class _ListCache:
    """A minimal reference KV cache implementing the project-8 protocol (begin/update) with torch.cat, every row
    at one length: written here from the protocol's text, independent of project 8's cache."""

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.length = 0

    def begin(self, T):
        start, self.length = self.length, self.length + T
        mask = None
        if start > 0 and T > 1:  # query t sees keys 0 .. start + t
            mask = torch.arange(start + T)[None, :] <= torch.arange(start, start + T)[:, None]
        return CachePlan(start, None, mask, start + T)

    def update(self, layer, k, v):
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
        assert self.k[layer].size(2) == self.length
        return self.k[layer], self.v[layer]


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_kv_cache_protocol_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    idx = torch.randint(0, 97, (2, 12))
    full, _ = model(idx)
    cache = _ListCache(2)
    parts = [model(idx[:, :5], kv_cache=cache)[0],   # prefill
             model(idx[:, 5:8], kv_cache=cache)[0]]  # a chunk with an offset mask
    for t in range(8, 12):                            # single-token decode steps
        parts.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


class _PlannedCache(_ListCache):
    """_ListCache whose next plan is given by the test: per-row positions and a mask."""

    def begin(self, T):
        self.length += T
        return self.next_plan


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_rows_at_their_own_positions_equal_each_row_alone(n_kv_head):
    """A cache's per-row plan: row 1 holds 3 real tokens and 3 padding slots, row 0 six tokens; one decode step
    with positions (6, 3) and a mask hiding row 1's padding gives each row the logits of its own sequence."""
    model = tiny(n_kv_head=n_kv_head)
    a, b = torch.randint(0, 97, (7,)), torch.randint(0, 97, (4,))
    with torch.no_grad():
        cache = _PlannedCache(2)
        cache.next_plan = CachePlan(0, None, None, 6)
        model(torch.stack([a[:6], torch.cat([b[:3], b[:3]])]), kv_cache=cache)  # row 1: slots 3..5 are padding
        keys = torch.arange(7)
        visible = torch.stack([keys <= 6, (keys < 3) | (keys == 6)])  # (B, keys)
        cache.next_plan = CachePlan(None, torch.tensor([[6], [3]]), visible[:, None, None, :], 7)
        out = model(torch.stack([a[6:7], b[3:4]]), kv_cache=cache)[0][:, -1]
        torch.testing.assert_close(out[0], model(a[None])[0][0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], model(b[None])[0][0, -1], rtol=1e-5, atol=1e-5)


def test_attend_hook_is_the_one_attention_call_and_changes_nothing_else():
    """Llama(config, attend=fn): every layer's attention goes through fn with SDPA's contract (prefill, decode
    with a cache, a masked chunk); an fn that is SDPA gives the same logits as the default model."""
    calls = []

    def counting_sdpa(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2], kw.get("attn_mask") is not None, kw.get("is_causal", False)))
        return F.scaled_dot_product_attention(q, k, v, **kw)

    ref = tiny()
    hooked = Llama(ref.config, attend=counting_sdpa).eval()
    hooked.load_state_dict(ref.state_dict())
    assert set(hooked.state_dict()) == set(ref.state_dict())
    idx = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hooked(idx)[0], ref(idx)[0], rtol=0, atol=0)
    assert calls == [(9, 9, False, True)] * TINY["n_layer"]


def test_context_longer_than_block_size_is_a_clear_error():
    with pytest.raises(CourseError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


def test_bad_config_values_each_get_a_message():
    with pytest.raises(CourseError) as e:
        LlamaConfig(n_head=6, n_kv_head=4, n_embd=100).validate_config()
    assert "n_kv_head" in str(e.value) and "n_embd (100)" in str(e.value)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    idx = torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = flag
        model(idx, idx)[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_overfits_a_tiny_batch():
    torch.manual_seed(5)
    model = tiny().train()
    idx = torch.randint(0, 97, (4, 16))
    opt = model.configure_optimizer(0.0, 3e-3)
    for _ in range(80):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


# ---- data, training, resume, evaluation ------------------------------------------------------------
WORDS = ("the cat sat on a mat and the dog ran to the park while a bird sang in the old tree near "
         "our house because it was spring").split()


def fake_corpus(root, n_books=3, words_per_book=3000):
    """A folder of gzipped 'books' in Gutenberg's layout, with boilerplate around the text."""
    import gzip
    rng = np.random.default_rng(0)
    folder = root / "gutenberg"
    folder.mkdir(parents=True)
    books = []
    for b in range(n_books):
        body = " ".join(WORDS[(i * 7 + int(rng.integers(0, 3))) % len(WORDS)] for i in range(words_per_book))
        body = body.replace(" park ", " park.\r\n")
        raw = f"Header\r\n*** START OF THE PROJECT GUTENBERG EBOOK {b} ***\r\n{body}\r\n*** END OF THE PROJECT"
        (folder / f"author__book-{b}.txt.gz").write_bytes(gzip.compress(raw.encode()))
        books.append(body.replace("\r\n", "\n"))
    return folder, books


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from phase1_foundation.project2_tokenizer.formats import save_tokenizer
    from phase1_foundation.project2_tokenizer.tokenizer import RegexTokenizer
    from phase1_foundation.project3_pretrain.prepare_data import prepare
    root = tmp_path_factory.mktemp("p3data")
    folder, books = fake_corpus(root)
    tok = RegexTokenizer("gpt4", special_tokens=["<|endoftext|>"]).train(books, vocab_size=300)
    save_tokenizer(tok, root / "tok.pkl")
    meta = prepare(folder, root / "shards", root / "tok.pkl", heldout_every=3, progress=False)
    return root, books, tok, meta


def test_prepare_data_shards_round_trip_and_byte_counts(corpus):
    root, books, tok, meta = corpus
    assert meta["splits"]["val"]["documents"] == ["author__book-0.txt.gz"]  # whole book 0 held out
    assert (root / "shards" / "tokenizer.pkl").read_bytes() == (root / "tok.pkl").read_bytes()
    val = np.fromfile(root / "shards" / "val.bin", dtype=np.uint16)
    train = np.fromfile(root / "shards" / "train.bin", dtype=np.uint16)
    assert val[-1] == tok.eot_token and (train == tok.eot_token).sum() == 2
    assert tok.decode(val[:-1].tolist()) == books[0].strip("\n") + "\n"  # boilerplate cut, CRLF -> LF
    assert meta["splits"]["val"]["bytes"] == len((books[0].strip("\n") + "\n").encode())
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["vocab_size"] == tok.eot_token + 1


def test_prepare_data_missing_tokenizer_is_a_clear_error(corpus, tmp_path):
    from phase1_foundation.project3_pretrain.prepare_data import prepare
    root = corpus[0]
    with pytest.raises(CourseError, match="tokenizer not found: .*nope.pkl"):
        prepare(root / "gutenberg", tmp_path, tmp_path / "nope.pkl", progress=False)


def test_resume_is_exact(corpus, tmp_path):
    from phase1_foundation.project3_pretrain.config import TrainConfig
    from phase1_foundation.project3_pretrain.train import train
    data_dir = corpus[0] / "shards"
    mcfg = LlamaConfig(**{**TINY, "vocab_size": 290, "block_size": 16, "dropout": 0.1})
    base = dict(data_dir=str(data_dir), batch_size=4, lr_decay_iters=6, warmup_iters=2, eval_interval=3,
                eval_iters=2, log_interval=1, learning_rate=1e-2, min_lr=1e-3, peak_flops=1e11, grad_accum=2)
    full = train(mcfg, TrainConfig(**base, out_dir=str(tmp_path / "a"), max_iters=6), device="cpu", seed=7,
                 progress=False)
    train(mcfg, TrainConfig(**base, out_dir=str(tmp_path / "b"), max_iters=3), device="cpu", seed=7, progress=False)
    resumed = train(mcfg, TrainConfig(**base, out_dir=str(tmp_path / "b"), max_iters=3), device="cpu", seed=7,
                    resume=True, progress=False, train_overrides={"max_iters": 6})
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["iter"] == b["iter"] == 6
    for name, t in a["model_state_dict"].items():
        assert torch.equal(t, b["model_state_dict"][name]), name
    assert full["val_loss"] == resumed["val_loss"]
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log if r["kind"] == "eval"] == [0, 3, 6]
    assert {"val_bpb", "val_ppl", "train_loss"} <= set(log[-1]) and (tmp_path / "a" / "curves.png").is_file()


def test_train_gpt_baseline_and_bits_per_byte(corpus, tmp_path):
    from phase1_foundation.project3_pretrain.config import TrainConfig
    from phase1_foundation.project3_pretrain.train import train
    meta = corpus[3]
    mcfg = LlamaConfig(**{**TINY, "vocab_size": 290, "block_size": 16})
    s = train(mcfg, TrainConfig(arch="gpt", data_dir=str(corpus[0] / "shards"), out_dir=str(tmp_path), batch_size=8,
                                max_iters=40, warmup_iters=5, eval_interval=20, eval_iters=4, learning_rate=1e-2, min_lr=1e-3,
                                peak_flops=1e11), device="cpu", seed=3, progress=False)
    ratio = meta["splits"]["val"]["tokens"] / meta["splits"]["val"]["bytes"]
    assert s["arch"] == "gpt" and s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2) * ratio)
    assert s["val_loss"] < math.log(290) - 1.0  # it learned the toy language
    assert 0 < s["mfu"] and s["tokens_per_s"] > 0


def test_evaluate_ids_matches_a_direct_computation():
    from phase1_foundation.project3_pretrain.perplexity import evaluate_ids
    model = tiny()
    ids = np.random.default_rng(1).integers(0, 97, size=32 * 3 + 1)
    r = evaluate_ids(model, ids, n_bytes=400, batch_size=2, progress=False)
    t = torch.from_numpy(ids)
    nll = sum(F.cross_entropy(model(t[i * 32:i * 32 + 32][None])[0][0], t[i * 32 + 1:i * 32 + 33], reduction="sum")
              for i in range(3)).item()
    assert r["tokens"] == 96 and r["loss"] == pytest.approx(nll / 96, rel=1e-5)
    assert r["bpb"] == pytest.approx(nll / math.log(2) / 400, rel=1e-5)
    with pytest.raises(CourseError, match="fewer than one block"):
        evaluate_ids(model, ids[:20], 50, progress=False)


def test_bad_data_and_checkpoints_get_one_clear_error(corpus, tmp_path):
    from phase1_foundation.project3_pretrain.data import TokenData
    from phase1_foundation.project3_pretrain.loading import load_matching_tokenizer, load_model_from_checkpoint
    with pytest.raises(CourseError, match="meta.json not found"):
        TokenData(tmp_path, 16)
    shards = corpus[0] / "shards"
    with pytest.raises(CourseError, match=r"train.bin holds 6,004 tokens, fewer than one block"):
        TokenData(shards, 10**4)
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CourseError, match="corrupt"):
        load_model_from_checkpoint(bad)
    with pytest.raises(CourseError, match="checkpoint not found"):
        load_model_from_checkpoint(tmp_path / "missing.pt")
    model = tiny()
    state = {"model_state_dict": model.state_dict(), "model_config": dict(model.config.to_dict(), n_embd=64),
             "arch": "llama"}
    torch.save(state, bad)
    with pytest.raises(CourseError, match=r"tok_emb.weight' has shape \(97, 32\)"):
        load_model_from_checkpoint(bad)
    with pytest.raises(CourseError, match="290 token ids but the model's vocabulary is 97"):
        load_matching_tokenizer(corpus[0] / "tok.pkl", model)
    with pytest.raises(CourseError, match="tokenizer not found"):
        load_matching_tokenizer(tmp_path / "none.pkl", model)


@pytest.mark.slow
def test_gpu_preset_one_optimizer_step_on_cpu():
    import resource
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("gpu")
    model = Llama(cfg).train()
    model.gradient_checkpointing = True
    opt = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), "cpu")
    idx = torch.randint(0, cfg.vocab_size, (1, cfg.block_size + 1))
    before = model.layers[0].attn.wq.weight.detach().clone()
    loss = model(idx[:, :-1], idx[:, 1:])[1]  # next-token targets
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.layers[0].attn.wq.weight)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"gpu preset: {model.num_params():,} params, loss {loss.item():.3f}, peak RSS {rss:.2f} GB")
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_compiled_step_and_cached_decode():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**{**TINY, "block_size": 64})).cuda()
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cuda")
    fwd = torch.compile(model)
    idx = torch.randint(0, 97, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fwd(idx, idx)[1]
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(idx[:, :12])[0]
        cache = _ListCache(2)
        parts = [model(idx[:, :8], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                           for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(parts, 1).float(), full.float(), rtol=3e-2, atol=3e-2)


# ---- Hugging Face interop --------------------------------------------------------------------------
transformers = pytest.importorskip("transformers", reason="transformers (dev dependency) is needed for HF tests")


def hf_tiny(tie: bool, n_kv: int = 2, head_dim: int | None = None, theta: float = 10000.0, eps: float = 1e-6):
    torch.manual_seed(6)
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=n_kv, max_position_embeddings=32, rms_norm_eps=eps, rope_theta=theta,
              tie_word_embeddings=tie, attn_implementation="eager")
    if head_dim:
        kw["head_dim"] = head_dim
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # RMSNorm gains start at 1: randomise them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("tie,n_kv,head_dim,theta", [(True, 2, None, 10000.0), (False, 2, None, 500000.0),
                                                      (False, 4, None, 10000.0), (True, 1, 16, 10000.0)])
def test_import_hf_matches_transformers_logits(tmp_path, tie, n_kv, head_dim, theta):
    ref = hf_tiny(tie, n_kv, head_dim, theta)
    ref.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.config.tie_embeddings == tie and ours.config.rope_theta == theta and ours.config.norm_eps == 1e-6
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie,n_kv", [(True, 2), (False, 1), (False, 4)])
def test_export_hf_loads_in_transformers_with_same_logits(tmp_path, tie, n_kv):
    ours = tiny(tie_embeddings=tie, n_kv_head=n_kv, rope_theta=1234.0, norm_eps=1e-5)
    with torch.no_grad():
        for layer in ours.layers:
            layer.attn_norm.weight.normal_(1.0, 0.2)
    export_hf(ours, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.tie_word_embeddings == tie
    idx = torch.randint(0, 97, (3, 25))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
    again = import_hf(tmp_path)  # and the round trip is exact
    for (n, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_import_hf_reads_sharded_checkpoints(tmp_path):
    ref = hf_tiny(False)
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(import_hf(tmp_path)(idx)[0], ref(idx).logits, rtol=1e-5, atol=1e-5)


def test_hf_greedy_generation_matches_ours(tmp_path):
    from phase1_foundation.project3_pretrain.generation import generate_ids
    ours = tiny(tie_embeddings=False)
    export_hf(ours, tmp_path)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 97, (1, 5))
    theirs = ref.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    mine = generate_ids(ours, prompt, max_new_tokens=15, temperature=0.0)
    assert mine.tolist() == theirs.tolist()


def test_import_hf_bad_inputs(tmp_path):
    with pytest.raises(CourseError, match="config.json not found"):
        import_hf(tmp_path)
    ref = hf_tiny(True)
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    bad = dict(cfg, hidden_size=64)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CourseError, match=r"model.embed_tokens.weight' has shape \(97, 32\)"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, hidden_act="gelu")))
    with pytest.raises(CourseError, match="hidden_act 'gelu'"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CourseError, match="corrupt"):
        import_hf(tmp_path)
    with pytest.raises(CourseError, match="not a LLaMA"):
        llama_config_from_hf(dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    with pytest.raises(CourseError, match="rope scaling"):
        llama_config_from_hf(dict(cfg, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}))


def _demo() -> None:
    """Validation mode: a tiny random LLaMA's logits beside transformers' on the same weights."""
    import tempfile

    import transformers

    model = tiny(tie_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp).eval()
        idx = torch.randint(0, model.config.vocab_size, (1, 12))
        with torch.no_grad():
            diff = (ref(idx).logits - model(idx)[0]).abs().max().item()
    print(f"tiny LLaMA ({model.num_params():,} parameters): max |ours - transformers| logit = {diff:.2e}")
    print("run the tests with: uv run pytest phase1_foundation/project3_pretrain -q")


if __name__ == "__main__":
    from course.cli import run_demo

    run_demo(_demo, __doc__)
