"""Generate continuations of prompts with an imported HF checkpoint or a trained Lumen LM, batched through `generate`.

Glossary: B prompts per `generate` call (sampling.batch_size), N new tokens (sampling.max_new_tokens).

The model is the local HF folder `config.model.hf_path` (`hf.model_from_config`: its config.json decides the
architecture and special ids), or the arithmetic/text LM of the train_lm workdir `config.lm.workdir` (restored from
its checkpoints; a run that stopped short of its step count is trained to it first). Prompts are the lines of the
local file `config.prompts.text_file` (empty lines skipped), tokenized by the model's tokenizer with its BOS first
(none for a model without BOS), or read as whitespace-separated token ids used as given (`prompts.format="ids"`,
the default for a folder without tokenizer.json); without a file, `prompts.task_problems` held-out arithmetic
problems (split "test"), whose completions are graded by `arithmetic.check_solution`.

`validate` checks everything before anything is compiled: unknown keys, the model source, sampling settings, every
prompt (characters the tokenizer cannot represent, ids outside the vocabulary) and that the longest prompt plus
max_new_tokens fits the model's context; each failure is one `ConfigError` naming the key.

Sampling: prompt i draws with the key `fold_in(key(config.seed), i)`, so its sample depends only on the seed, its
prompt and the settings, never on the batch it ran in (the last batch is filled up with copies of its first prompt,
so every call has B rows and one compile serves all). Greedy (temperature 0) needs no key.

Artifacts in `workdir`: config.json; results/generations.jsonl, one record per prompt: index, prompt (its text, or
its ids line), prompt_ids, prompt_length, completion (decoded text: special tokens skipped, cut at the first EOS;
null without a tokenizer), tokens (the generated ids, the stop token included), length, stop_reason ("stop_token" or
"max_new_tokens"), logprob (sum of the tokens' log-probabilities under the model) and, for task prompts, the verdict;
results/generate_summary.json (counts, mean length, stop reasons, tokens/s, exact match for task prompts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import string
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from configs.generate import default as default_config
from experiments import train_lm
from framework import config as config_lib
from framework import inference
from framework.models import hf, lm
from framework.tasks import arithmetic, data, policy_eval
from framework.tasks import tokenizer as tok_lib
from framework.training import loop

log = logging.getLogger(__name__)

FORMATS = ("auto", "text", "ids")


@dataclasses.dataclass
class Prompts:
    """The prompts of a run: what each one shows, its token ids, and the arithmetic problems (task prompts only)."""

    texts: list[str]
    ids: list[np.ndarray]
    problems: list[arithmetic.Problem] | None = None


def _lm_config(workdir: str) -> ml_collections.ConfigDict:
    """The train_lm config of `lm.workdir`, which must hold a trained run (config.json and checkpoints/)."""
    path = os.path.join(workdir, "config.json")
    config_lib.require(os.path.exists(path), "lm.workdir", f"{workdir!r} holds no config.json (a train_lm workdir)")
    config_lib.require(
        os.path.isdir(os.path.join(workdir, "checkpoints")),
        "lm.workdir",
        f"{workdir!r} holds no checkpoints/: train the LM first (python -m scripts.launch --config=configs/lm/...)",
    )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def model_config(config) -> lm.LMConfig:
    """The LMConfig of the run's model, from config.json files alone (no weights, no compile)."""
    hf_path, workdir = config.model.hf_path, config.lm.workdir
    config_lib.require(
        (hf_path is None) != (workdir is None),
        "model.hf_path",
        f"{hf_path!r} with lm.workdir={workdir!r}: set exactly one of the two (an HF folder or a train_lm workdir)",
    )
    if hf_path is None:
        for key in ("attention_impl", "dtype", "param_dtype"):
            config_lib.require(
                config.model[key] is None, f"model.{key}", "applies to model.hf_path; lm.workdir keeps its own"
            )
        return train_lm.validate(_lm_config(workdir))
    try:
        return hf.hf_model_config(config.model)
    except (ValueError, FileNotFoundError) as e:
        raise config_lib.ConfigError(f"config key 'model.hf_path': {e}") from None


def tokenizer(config, model_cfg: lm.LMConfig):
    """The model's tokenizer: the HF folder's tokenizer.json (None when it has none), or the LM's named one."""
    folder = config.model.hf_path
    if folder is None:
        return tok_lib.tokenizer_for(model_cfg)
    if not os.path.exists(os.path.join(folder, hf.TOKENIZER_FILE)):
        return None
    try:
        return tok_lib.tokenizer_for(model_cfg, folder=folder)
    except ValueError as e:
        raise config_lib.ConfigError(f"config key 'model.hf_path': {e}") from None


def stop_tokens(value: str, model_cfg: lm.LMConfig) -> tuple[int, ...]:
    """The ids that end a row: "eos" = the model's EOS ids, "none" = never stop, else comma-separated ids."""
    if value == "eos":
        return tuple(model_cfg.eos_ids)
    if value == "none":
        return ()
    try:
        ids = tuple(int(x) for x in value.split(","))
    except ValueError:
        raise config_lib.ConfigError(
            f"config key 'sampling.stop_tokens': {value!r}; expected 'eos', 'none' or comma-separated token ids"
        ) from None
    bad = [i for i in ids if not 0 <= i < model_cfg.vocab_size]
    config_lib.require(not bad, "sampling.stop_tokens", f"ids {bad} are outside [0, {model_cfg.vocab_size})")
    return ids


def _encode_text(tok, text: str, where: str) -> np.ndarray:
    """`[BOS] + encode(text)`, or ConfigError naming the first character the tokenizer cannot represent."""
    try:
        body = tok.encode(text)
    except ValueError as e:
        raise config_lib.ConfigError(f"config key 'prompts.text_file': {where}: {e}") from None
    inner = getattr(tok, "tokenizer", None)  # an HF `tokenizers.Tokenizer`: unknown characters become its unk token
    unk = getattr(getattr(inner, "model", None), "unk_token", None)
    unk_id = inner.token_to_id(unk) if unk else None
    if unk_id is not None and unk_id in body:
        enc = inner.encode(text, add_special_tokens=False)
        start, end = enc.offsets[enc.ids.index(unk_id)]
        raise config_lib.ConfigError(
            f"config key 'prompts.text_file': {where}: {text[start:end]!r} at position {start} is not in the "
            f"tokenizer's vocabulary (it encodes as the unknown token {unk!r})"
        )
    if inner is not None:  # a tokenizer without unk token may drop what it cannot represent
        lost = sorted(set(text) - set(tok.decode(body)) - set(string.whitespace))
        config_lib.require(
            not lost,
            "prompts.text_file",
            f"{where}: characters {lost} do not survive the tokenizer (encode then decode loses them)",
        )
    return data.encode_text_prompt(text, tok)


def load_prompts(config, model_cfg: lm.LMConfig, tok) -> Prompts:
    """The run's prompts (see the module docstring), checked against the tokenizer and the vocabulary."""
    pc = config.prompts
    config_lib.require(pc.format in FORMATS, "prompts.format", f"{pc.format!r}; expected one of {FORMATS}")
    fmt = ("text" if tok is not None else "ids") if pc.format == "auto" else pc.format
    config_lib.require(
        fmt == "ids" or tok is not None,
        "prompts.format",
        f"'text' needs a tokenizer, but {config.model.hf_path!r} has no {hf.TOKENIZER_FILE}; use 'ids'",
    )
    if pc.text_file is None:
        config_lib.require(tok is not None, "prompts.text_file", "the arithmetic task needs a tokenizer; give a file")
        config_lib.require(pc.task_problems > 0, "prompts.task_problems", f"must be positive, got {pc.task_problems}")
        knobs = train_lm.knobs(_lm_config(config.lm.workdir) if config.lm.workdir else common.lm_experiment())
        if pc.task_num_steps is not None:
            knobs["num_steps"] = pc.task_num_steps
        rng = np.random.default_rng([data.split_seed(config.seed, "test"), 0])
        try:
            problems = arithmetic.sample_problems(rng, pc.task_problems, **knobs)
        except ValueError as e:
            raise config_lib.ConfigError(f"config key 'prompts.task_num_steps': {e}") from None
        texts = [arithmetic.format_prompt(p) for p in problems]
        return Prompts(texts, [_encode_text(tok, t, f"task prompt {i}") for i, t in enumerate(texts)], problems)
    config_lib.require(os.path.isfile(pc.text_file), "prompts.text_file", f"{pc.text_file!r} is not a file")
    with open(pc.text_file, encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f.read().splitlines(), 1) if line.strip()]
    lines = lines[: pc.limit] if pc.limit is not None else lines
    config_lib.require(bool(lines), "prompts.text_file", f"{pc.text_file!r} holds no non-empty line")
    texts, ids = [], []
    for n, line in lines:
        where = f"{pc.text_file!r} line {n}"
        if fmt == "ids":
            try:
                row = np.asarray([int(t) for t in line.split()], np.int64)
            except ValueError as e:
                raise config_lib.ConfigError(
                    f"config key 'prompts.text_file': {where}: expected whitespace-separated token ids ({e})"
                ) from None
            try:
                row = tok_lib.check_token_ids(row, model_cfg.vocab_size, where=where).astype(np.int32)
            except ValueError as e:
                raise config_lib.ConfigError(f"config key 'prompts.text_file': {e}") from None
        else:
            row = _encode_text(tok, line, where)
        config_lib.require(row.size > 0, "prompts.text_file", f"{where} encodes to no token")
        texts.append(line)
        ids.append(row)
    return Prompts(texts, ids)


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks keys, the model source, sampling settings and every prompt; returns the LMConfig. Compiles nothing."""
    config_lib.check_against(config, default_config.get_config())
    model_cfg = model_config(config)
    sc = config.sampling
    req = config_lib.require
    req(sc.temperature >= 0, "sampling.temperature", f"must be >= 0 (0 = greedy), got {sc.temperature}")
    req(
        sc.top_k is None or 1 <= sc.top_k <= model_cfg.vocab_size,
        "sampling.top_k",
        f"must be None or in [1, vocab_size={model_cfg.vocab_size}], got {sc.top_k}",
    )
    req(sc.top_p is None or 0 < sc.top_p <= 1, "sampling.top_p", f"must be None or in (0, 1], got {sc.top_p}")
    req(sc.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {sc.max_new_tokens}")
    req(sc.batch_size >= 1, "sampling.batch_size", f"must be >= 1, got {sc.batch_size}")
    stop_tokens(sc.stop_tokens, model_cfg)
    prompts = load_prompts(config, model_cfg, tokenizer(config, model_cfg))
    longest = int(np.argmax([p.size for p in prompts.ids]))
    room = model_cfg.max_seq_len - prompts.ids[longest].size
    req(
        sc.max_new_tokens <= room,
        "sampling.max_new_tokens",
        f"{sc.max_new_tokens} new tokens after the longest prompt (#{longest}, {prompts.ids[longest].size} tokens) "
        f"exceed the model's context max_seq_len={model_cfg.max_seq_len}; at most {room} fit",
    )
    return model_cfg


def load_model(config, workdir: str):
    """(params, LMConfig, tokenizer or None) of the run's model."""
    if config.model.hf_path is not None:
        model_cfg, params, tok = hf.model_from_config(config.model)
        return params, model_cfg, tok
    lm_config = _lm_config(config.lm.workdir)
    model_cfg, task = train_lm.make_task(lm_config)
    params = jax.device_get(loop.train(lm_config, config.lm.workdir, task).params)
    return params, model_cfg, tok_lib.tokenizer_for(model_cfg)


def generate_all(params, model_cfg: lm.LMConfig, prompts: list[np.ndarray], sampling, seed: int):
    """`inference.generate` over `prompts` in calls of `sampling.batch_size` rows: (tokens [P, N], lengths [P],
    logprobs [P, N]) host arrays; row i samples with `fold_in(key(seed), i)`."""
    B, P = sampling.batch_size, len(prompts)
    stop = stop_tokens(sampling.stop_tokens, model_cfg)
    root = jax.random.key(seed)
    tokens, lengths, logprobs = [], [], []
    for start in range(0, P, B):
        chunk = list(prompts[start : start + B])
        real = len(chunk)
        chunk += [chunk[0]] * (B - real)  # every call has B rows: one compile serves the last batch too
        keys = None
        if sampling.temperature > 0:
            keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(start, start + B))
        out = inference.generate(
            params,
            model_cfg,
            chunk,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            stop_tokens=stop,
            rng=keys,
        )
        tokens.append(np.asarray(out.tokens)[:real])
        lengths.append(np.asarray(out.lengths)[:real])
        logprobs.append(np.asarray(out.logprobs)[:real])
    return np.concatenate(tokens), np.concatenate(lengths), np.concatenate(logprobs)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Generates for every prompt and writes results/generations.jsonl and results/generate_summary.json; returns
    the summary."""
    validate(config)
    params, model_cfg, tok = load_model(config, workdir)
    prompts = load_prompts(config, model_cfg, tok)
    loop.write_config(config, workdir)
    stop = set(stop_tokens(config.sampling.stop_tokens, model_cfg))
    t0 = time.perf_counter()
    tokens, lengths, logprobs = generate_all(params, model_cfg, prompts.ids, config.sampling, config.seed)
    seconds = time.perf_counter() - t0
    records = []
    for i, (text, ids) in enumerate(zip(prompts.texts, prompts.ids)):
        n = int(lengths[i])
        new = tokens[i, :n]
        rec = dict(
            index=i,
            prompt=text,
            prompt_ids=ids.tolist(),
            prompt_length=int(ids.size),
            completion=None if tok is None else tok.decode(new),
            tokens=new.tolist(),
            length=n,
            stop_reason="stop_token" if n and int(new[-1]) in stop else "max_new_tokens",
            logprob=float(logprobs[i, :n].sum()),
        )
        if prompts.problems is not None:
            verdict = arithmetic.check_solution(prompts.problems[i], rec["completion"])
            rec.update(answer_correct=verdict.answer_correct, process_correct=verdict.process_correct)
        records.append(rec)
    summary = dict(
        model=config.model.hf_path or config.lm.workdir,
        prompts=len(records),
        source="task" if prompts.problems is not None else config.prompts.text_file,
        mean_prompt_length=float(np.mean([r["prompt_length"] for r in records])),
        mean_length=float(np.mean(lengths)),
        stop_reasons={k: sum(r["stop_reason"] == k for r in records) for k in ("stop_token", "max_new_tokens")},
        generated_tokens=int(lengths.sum()),
        seconds=seconds,
        tokens_per_second=float(lengths.sum()) / seconds,
        sampling=config.sampling.to_dict(),
    )
    if prompts.problems is not None:
        summary["task"] = policy_eval.grade(prompts.problems, [r["completion"] for r in records])
    if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
        with open(os.path.join(workdir, "results", "generations.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(workdir, "results", "generate_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print("\n".join(summary_lines(summary, records)))
    return summary


def summary_lines(summary: dict, records: list[dict], show: int = 3) -> list[str]:
    """A few lines for the terminal: counts, lengths, stop reasons, speed and the first completions."""
    s = summary
    lines = [
        f"{s['prompts']} prompts from {s['source']} (mean {s['mean_prompt_length']:.1f} tokens) -> "
        f"{s['generated_tokens']} new tokens (mean {s['mean_length']:.1f}; stops: {s['stop_reasons']}) in "
        f"{s['seconds']:.1f}s, compile included ({s['tokens_per_second']:.0f} tokens/s)"
    ]
    if "task" in s:
        lines.append(f"arithmetic exact match {s['task']['exact_match']:.3f} over {s['task']['n']} problems")
    for r in records[:show]:
        shown = r["completion"] if r["completion"] is not None else " ".join(map(str, r["tokens"]))
        lines.append(f"  [{r['index']}] {r['prompt'][:60]!r} -> {shown[:80]!r}")
    return lines
