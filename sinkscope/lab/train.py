"""Pre-train a small Llama-style LM of one attention variant: deterministic and resumable.

Why a trainer of its own. The claims under test (Gu et al., Li et al.) are about how training
shapes attention, so the lab needs runs that are cheap (minutes on two CPU cores), exactly
repeatable for a seed, resumable after a kill, and that log the sink while it forms.

One run (``train(TrainConfig(...), out)``) writes into ``out``:

``run.json``
    the config, the corpus (source, split sizes), model size, versions.
``log.jsonl``
    one JSON record per evaluation (every ``eval_every`` steps and at step 0): ``step``,
    ``tokens``, ``lr``, ``train_loss`` (mean over the steps since the previous record),
    ``val_loss`` (fixed held-out windows), ``sink_rate`` (Sink_1^eps in %, position 0, Gu et
    al.'s definition, from the model's own attention weights), ``alpha0`` (mean alpha of
    position 0) and ``alpha0_per_layer``, ``tokens_per_s`` (training steps only) and, for
    ``key-bias``, ``bias_mass`` / ``bias_sink_rate`` / ``bias_mass_per_layer`` (attention on the
    bias slot). Each line is appended and flushed (``fsync``) when it is written.
``last/``
    the resume point, rewritten atomically at every record: a Hugging Face folder (loads with
    :func:`circuits.models.load_model`) plus ``optimizer.pt`` and ``trainer_state.json``.
``checkpoints/step-NNNNNN/``
    Hugging Face folders every ``checkpoint_every`` steps (0: none).
``final/``
    the finished model (a Hugging Face folder); its presence marks the run complete.

Determinism: the weights are initialised under ``torch.manual_seed(seed)``, the batch of
step ``s`` is drawn by ``numpy.random.default_rng([seed, s])`` (a pure function of seed and
step), there is no dropout, the learning rate is a function of the step, and the thread
count is fixed (``threads``, default 1: float reductions can depend on it). Two runs with one
config give bit-identical losses and weights.

Resuming: running the same config into the same ``out`` continues from ``last/``; records
after that step are dropped from ``log.jsonl`` and recomputed. A different config in the same
``out`` is refused (:class:`LabError`), and a complete run returns at once.

Sink_1^eps is computed on ``sink_sequences`` fixed validation windows of ``sink_tokens`` tokens
(``<bos>`` + bytes; Gu et al.: T = 64, 100 sequences, eps = 0.3) from the attention weights the
Hugging Face model returns with ``output_attentions=True`` through the variant's registered
attention function. :func:`circuits.measure.measure` on a checkpoint loaded with ``load_model``
gives the same number (``tests/test_lab.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from transformers import LlamaConfig

from circuits import variants as V
from circuits.checks import check_eps, check_float, check_int, load_json
from circuits.errors import SinkscopeError
from circuits.measure import attention_received
from circuits.models import byte_tokenizer
from circuits.output import exclusive
from sinkscope.lab import corpus as corpus_mod

SCHEMA = "sinkscope.lab.run/1"


class LabError(SinkscopeError, ValueError):
    """Bad lab input: a bad config, a mismatching resume, an unknown variant or corpus."""


class TrainingInterrupted(RuntimeError):
    """Raised by ``train(..., interrupt_after=k)`` to simulate a kill (tests)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run. Defaults: the comparison's model and schedule."""

    variant: str = "softmax"
    steps: int = 500
    seed: int = 0
    corpus: str = "shakespeare"
    # model: Llama-style, byte-level vocabulary (259)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    sigmoid_bias: float | None = None  # sigmoid-nonorm only; None: -log(n_ctx)
    # optimisation
    batch_size: int = 8
    lr: float = 5e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # logging and checkpoints
    eval_every: int = 50
    checkpoint_every: int = 0
    val_windows: int = 32
    sink_sequences: int = 100
    sink_tokens: int = 64
    eps: float = 0.3
    threads: int = 1

    def validate(self) -> "TrainConfig":
        V.check_variant(self.variant)
        if self.corpus not in corpus_mod.CORPORA:
            raise LabError(f"unknown corpus {self.corpus!r}; choose one of {', '.join(corpus_mod.CORPORA)}")
        positive = ("steps", "d_model", "n_layers", "n_heads", "d_mlp", "n_ctx", "batch_size", "eval_every",
                    "val_windows", "sink_sequences", "sink_tokens", "threads")
        for name in positive:
            check_int(getattr(self, name), name, error=LabError, rule="positive (an integer >= 1)")
        for name in ("seed", "warmup_steps", "checkpoint_every"):
            check_int(getattr(self, name), name, minimum=0, error=LabError)
        if self.d_model % self.n_heads:
            raise LabError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        # every number with its range, NaN and the infinities refused by name: a NaN weight decay
        # would otherwise train and fail later as "the loss became nan ... lower --lr"
        check_float(self.lr, "lr", low=0, low_open=True, error=LabError)
        check_float(self.min_lr_ratio, "min_lr_ratio", low=0, high=1, error=LabError)
        check_float(self.weight_decay, "weight_decay", low=0, error=LabError)
        check_float(self.beta1, "beta1", low=0, high=1, high_open=True, error=LabError)
        check_float(self.beta2, "beta2", low=0, high=1, high_open=True, error=LabError)
        check_float(self.grad_clip, "grad_clip", low=0, error=LabError)
        check_float(self.sigmoid_bias, "sigmoid_bias", error=LabError, allow_none=True)
        check_eps(self.eps, "eps", error=LabError)
        if self.sink_tokens > self.n_ctx:
            raise LabError(f"sink_tokens ({self.sink_tokens}) cannot exceed n_ctx ({self.n_ctx})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise LabError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data)

    def hf_config(self):
        extra = {}
        if self.variant == "sigmoid-nonorm":
            extra["sinkscope_sigmoid_bias"] = (self.sigmoid_bias if self.sigmoid_bias is not None
                                               else V.default_sigmoid_bias(self.n_ctx))
        return LlamaConfig(
            vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258,
            hidden_size=self.d_model, intermediate_size=self.d_mlp, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=self.n_heads,
            max_position_embeddings=self.n_ctx, tie_word_embeddings=False, rms_norm_eps=1e-6, **extra,
        )


@dataclass
class TrainResult:
    out: Path
    config: TrainConfig
    records: list[dict]
    resumed_from: int  # 0 for a fresh run

    @property
    def final(self) -> dict:
        return self.records[-1]


# --------------------------------------------------------------------------- helpers


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimisation step ``step`` (1-based): linear warmup, cosine to min."""
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, cfg: TrainConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on the matrices only. ``fused``: one fused kernel per step (a
    CUDA model, ``bench/gpu_check.py --lab``); the default per-parameter loop is the CPU's,
    whose results the lab's runs were recorded with."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


class EvalData:
    """The fixed evaluation windows of a run (validation split only)."""

    def __init__(self, corpus: corpus_mod.Corpus, cfg: TrainConfig, bos: int):
        val = corpus.val
        self.loss_x = corpus_mod.windows(val, corpus_mod.window_starts(val.size, cfg.n_ctx - 1, cfg.val_windows), cfg.n_ctx, bos)
        starts = corpus_mod.window_starts(val.size, cfg.sink_tokens - 1, cfg.sink_sequences)
        self.sink_x = corpus_mod.windows(val, starts, cfg.sink_tokens, bos)


@torch.no_grad()
def sink_statistics(model, tokens: torch.Tensor, eps: float, *, chunk: int = 25) -> dict[str, Any]:
    """Sink_1^eps (position 0) and mean alpha from the HF model's own attention weights.

    ``tokens``: ``[N, T]`` full windows (no padding), moved to the model's device. Gu et al.'s
    alpha: the mean attention a key receives from the queries at or after it; the indicator is
    thresholded per sequence, layer and head, then averaged (percent). For ``key-bias`` the bias
    slot's mass is added.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    alpha0, bias = [], []
    for i in range(0, tokens.shape[0], chunk):
        x = tokens[i : i + chunk].to(device)
        lengths = torch.full((x.shape[0],), x.shape[1], device=device)
        out = model(input_ids=x, output_attentions=True, use_cache=False)
        alpha0.append(torch.stack([attention_received(a.float(), lengths)[0][:, :, 0] for a in out.attentions], 1))
        if getattr(model.config, "sinkscope_variant", None) == "key-bias":
            bias.append(torch.stack([V.bias_slot_mass(a, lengths) for a in out.attentions], 1))
    model.train(was_training)
    a0 = torch.cat(alpha0).cpu().numpy()  # [N, L, H]
    stats: dict[str, Any] = {
        "sink_rate": float(100.0 * (a0 > eps).mean()),
        "alpha0": float(a0.mean()),
        "alpha0_per_layer": a0.mean(axis=(0, 2)).round(5).tolist(),
    }
    if bias:
        b = torch.cat(bias).float().cpu().numpy()
        stats.update(bias_mass=float(b.mean()), bias_sink_rate=float(100.0 * (b > eps).mean()),
                     bias_mass_per_layer=b.mean(axis=(0, 2)).round(5).tolist())
    return stats


@torch.no_grad()
def val_loss(model, tokens: torch.Tensor, *, chunk: int = 16) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], chunk):
        x = tokens[i : i + chunk].to(device)
        logits = model(input_ids=x, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_log(out: str | Path) -> list[dict]:
    """The records of a run's ``log.jsonl`` (a torn last line is ignored)."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _rewrite_log(out: Path, records: list[dict]) -> None:
    tmp = out / "log.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out / "log.jsonl")


def _swap_dir(staging: Path, target: Path) -> None:
    """Replace ``target`` by ``staging`` (a crash leaves either the old or the new one)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)


def _recover_dir(target: Path) -> None:
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def _lab_info(cfg: TrainConfig, step: int) -> dict:
    return {"step": step, "seed": cfg.seed, "corpus": cfg.corpus, "train_config": cfg.to_dict(),
            "prepend_bos": True, "tokenizer": "byte-level (circuits.models.byte_tokenizer)"}


def _save_hf(model, tokenizer, cfg: TrainConfig, step: int, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        V.save_hf_folder(model, tokenizer, staging, _lab_info(cfg, step))
        _swap_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _save_resume_point(model, optimizer, tokenizer, cfg: TrainConfig, step: int, out: Path) -> None:
    target = out / "last"
    staging = Path(tempfile.mkdtemp(prefix=".last.tmp-", dir=out))
    try:
        V.save_hf_folder(model, tokenizer, staging, _lab_info(cfg, step))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        (staging / "trainer_state.json").write_text(json.dumps({"step": step}), encoding="utf-8")
        _swap_dir(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "transformer-lens", "sinkscope"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def n_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return {"total": total, "non_embedding": total - embed}


# --------------------------------------------------------------------------- the run


def _load_run_json(out: Path) -> dict | None:
    path = out / "run.json"
    if not path.is_file():
        return None
    try:
        doc = load_json(path.read_text(encoding="utf-8"), str(path), error=LabError)
    except LabError as exc:
        raise LabError(f"{exc}: it is corrupt; delete {out} to start over") from None
    if not isinstance(doc, dict):
        raise LabError(f"{path} is corrupt (not a JSON object); delete {out} to start over")
    return doc


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    corpus: corpus_mod.Corpus | None = None,
    progress: Callable[[dict], None] | None = None,
    interrupt_after: int | None = None,
) -> TrainResult:
    """Train (or resume, or return) the run ``config`` in folder ``out``.

    Args:
        corpus: an already loaded corpus (must be ``config.corpus``); loaded when None.
        progress: called with every log record as it is written.
        interrupt_after: raise :class:`TrainingInterrupted` after this optimisation step, as a
            kill would (tests of resuming).
    """
    cfg = config.validate()
    out = Path(out)
    with exclusive(out, "the run folder"):  # one run per folder: a second one at once is refused, not interleaved
        return _train(cfg, out, corpus=corpus, progress=progress, interrupt_after=interrupt_after)


def _train(cfg: TrainConfig, out: Path, *, corpus, progress, interrupt_after) -> TrainResult:
    """:func:`train`'s work, in a folder this process holds."""
    previous = _load_run_json(out)
    if previous is not None and previous.get("config") != cfg.to_dict():
        diff = {k: (previous.get("config", {}).get(k), v) for k, v in cfg.to_dict().items()
                if previous.get("config", {}).get(k) != v}
        raise LabError(f"{out} holds a run with another config (field: (old, new) = {diff}); "
                       "use another --out or delete it")
    if (out / "final" / V.LAB_FILE).is_file():
        records = read_log(out)
        if records and records[-1]["step"] == cfg.steps:
            return TrainResult(out, cfg, records, resumed_from=cfg.steps)

    tokenizer = byte_tokenizer()
    if corpus is None:
        corpus = corpus_mod.load_corpus(cfg.corpus, tokenizer)
    elif corpus.name != cfg.corpus:
        raise LabError(f"the corpus given is {corpus.name!r} but the config says {cfg.corpus!r}")
    bos = tokenizer.bos_token_id
    eval_data = EvalData(corpus, cfg, bos)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        _recover_dir(out / "last")
        resume_step = 0
        state_file = out / "last" / "trainer_state.json"
        if state_file.is_file() and previous is not None:
            resume_step = int(json.loads(state_file.read_text())["step"])
            model, _ = V.load_hf_folder(out / "last")
            model.train()
            optimizer = make_optimizer(model, cfg)
            optimizer.load_state_dict(torch.load(out / "last" / "optimizer.pt", weights_only=True))
            records = [r for r in read_log(out) if r["step"] <= resume_step]
            _rewrite_log(out, records)
        else:
            model = V.build_model(cfg.hf_config(), cfg.variant, seed=cfg.seed)
            model.train()
            optimizer = make_optimizer(model, cfg)
            records = []
            (out / "log.jsonl").unlink(missing_ok=True)
            run = {"schema": SCHEMA, "config": cfg.to_dict(), "corpus": corpus.describe(),
                   "parameters": n_parameters(model), "tokens_per_step": cfg.batch_size * cfg.n_ctx,
                   "attn_implementation": V.ATTN_IMPLEMENTATION[cfg.variant], "versions": _versions()}
            (out / "run.json").write_text(json.dumps(run, indent=1), encoding="utf-8")

        def record(step: int, train_losses: list[float], train_seconds: float) -> dict:
            rec = {"step": step, "tokens": step * cfg.batch_size * cfg.n_ctx, "lr": lr_at(cfg, max(step, 1)),
                   "train_loss": float(np.mean(train_losses)) if train_losses else None,
                   "val_loss": val_loss(model, eval_data.loss_x),
                   **sink_statistics(model, eval_data.sink_x, cfg.eps),
                   "tokens_per_s": (len(train_losses) * cfg.batch_size * cfg.n_ctx / train_seconds
                                    if train_seconds > 0 else None)}
            _append_jsonl(out / "log.jsonl", rec)
            records.append(rec)
            if progress is not None:
                progress(rec)
            return rec

        if resume_step == 0:
            record(0, [], 0.0)
            _save_resume_point(model, optimizer, tokenizer, cfg, 0, out)

        losses: list[float] = []
        seconds = 0.0
        n_train = corpus.train.size
        for step in range(resume_step + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            starts = corpus_mod.batch_starts(n_train, cfg.n_ctx - 1, cfg.batch_size, cfg.seed, step)
            x = corpus_mod.windows(corpus.train, starts, cfg.n_ctx, bos)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            seconds += time.perf_counter() - t0
            if not math.isfinite(value):
                raise LabError(f"the loss became {value} at step {step}; lower --lr")
            losses.append(value)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record(step, losses, seconds)
                losses, seconds = [], 0.0
                _save_resume_point(model, optimizer, tokenizer, cfg, step, out)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                (out / "checkpoints").mkdir(exist_ok=True)
                _save_hf(model, tokenizer, cfg, step, out / "checkpoints" / f"step-{step:06d}")
            if interrupt_after is not None and step >= interrupt_after and step < cfg.steps:
                raise TrainingInterrupted(f"interrupted after step {step}")
        _save_hf(model, tokenizer, cfg, cfg.steps, out / "final")
        return TrainResult(out, cfg, records, resumed_from=resume_step)
    finally:
        torch.set_num_threads(previous_threads)


# --------------------------------------------------------------------------- throughput


def plain_loop(cfg: TrainConfig, corpus: corpus_mod.Corpus, steps: int) -> float:
    """Tokens/s of the plainest PyTorch loop on the same model and data: forward with labels,
    backward, AdamW step, zero_grad. No schedule, clipping, logging or checkpoints."""
    bos = byte_tokenizer().bos_token_id
    model = V.build_model(cfg.hf_config(), cfg.variant, seed=cfg.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, foreach=False)
    batches = [corpus_mod.windows(corpus.train, corpus_mod.batch_starts(corpus.train.size, cfg.n_ctx - 1,
                                                                       cfg.batch_size, cfg.seed, s), cfg.n_ctx, bos)
               for s in range(1, steps + 1)]
    t0 = time.perf_counter()
    for x in batches:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * cfg.batch_size * cfg.n_ctx / (time.perf_counter() - t0)


def throughput(cfg: TrainConfig, *, steps: int | None = None, repeats: int = 2,
               corpus: corpus_mod.Corpus | None = None) -> dict[str, Any]:
    """Tokens/s of :func:`train` against :func:`plain_loop`, same config, same process.

    The two alternate ``repeats`` times (ABAB) so that load from other jobs on the machine
    hits both; the medians are compared. ``steps`` defaults to ``eval_every`` so that the
    trainer's end-to-end figure includes one evaluation and one resume checkpoint per
    ``eval_every`` steps (plus the step-0 evaluation and the final save, which a long run
    amortises: the steady-state figure excludes them).
    """
    cfg = cfg.validate()
    steps = steps or cfg.eval_every
    bench = dataclasses.replace(cfg, steps=steps, warmup_steps=min(cfg.warmup_steps, steps))
    corpus = corpus or corpus_mod.load_corpus(cfg.corpus)
    previous = torch.get_num_threads()
    plain, steady, end_to_end = [], [], []
    try:
        for _ in range(repeats):
            torch.set_num_threads(cfg.threads)
            plain.append(plain_loop(bench, corpus, steps))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = train(bench, tmp, corpus=corpus)
                wall = time.perf_counter() - t0
            trained = [r for r in result.records if r["step"] > 0]
            steady.append(float(np.median([r["tokens_per_s"] for r in trained])))
            end_to_end.append(steps * cfg.batch_size * cfg.n_ctx / wall)
    finally:
        torch.set_num_threads(previous)
    med = lambda xs: float(np.median(xs))  # noqa: E731
    return {
        "steps": steps, "repeats": repeats, "threads": cfg.threads, "variant": cfg.variant,
        "tokens_per_step": cfg.batch_size * cfg.n_ctx,
        "plain_tokens_per_s": med(plain), "trainer_steady_tokens_per_s": med(steady),
        "trainer_end_to_end_tokens_per_s": med(end_to_end),
        "ratio_steady": med(steady) / med(plain), "ratio_end_to_end": med(end_to_end) / med(plain),
        "raw": {"plain": plain, "steady": steady, "end_to_end": end_to_end},
    }
