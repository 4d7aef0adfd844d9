"""Train an SAE (or transcoder) on a hookpoint of an LM: get the LM, harvest, fit, evaluate, report.

The LM is an imported Hugging Face checkpoint when `config.model.hf_path` names a local folder (its tokens: the
local plain-text file `config.harvest.text_file`, tokenized by the folder's tokenizer.json, or whitespace-separated
token ids when it has none; see `text_batches`), else an arithmetic LM loaded from `config.lm.workdir` (a train_lm
workdir; resumed to its configured step count, so a finished run loads without training) or trained here into
`workdir/lm` from `config.lm.train_lm`, read on its own task. Activations of every `config.harvest.hookpoints` are
harvested in one pass per batch into `workdir/activations` (train split) and `workdir/activations_eval` (eval
split); rerunning reuses both. Only real tokens are harvested (`store.token_mask`: padding by mask, and the
model's own BOS).

The SAE trains with `sae.fit`, whose bookkeeping is the training loop's: its state is checkpointed (orbax) into
`workdir/sae_checkpoints` every `train.checkpoint_every` steps, rerunning the same command resumes there (a finished
run only re-evaluates), and its training metrics go to `workdir/metrics.jsonl` and `workdir/tensorboard/` as it
trains (one `train/` record per `sae.log_every` steps; records past a resumed checkpoint are dropped).

Artifacts in `workdir`: config.json, metrics.jsonl + tensorboard/ (the SAE's training history), sae_params.safetensors,
results/sae_metrics.json (reconstruction metrics on held-out tokens, CE loss recovered and delta LM loss spliced
into the LM, density histogram, throughput), report/features.html (tokens shown with the model's own tokenizer),
figures/density.png. CE loss recovered is null (and reported as undefined) when zero-ablating the hookpoint does not
raise the LM's loss: the ratio then means nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import ml_collections
import numpy as np

from configs.sae.common import sae_experiment
from experiments import train_lm
from framework import config as config_lib
from framework import sae, sharding
from framework.models import hf, lm
from framework.sae import defaults, report, store
from framework.tasks import data
from framework.tasks import tokenizer as tok_lib
from framework.training import loop
from framework.training import metrics as metrics_lib

log = logging.getLogger(__name__)


def _hf_path(config) -> str | None:
    return config.model.get("hf_path")


def _lm_config(config) -> ml_collections.ConfigDict:
    if _hf_path(config) is not None:
        return _text_source(config)
    if config.lm.workdir is None:
        return config.lm.train_lm
    path = os.path.join(config.lm.workdir, "config.json")
    if not os.path.exists(path):
        raise config_lib.ConfigError(f"config key 'lm.workdir': {config.lm.workdir!r} holds no config.json")
    with open(path) as f:
        d = json.load(f)
    return ml_collections.ConfigDict(d)


def validate(config: ml_collections.ConfigDict) -> lm.LMConfig:
    """Checks every section (SAE keys, hookpoints against the LM, d_in against its width); compiles nothing."""
    arch = config.sae.get("arch")
    if arch not in defaults.ARCHS:
        raise config_lib.ConfigError(
            f"config key 'sae.arch': unknown architecture {arch!r}; expected one of {defaults.ARCHS}"
        )
    config_lib.check_against(config, sae_experiment(arch))
    lm_config = _lm_config(config)
    model_cfg = _validate_hf(config) if _hf_path(config) is not None else train_lm.validate(lm_config)
    try:
        defaults.validate(config.sae)
        store.check_hookpoints(config.sae, model_cfg)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    names = lm.hookpoints(model_cfg)
    for h in config.harvest.hookpoints:
        config_lib.require(h in names, "harvest.hookpoints", f"unknown hookpoint {h!r}; expected one of {list(names)}")
    for key in ("hookpoint", "out_hookpoint"):
        h = config.sae[key]
        config_lib.require(
            h is None or h in config.harvest.hookpoints,
            f"sae.{key}",
            f"{h!r} is not harvested; add it to harvest.hookpoints {tuple(config.harvest.hookpoints)}",
        )
    for key in ("train_tokens", "eval_tokens", "batch_size"):
        config_lib.require(config.harvest[key] > 0, f"harvest.{key}", f"must be positive, got {config.harvest[key]}")
    for key in ("steps", "batch_size", "checkpoint_every"):
        config_lib.require(config.train[key] > 0, f"train.{key}", f"must be positive, got {config.train[key]}")
    per = math.lcm(config.sae.steps_per_call, config.sae.log_every)
    config_lib.require(
        config.train.checkpoint_every % per == 0,
        "train.checkpoint_every",
        f"{config.train.checkpoint_every} is not a multiple of {per} (sae.steps_per_call and sae.log_every)",
    )
    try:
        sharding.rules_from_config(config.mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"config section 'mesh': {e}") from None
    try:
        shape = sharding.mesh_shape(config.mesh)
    except ValueError as e:
        raise config_lib.ConfigError(f"config section 'mesh': {e}") from None
    config_lib.require(
        config.train.batch_size % (shape[0] * shape[1]) == 0,
        "train.batch_size",
        f"{config.train.batch_size} is not divisible by mesh.data*mesh.fsdp = {shape[0] * shape[1]}",
    )
    return model_cfg


def _validate_hf(config) -> lm.LMConfig:
    """The imported model's LMConfig (from its config.json, no weights) and its text source, checked."""
    path, text = _hf_path(config), config.harvest.text_file
    config_lib.require(
        config.lm.workdir is None,
        "lm.workdir",
        f"{config.lm.workdir!r} and model.hf_path={path!r} both name the LM; set one",
    )
    try:
        model_cfg = hf.hf_model_config(config.model)
    except (ValueError, FileNotFoundError) as e:
        raise config_lib.ConfigError(f"config key 'model.hf_path': {e}") from None
    config_lib.require(
        text is not None and os.path.isfile(text),
        "harvest.text_file",
        f"{text!r}: an imported model (model.hf_path) reads a local plain-text file; give its path",
    )
    seq_len = config.harvest.seq_len
    config_lib.require(
        2 <= seq_len <= model_cfg.max_seq_len,
        "harvest.seq_len",
        f"{seq_len} must be in [2, the model's max_seq_len={model_cfg.max_seq_len}]",
    )
    return model_cfg


def _text_source(config) -> ml_collections.ConfigDict:
    """What `token_batches` needs to read an imported model's text file (stands where an LM's train config would)."""
    return ml_collections.ConfigDict(
        dict(
            hf_path=_hf_path(config),
            text_file=config.harvest.text_file,
            seq_len=config.harvest.seq_len,
            seed=config.seed,
            splice_batch_size=config.harvest.batch_size,
        )
    )


def _is_text(lm_config) -> bool:
    return "text_file" in lm_config


def load_or_train_lm(config, workdir: str):
    """(params, model config, the LM's experiment config): imported from model.hf_path (the "config" is then its
    text source), or trained into workdir/lm, or resumed from lm.workdir."""
    lm_config = _lm_config(config)
    if _is_text(lm_config):
        model_cfg, params, _ = hf.model_from_config(config.model)
        return params, model_cfg, lm_config
    lm_dir = config.lm.workdir or os.path.join(workdir, "lm")
    spec = train_lm.parse(lm_config)
    model_cfg, task = train_lm.make_task(spec)
    state = loop.train(spec.run, lm_dir, task)
    return jax.device_get(state.params), model_cfg, lm_config


def text_rows(lm_config, model_cfg: lm.LMConfig, split: str) -> np.ndarray:
    """int32 [R, T] rows of an imported model's text file (`hf.text_file_ids` cut by `hf.text_rows`: T = seq_len,
    [BOS] first where the model has one; every `hf.EVAL_EVERY`-th row is `eval`)."""
    ids = hf.text_file_ids(lm_config.text_file, lm_config.hf_path, model_cfg, key="harvest.text_file")
    where = f"harvest.text_file {lm_config.text_file!r}"
    return hf.text_rows(ids, lm_config.seq_len, model_cfg.bos_id, split, key=where)


def text_batches(lm_config, model_cfg: lm.LMConfig, split: str, batch_size: int):
    """Endless batches of `text_rows` (a seeded order, reshuffled each pass): tokens, mask (every position is a
    real token) and loss_mask (every position after the first is a target)."""
    rows = text_rows(lm_config, model_cfg, split)
    rng = np.random.default_rng([lm_config.seed, data.SPLITS.index(split)])
    order = np.zeros(0, np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(rows))])
        take, order = order[:batch_size], order[batch_size:]
        tokens = rows[take]
        loss_mask = np.ones(tokens.shape, np.float32)
        loss_mask[:, 0] = 0.0
        yield {"tokens": tokens, "mask": np.ones(tokens.shape, bool), "loss_mask": loss_mask}


def token_batches(lm_config, split: str, batch_size: int, model_cfg: lm.LMConfig | None = None):
    """Endless batches of `split`: the LM's own task (packed: tokens, positions, segment_ids), or for an imported
    model (`model_cfg` then needed) `text_batches` of its text file."""
    if _is_text(lm_config):
        return text_batches(lm_config, model_cfg, split, batch_size)
    ds = data.make_dataset(
        seed=lm_config.seed,
        batch_size=batch_size,
        seq_len=lm_config.train.seq_len,
        loss_on=lm_config.task.loss_on,
        split=split,
        pack=lm_config.task.pack,
        **train_lm.knobs(lm_config),
    )
    return data.batch_iterator(ds, prefetch=0)


def harvest_split(params, model_cfg, lm_config, config, path: str, split: str, n_tokens: int):
    """The store at `path`, harvested now unless it is already complete."""
    if os.path.exists(os.path.join(path, "meta.json")):
        st = store.ActivationStore.open(path)
        if st.num_tokens == n_tokens and set(config.harvest.hookpoints) <= set(st.hookpoints):
            return st
    return store.harvest(
        params,
        model_cfg,
        config.harvest.hookpoints,
        token_batches(lm_config, split, config.harvest.batch_size, model_cfg),
        path,
        max_tokens=n_tokens,
        dtype=config.harvest.dtype,
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Gets the LM, harvests, trains the SAE, evaluates it (held out and spliced in), writes the report."""
    validate(config)
    sae_cfg = defaults.parse(config.sae)  # the SAE section, typed once
    os.makedirs(workdir, exist_ok=True)
    loop.write_config(config, workdir)
    params, model_cfg, lm_config = load_or_train_lm(config, workdir)
    train_store = harvest_split(
        params, model_cfg, lm_config, config, os.path.join(workdir, "activations"), "train", config.harvest.train_tokens
    )
    eval_store = harvest_split(
        params,
        model_cfg,
        lm_config,
        config,
        os.path.join(workdir, "activations_eval"),
        "eval",
        config.harvest.eval_tokens,
    )
    in_name, out_name = eval_store.resolve(sae_cfg)
    # config.mesh and its rules: the batch along the `batch` rule (data), latents along `latents` (tensor); one
    # device: no mesh at all.
    mesh = sharding.make_mesh(config.mesh) if np.prod(sharding.mesh_shape(config.mesh)) > 1 else None
    sae_params, fit_metrics = sae.fit(
        train_store,
        sae_cfg,
        steps=config.train.steps,
        batch_size=config.train.batch_size,
        seed=config.seed,
        mesh=mesh,
        rules=sharding.rules_from_config(config.mesh),
        checkpoint_dir=os.path.join(workdir, "sae_checkpoints"),
        checkpoint_every=config.train.checkpoint_every,
        metrics_dir=workdir,
        eval_activations=(np.asarray(eval_store.array(in_name)), np.asarray(eval_store.array(out_name))),
    )
    splice = splice_metrics(params, model_cfg, lm_config, sae_params, sae_cfg, config.eval.splice_batches)
    results = {
        "arch": sae_cfg.arch,
        "hookpoint": in_name,
        "out_hookpoint": out_name,
        "n_latents": sae_cfg.n_latents,
        "eval": fit_metrics["final"],
        "splice": splice,
        "tokens_per_s": fit_metrics["tokens_per_s"],
        "steps": config.train.steps,
    }
    summaries = report.feature_summaries(
        sae_params,
        sae_cfg,
        train_store,
        params,
        n_features=config.report.n_features,
        top=config.report.top_contexts,
        seed=config.seed,
        tokenizer=_report_tokenizer(lm_config, model_cfg),
    )
    if jax.process_index() == 0:
        _write_artifacts(workdir, _hf_path(config), sae_cfg, sae_params, results, summaries)
        print(metrics_lib.format_metrics("held-out SAE metrics:", results["eval"], skip=("density_histogram",)))
        print(metrics_lib.format_metrics("spliced into the LM:", splice))
    return dict(results, sae_params=sae_params, lm_params=params, summaries=summaries)


def _report_tokenizer(lm_config, model_cfg: lm.LMConfig):
    """The tokenizer the feature report shows tokens with: the imported folder's (None: ids), else the LM's own."""
    if _is_text(lm_config):
        if not os.path.exists(os.path.join(lm_config.hf_path, hf.TOKENIZER_FILE)):
            return None
        return tok_lib.tokenizer_for(model_cfg, folder=lm_config.hf_path)
    return tok_lib.get_tokenizer(model_cfg.tokenizer) if model_cfg.tokenizer in tok_lib.BUILTIN else None


def splice_metrics(params, model_cfg, lm_config, sae_params, sae_cfg, splice_batches: int) -> dict:
    """CE loss recovered and delta LM loss, averaged over `splice_batches` eval batches; CE loss recovered is
    None (`ce_loss_recovered_defined` False) when zero ablation does not raise the loss."""
    size = lm_config.splice_batch_size if _is_text(lm_config) else lm_config.train.batch_size
    batches = token_batches(lm_config, "eval", size, model_cfg)
    rows = []
    for _, b in zip(range(splice_batches), batches):
        rows.append(sae.metrics.spliced_lm_loss(params, model_cfg, b, sae_params, sae_cfg))
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("clean_loss", "sae_loss", "zero_ablation_loss")}
    out["ce_loss_recovered"] = sae.metrics.ce_loss_recovered(
        out["clean_loss"], out["sae_loss"], out["zero_ablation_loss"]
    )
    out["ce_loss_recovered_defined"] = out["ce_loss_recovered"] is not None
    out["delta_lm_loss"] = out["sae_loss"] - out["clean_loss"]
    return out


def _write_artifacts(workdir, hf_path, sae_cfg, sae_params, results, summaries) -> None:
    from matplotlib.figure import Figure  # not pyplot: leaves a notebook's plotting backend alone
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v) for k, v in sae_params.items()}, os.path.join(workdir, "sae_params.safetensors"))
    os.makedirs(os.path.join(workdir, "results"), exist_ok=True)
    with open(os.path.join(workdir, "results", "sae_metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    header = {
        "model": hf_path or "arithmetic LM",
        "arch": sae_cfg.arch,
        "hookpoint": results["hookpoint"],
        "latents": sae_cfg.n_latents,
        "FVU (held out)": f"{results['eval']['fvu']:.4f}",
        "L0": f"{results['eval']['l0']:.2f}",
        "dead fraction": f"{results['eval']['dead_fraction']:.4f}",
        "CE loss recovered": (
            f"{results['splice']['ce_loss_recovered']:.4f}"
            if results["splice"]["ce_loss_recovered"] is not None
            else "undefined (zero-ablating the hookpoint does not raise the loss)"
        ),
        "delta LM loss": f"{results['splice']['delta_lm_loss']:.4f}",
    }
    report.write_report(
        os.path.join(workdir, "report", "features.html"),
        summaries,
        title=f"{sae_cfg.arch} SAE features",
        header=header,
    )
    hist = results["eval"]["density_histogram"]
    os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    edges = np.asarray(hist["edges"])
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge")
    ax.set(xlabel="log10 feature density", ylabel="latents", title=f"{sae_cfg.arch}: {hist['dead']} dead latents")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "figures", "density.png"), dpi=110)
