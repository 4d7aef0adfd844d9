"""`generate`'s hooks and inputs, cached and reference alike: logits processors, samplers, per-row keys (and
`LMPolicy`'s row keys), interventions, prompt embeddings and the prefix-LM mask.

The processors here are frozen dataclasses and module functions (hashable, so each setup compiles once); the model,
prompts, N and the comparison come from tests/test_generate.py, so the reference decoder's programs are shared.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import LOGPROB_ATOL, N, _assert_same, _prompts, model  # noqa: F401 (model: a fixture)

from framework import search
from framework.inference import generate, reference_generate, sampling
from framework.models import lm
from framework.tasks import arithmetic

generate_lib = importlib.import_module("framework.inference.generate")  # the attribute is the function


@dataclasses.dataclass(frozen=True)
class Ban:
    """Never emit `token`."""

    token: int

    def __call__(self, logits_BV, tokens_BS, lengths_B):
        return logits_BV.at[:, self.token].set(-jnp.inf)


@dataclasses.dataclass(frozen=True)
class PrefixSum:
    """Forces the next token to (sum of the row's valid tokens + 5 * [any non-pad token past lengths_B]) mod V: the
    output then checks both what lies before lengths_B and that nothing but pad lies after it."""

    vocab: int
    pad: int

    def __call__(self, logits_BV, tokens_BS, lengths_B):
        valid_BS = jnp.arange(tokens_BS.shape[1])[None, :] < lengths_B[:, None]
        total_B = jnp.sum(jnp.where(valid_BS, tokens_BS, 0), axis=1)
        stray_B = jnp.any(~valid_BS & (tokens_BS != self.pad), axis=1)
        want_B = (total_B + 5 * stray_B) % self.vocab
        return jnp.where(jnp.arange(self.vocab)[None, :] == want_B[:, None], logits_BV, -jnp.inf)


def argmax_sampler(logits_BV, tokens_BS, lengths_B, keys_B):
    return jnp.argmax(logits_BV, axis=-1)


def categorical_sampler(logits_BV, tokens_BS, lengths_B, keys_B):
    return sampling.categorical_rows(keys_B, logits_BV)


@dataclasses.dataclass(frozen=True)
class Steer:
    """Adds `scale` times a fixed direction to a hookpoint's activation."""

    scale: float

    def __call__(self, x_BTD):
        return x_BTD + self.scale * jnp.sin(jnp.arange(x_BTD.shape[-1], dtype=x_BTD.dtype))


@pytest.mark.parametrize("mode", ["sampled", "greedy"])
def test_a_banned_token_never_appears(model, mode):
    cfg, params = model
    n = 24
    kw = dict(max_new_tokens=n, stop_tokens=())
    kw.update(dict(temperature=5.0, rng=jax.random.key(3)) if mode == "sampled" else {})
    free = np.asarray(generate(params, cfg, _prompts(cfg), **kw).tokens)
    # The ban has power: the token it bans is the one the free decode emits most.
    banned = int(np.bincount(free.ravel(), minlength=cfg.vocab_size).argmax())
    out = generate(params, cfg, _prompts(cfg), logits_processors=(Ban(banned),), **kw)
    ref = reference_generate(params, cfg, _prompts(cfg), logits_processors=(Ban(banned),), **kw)
    _assert_same(out, ref)
    assert banned not in np.asarray(out.tokens) and banned in free
    np.testing.assert_array_equal(out.lengths, n)


def test_processors_see_each_rows_prompt_and_tokens_so_far(model):
    cfg, params = model
    proc = (PrefixSum(cfg.vocab_size, cfg.pad_id),)
    prompts = _prompts(cfg)
    for kw in (dict(), dict(temperature=1.0, rng=jax.random.key(0))):
        kw = dict(kw, max_new_tokens=N, stop_tokens=(), logits_processors=proc)
        out = generate(params, cfg, prompts, **kw)
        _assert_same(out, reference_generate(params, cfg, prompts, **kw))
        for b, p in enumerate(prompts):
            seq = list(p)
            for i in range(N):
                assert int(out.tokens[b, i]) == sum(seq) % cfg.vocab_size, (kw, b, i)
                seq.append(int(out.tokens[b, i]))
        # Only one token is allowed each step: the processed distribution is certain.
        np.testing.assert_array_equal(out.processed_logprobs, 0.0)


def test_argmax_sampler_reproduces_greedy_exactly(model):
    cfg, params = model
    greedy = generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    for temperature in (1.0, 0.0):
        kw = dict(max_new_tokens=N, temperature=temperature, sampler=argmax_sampler, rng=jax.random.key(1))
        out = generate(params, cfg, _prompts(cfg), **kw)
        np.testing.assert_array_equal(out.tokens, greedy.tokens)
        np.testing.assert_array_equal(out.lengths, greedy.lengths)
        np.testing.assert_array_equal(out.logprobs, greedy.logprobs)
        _assert_same(out, reference_generate(params, cfg, _prompts(cfg), **kw))


def test_a_sampler_gets_this_steps_per_row_keys(model):
    cfg, params = model
    kw = dict(max_new_tokens=N, temperature=0.8, top_k=5, rng=jax.random.key(2))
    plain = generate(params, cfg, _prompts(cfg), **kw)
    _assert_same(generate(params, cfg, _prompts(cfg), sampler=categorical_sampler, **kw), plain)


def test_a_rows_sample_depends_only_on_its_key_and_prompt(model):
    cfg, params = model
    prompts = _prompts(cfg, lens=(3, 7, 12, 5, 9), seed=4)
    keys = jax.random.split(jax.random.key(11), 5)
    kw = dict(max_new_tokens=N, temperature=1.0, stop_tokens=())
    batch = generate(params, cfg, prompts, rng=keys, **kw)
    alone = generate(params, cfg, [prompts[2]], rng=keys[2:3], **kw)
    order = [2, 4, 0, 3, 1]  # row 2 moves to position 0, the rest are shuffled
    moved = generate(params, cfg, [prompts[i] for i in order], rng=keys[np.asarray(order)], **kw)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[2])
    np.testing.assert_array_equal(moved.tokens, np.asarray(batch.tokens)[order])
    assert len({tuple(r) for r in np.asarray(batch.tokens)}) > 1  # rows differ: the keys matter
    _assert_same(reference_generate(params, cfg, prompts, rng=keys, **kw), batch)
    # One key means row b draws from fold_in(rng, b) (the reference is given those keys spelled out).
    rng = jax.random.key(5)
    one = generate(params, cfg, prompts, rng=rng, **kw)
    per_row = jnp.stack([jax.random.fold_in(rng, b) for b in range(5)])
    _assert_same(one, reference_generate(params, cfg, prompts, rng=per_row, **kw))
    # Raw uint32 key data names the same keys as the typed keys it holds.
    raw_B2 = jax.random.key_data(keys)
    np.testing.assert_array_equal(jax.random.key_data(sampling.row_keys(raw_B2, 5)), raw_B2)
    np.testing.assert_array_equal(
        jax.random.key_data(sampling.row_keys(jax.random.key_data(rng), 5)), jax.random.key_data(per_row)
    )


def test_interventions_apply_while_decoding(model):
    cfg, params = model
    iv = {"blocks.0.resid_post": Steer(4.0), "final_norm": Steer(-1.0)}
    free = generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    out = generate(params, cfg, _prompts(cfg), max_new_tokens=N, interventions=iv)
    _assert_same(out, reference_generate(params, cfg, _prompts(cfg), max_new_tokens=N, interventions=iv))
    assert not np.array_equal(out.tokens, free.tokens)
    # The first token comes from the prefill: it must equal the model run with the same interventions.
    for b, p in enumerate(_prompts(cfg)):
        logits_V = lm.apply(params, jnp.asarray(p[None]), cfg, interventions=iv)[0, -1]
        assert int(out.tokens[b, 0]) == int(jnp.argmax(logits_V))


def test_processed_logprobs_are_under_the_processed_distribution(model):
    cfg, params = model
    prompt = _prompts(cfg)[1]
    temperature, top_k, banned = 0.7, 5, 4
    out = generate(
        params,
        cfg,
        [prompt],
        max_new_tokens=N,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(1),
        stop_tokens=(),
        logits_processors=(Ban(banned),),
    )
    seq = np.concatenate([prompt, np.asarray(out.tokens[0])])
    logits_TV = jax.jit(lm.apply, static_argnums=2)(params, jnp.asarray(seq[None]), cfg)[0]
    logits_NV = logits_TV[len(prompt) - 1 + np.arange(N)]
    x_NV = sampling.truncate_logits((logits_NV / temperature).at[:, banned].set(-jnp.inf), top_k=top_k)
    rows = np.arange(N), np.asarray(out.tokens[0])
    np.testing.assert_allclose(out.processed_logprobs[0], jax.nn.log_softmax(x_NV)[rows], atol=LOGPROB_ATOL, rtol=0)
    np.testing.assert_allclose(out.logprobs[0], jax.nn.log_softmax(logits_NV)[rows], atol=LOGPROB_ATOL, rtol=0)
    assert np.all(np.asarray(out.processed_logprobs) > np.asarray(out.logprobs))  # truncation raises kept tokens
    # Greedy without processors draws from the model's own distribution.
    g = generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    np.testing.assert_array_equal(g.processed_logprobs, g.logprobs)


def _lookup(params, cfg, prompts):
    return [np.asarray(lm.embed(params, jnp.asarray(p[None]), cfg)[0]) for p in prompts]


def test_prompt_embeds_equal_to_the_lookup_give_the_token_decode(model):
    cfg, params = model
    tokens = generate(params, cfg, _prompts(cfg), max_new_tokens=N)
    embeds = generate(params, cfg, None, prompt_embeds=_lookup(params, cfg, _prompts(cfg)), max_new_tokens=N)
    _assert_same(embeds, tokens)
    # With the ids given too (for processors), the same decode.
    both = generate(params, cfg, _prompts(cfg), prompt_embeds=_lookup(params, cfg, _prompts(cfg)), max_new_tokens=N)
    _assert_same(both, tokens)


def test_soft_prompts_and_a_prefix_lm_mask_match_the_reference(model):
    cfg, params = model
    rs = np.random.RandomState(1)
    soft = [e + rs.normal(size=e.shape).astype(np.float32) for e in _lookup(params, cfg, _prompts(cfg))]
    prefix = np.array([2, 5, 8])
    kw = dict(max_new_tokens=N, prompt_embeds=soft)
    plain = generate(params, cfg, None, **kw)
    out = generate(params, cfg, None, prefix_len=prefix, **kw)
    _assert_same(out, reference_generate(params, cfg, None, prefix_len=prefix, **kw))
    assert not np.allclose(out.logprobs, plain.logprobs, atol=1e-3)  # the prefix is bidirectional: logits move
    _assert_same(generate(params, cfg, None, prefix_len=np.zeros(3, int), **kw), plain)  # 0 = causal
    # The first token is the prefill's: the model on the same embeddings and mask.
    for b, e in enumerate(soft):
        logits_TV = lm.apply(params, None, cfg, embeds_BTD=jnp.asarray(e[None]), prefix_len_B=prefix[b : b + 1])[0]
        assert int(out.tokens[b, 0]) == int(jnp.argmax(logits_TV[-1]))
    # Token prompts take a prefix too.
    tok = generate(params, cfg, _prompts(cfg), max_new_tokens=N, prefix_len=prefix)
    _assert_same(tok, reference_generate(params, cfg, _prompts(cfg), max_new_tokens=N, prefix_len=prefix))


def test_equal_processors_share_a_compile(model):
    cfg, params = model
    generate(params, cfg, _prompts(cfg), max_new_tokens=N, logits_processors=(Ban(5),))
    size = generate_lib._generate_jit._cache_size()
    generate(params, cfg, _prompts(cfg), max_new_tokens=N, logits_processors=[Ban(5)])
    assert generate_lib._generate_jit._cache_size() == size


@dataclasses.dataclass  # eq=True without frozen: unhashable
class _Unhashable:
    def __call__(self, logits_BV, tokens_BS, lengths_B):
        return logits_BV


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits_processors=Ban(3)), r"logits_processors must be a tuple of callables"),
        (dict(logits_processors=(3,)), r"logits_processors\[0\]=3 must be a hashable callable"),
        (dict(logits_processors=(Ban(3), _Unhashable())), r"logits_processors\[1\]=.* must be a hashable callable"),
        (dict(sampler="argmax", rng=jax.random.key(0)), r"sampler='argmax' must be None or a hashable callable"),
        (dict(sampler=argmax_sampler), r"a sampler draws with per-row keys, so it needs rng"),
        (dict(interventions={"blocks.9.resid_post": Steer(1.0)}), r"hookpoint 'blocks.9.resid_post' is unknown"),
        (dict(interventions={"embed": 3}), r"interventions\['embed'\]=3 must be a hashable callable"),
        (dict(interventions="embed"), r"interventions must be a mapping"),
        (dict(temperature=1.0, rng=jax.random.split(jax.random.key(0), 2)), r"a batch of 3 keys .* shape \(2,\)"),
        (dict(temperature=1.0, rng=np.zeros(3, np.float32)), r"rng must be one PRNG key or a batch of 3 keys"),
        (dict(prefix_len=[1, 2]), r"prefix_len must be 3 ints \(one per prompt\)"),
        (dict(prefix_len=[1, 8, 2]), r"prefix_len\[1\]=8 must be in \[0, prompt length 7\]"),
        (dict(prompt_embeds=[np.zeros((3, 5), np.float32)]), r"prompt_embeds 0: expected \[T_i >= 1, D=32\]"),
        (dict(prompt_embeds=np.zeros((2, 3, 32), np.float32)), r"3 prompts but 2 prompt_embeds"),
        (dict(prompt_embeds=[np.zeros((n, 32), np.float32) for n in (3, 6, 12)]), r"6 positions but prompt 1 has 7"),
        (dict(prompt_embeds=[np.zeros((n, 32), np.int32) for n in (3, 7, 12)]), r"expected floating point"),
    ],
)
def test_hook_arguments_are_checked_before_any_compile(model, kwargs, match):
    cfg, params = model
    for fn in (generate, reference_generate):
        with pytest.raises(ValueError, match=match):
            fn(params, cfg, _prompts(cfg), max_new_tokens=N, **kwargs)


def test_lm_policy_keys_every_row_by_its_row_key(tiny_cfg):
    """Search's sampled policy writes a row's text from (call_key, row key) alone: batched, alone or moved."""
    params = lm.init(tiny_cfg, jax.random.key(0))
    policy = search.LMPolicy(params, tiny_cfg, temperature=1.0, batch_size=8, min_batch=8)  # one batch shape
    problems = arithmetic.sample_problems(7, 5, num_steps=1, modulus=10)
    prefixes = ["", "", "1+2=3\n", "", "4*5=0\n"]
    keys = [(7, i, 0, 0, s) for i, s in enumerate((0, 1, 0, 2, 1))]
    kw = dict(until="line", call_key=(7, 0, 0))
    batch = policy.extend(problems, prefixes, row_keys=keys, **kw)
    assert len(set(batch.texts)) > 1  # rows differ: the keys matter
    for i in (0, 3):
        alone = policy.extend([problems[i]], [prefixes[i]], row_keys=[keys[i]], **kw)
        assert alone.texts[0] == batch.texts[i] and alone.tokens[0] == batch.tokens[i]
    order = [4, 2, 0, 3, 1]
    moved = policy.extend(
        [problems[i] for i in order], [prefixes[i] for i in order], row_keys=[keys[i] for i in order], **kw
    )
    assert moved.texts == [batch.texts[i] for i in order]
    # Another key gives another sample somewhere; numpy ints name the same key as Python ints.
    other = policy.extend(problems, prefixes, row_keys=[k[:4] + (9,) for k in keys], **kw)
    assert other.texts != batch.texts
    same = policy.extend(problems, prefixes, row_keys=[tuple(np.int64(x) for x in k) for k in keys], **kw)
    assert same.texts == batch.texts
    with pytest.raises(ValueError, match="5 problems but 2 row_keys"):
        policy.extend(problems, prefixes, row_keys=keys[:2], **kw)
