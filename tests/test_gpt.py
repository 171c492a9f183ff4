"""gpt.py + engine.py: KV-cache decoding matches a full forward, GQA, greedy generate/stream, sizing, errors."""

import pytest
import torch

from stages.lm.engine import generate, stream
from stages.lm.gpt import GPT, GPTConfig, KVCache, RewardModel

VOCAB = 97


def tiny(n_head=4, n_kv_head=4, seed=0, **kw) -> GPT:
    """A 2-layer model with head_dim 16, in fp32, with weights big enough that logits differ sharply."""
    torch.manual_seed(seed)
    cfg = GPTConfig(**{"vocab_size": VOCAB, "seq_len": 64, "n_layer": 2, "n_embd": 16 * n_head,
                       "n_head": n_head, "n_kv_head": n_kv_head, **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def ids(B, T, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kv_cache_matches_full_forward(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    x = ids(3, 24)
    with torch.no_grad():
        full = model(x)                                            # (B, T, V)
        cache = KVCache(model.cfg, 3, 24, "cpu", torch.float32)
        parts = [model(x[:, :10], cache=cache)]                    # prefill
        assert cache.pos == 10
        parts.append(model(x[:, 10:17], cache=cache))              # a chunk after a cached prefix
        for t in range(17, 24):                                    # one token at a time
            parts.append(model(x[:, t:t + 1], cache=cache))
        assert cache.pos == 24
    cached = torch.cat(parts, dim=1)
    assert cached.shape == full.shape == (3, 24, VOCAB)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)
    assert (cached.argmax(-1) == full.argmax(-1)).all()


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouped-query attention is multi-head attention whose K/V heads are shared by groups of query heads."""
    gqa = tiny(n_head=4, n_kv_head=2)
    mha = tiny(n_head=4, n_kv_head=4, seed=5)
    assert gqa.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert gqa.num_params() < mha.num_params()
    group, hd = 2, 16
    state = {}
    for name, w in gqa.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*D, C) -> (H*D, C), head h uses h // group
            w = w.view(-1, hd, w.size(1)).repeat_interleave(group, dim=0).reshape(-1, w.size(1))
        state[name] = w
    mha.load_state_dict(state)
    x = ids(2, 33)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-4)


def test_loss_ignores_minus_one_targets():
    model = tiny()
    x, y = ids(2, 12), ids(2, 12, seed=2)
    y_masked = y.clone()
    y_masked[:, :6] = -1
    with torch.no_grad():
        logits = model(x)
        expected = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, VOCAB), y[:, 6:].reshape(-1))
        torch.testing.assert_close(model(x, y_masked), expected)
        assert model(x, y, reduction="none").shape == (24,)


def greedy_without_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_generate_greedy_is_deterministic_and_matches_uncached_argmax():
    model = tiny()
    prompt = [5, 17, 3, 42, 8]
    a = generate(model, prompt, num_samples=2, max_new_tokens=12, temperature=0)
    b = generate(model, prompt, num_samples=1, max_new_tokens=12, temperature=0)
    assert len(a) == 2 and a[0] == a[1] == b[0]
    assert len(a[0]) == 12
    assert a[0] == greedy_without_cache(model, prompt, 12)


def test_generate_stops_at_a_stop_id():
    model = tiny()
    prompt = [5, 17, 3, 42, 8]
    free = generate(model, prompt, max_new_tokens=12, temperature=0)[0]
    stop = free[6]  # a token greedy decoding reaches after a few steps
    first = free.index(stop)
    out = generate(model, prompt, num_samples=3, max_new_tokens=12, temperature=0, stop_ids=(stop, VOCAB + 5))
    assert out == [free[:first + 1]] * 3  # the stop id is kept, nothing after it


def test_generate_sampled_samples_stop_independently():
    model = tiny()
    prompt = [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    stops = tuple(range(0, VOCAB, 6))  # every 6th id: samples stop at different points
    out = generate(model, prompt, num_samples=8, max_new_tokens=12, temperature=1.0, top_k=20,
                   stop_ids=stops, generator=gen)
    assert len(out) == 8
    for o in out:
        assert 1 <= len(o) <= 12
        assert all(t not in stops for t in o[:-1])  # nothing is appended after a sample stopped
        assert o[-1] in stops or len(o) == 12
    again = generate(model, prompt, num_samples=8, max_new_tokens=12, temperature=1.0, top_k=20,
                     stop_ids=stops, generator=torch.Generator().manual_seed(0))
    assert again == out  # seeded sampling is reproducible
    assert len({tuple(o) for o in out}) > 1


def test_top_k_one_is_greedy():
    model = tiny()
    greedy = generate(model, [4, 9], max_new_tokens=10, temperature=0)
    top1 = generate(model, [4, 9], max_new_tokens=10, temperature=0.7, top_k=1,
                    generator=torch.Generator().manual_seed(3))
    assert top1 == greedy


def test_stream_yields_the_greedy_tokens():
    model = tiny()
    prompt = [7, 7, 1, 30]
    expected = generate(model, prompt, max_new_tokens=15, temperature=0)[0]
    assert list(stream(model, prompt, max_new_tokens=15, temperature=0, top_k=None)) == expected
    stop = expected[4]
    first = expected.index(stop)
    # stream stops before yielding the stop id; generate keeps it
    assert list(stream(model, prompt, max_new_tokens=15, temperature=0, stop_ids=(stop,))) == expected[:first]
    seeded = list(stream(model, prompt, max_new_tokens=15, temperature=1.0, top_k=10, seed=11))
    assert seeded == list(stream(model, prompt, max_new_tokens=15, temperature=1.0, top_k=10, seed=11))


def test_generation_is_clipped_to_the_context():
    model = tiny()
    prompt = list(range(1, 62))  # 61 of 64 positions
    assert [len(o) for o in generate(model, prompt, num_samples=2, max_new_tokens=10, temperature=0)] == [3, 3]
    assert len(list(stream(model, prompt, max_new_tokens=10, temperature=0))) == 3
    full = list(range(64))
    assert generate(model, full, max_new_tokens=5, temperature=0) == [[]]
    assert list(stream(model, full, max_new_tokens=5)) == []


def test_a_prompt_longer_than_the_context_raises():
    model = tiny()
    with pytest.raises(ValueError):
        generate(model, list(range(70)), max_new_tokens=5, temperature=0)


def test_context_overflow_raises():
    model = tiny()
    with pytest.raises(ValueError, match="65 tokens exceeds the model's context of 64"):
        model(ids(1, 65))
    cache = KVCache(model.cfg, 1, 64, "cpu", torch.float32)
    with torch.no_grad():
        model(ids(1, 60), cache=cache)
        with pytest.raises(ValueError, match="context of 64"):
            model(ids(1, 5), cache=cache)
        assert cache.pos == 60  # a refused call leaves the cache untouched
        model(ids(1, 4), cache=cache)


def test_from_depth_sizes():
    cfg = GPTConfig.from_depth(20, vocab_size=65536, seq_len=2048)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (20, 1280, 10, 10, 128)
    assert cfg.mlp_hidden % 64 == 0 and cfg.mlp_hidden >= 1280 * 8 / 3
    gqa = GPTConfig.from_depth(20, 65536, 2048, kv_ratio=2)
    assert (gqa.n_head, gqa.n_kv_head) == (10, 5)
    small = GPTConfig.from_depth(2, 512, 64, head_dim=32)
    assert (small.n_layer, small.n_embd, small.n_head, small.head_dim) == (2, 128, 4, 32)
    assert GPTConfig.from_depth(1, 512, 64).n_head == 1  # width 64 < head_dim 128: one head, not zero
    assert GPTConfig(**cfg.to_dict()) == cfg


@pytest.mark.parametrize("kw, msg", [
    ({"n_embd": 100, "n_head": 3, "n_kv_head": 3}, "multiple of n_head"),
    ({"n_embd": 64, "n_head": 4, "n_kv_head": 3}, "multiple of n_kv_head"),
    ({"n_embd": 60, "n_head": 4, "n_kv_head": 4}, "even"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPTConfig(vocab_size=VOCAB, **kw)


def test_reward_model_reads_the_last_real_token():
    torch.manual_seed(0)
    rm = RewardModel(tiny()).eval()
    with torch.no_grad():
        assert float(rm(ids(1, 5), torch.tensor([5]))[0]) == 0.0  # zero-initialised head
        rm.reward_head.weight.normal_()
        rm.reward_head.bias.fill_(0.5)
        seqs = [ids(1, n, seed=n)[0].tolist() for n in (4, 9, 13)]
        alone = [float(rm(torch.tensor([s]), torch.tensor([len(s)]))[0]) for s in seqs]
        padded = torch.tensor([s + [0] * (13 - len(s)) for s in seqs])
        batched = rm(padded, torch.tensor([len(s) for s in seqs]))
    assert batched.dtype == torch.float32 and batched.shape == (3,)
    torch.testing.assert_close(batched, torch.tensor(alone), atol=1e-5, rtol=1e-4)
    assert len(set(alone)) == 3
