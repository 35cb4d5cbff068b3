"""`flashlm sparsify`: a llama-family model made ReLU-sparse by self-distillation (ProSparse / "LLM in a flash").

The FFN's SiLU becomes ReLU; the student learns the original model's next-token distribution (KL to the teacher's
logits, both in one process) on the user's text, documentation found on the machine and the teacher's own samples.
An optional L1 penalty on the ReLU outputs pushes sparsity up: one coefficient per layer, raised while that
layer's zero fraction is under a target that ramps up over training (the progressive schedule of ProSparse, with
a per-layer controller so that every layer, not only the mean, reaches it). The embedding and output head stay
the teacher's and are copied into the output byte for byte. The last steps can run the forward pass through Q4_0
rounding (straight-through), so the quantized file keeps what training reached.

Needs PyTorch (`pip install flashlm[train]`) and, for useful speed, a GPU. Checkpoints go to the work folder and a
rerun with the same folder resumes. Writes the GGUF (with flashlm.ffn_activation = "relu") and a model card.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from flashlm.errors import InvalidOptionError, ModelFileError


@dataclass
class SparsifyOptions:
    model: str = ""                    # GGUF (llama architecture) or Hugging Face directory
    output: str = ""                   # the sparse GGUF; the model card is written beside it (.md)
    texts: list[str] = field(default_factory=list)      # training text files
    doc_dirs: list[str] = field(default_factory=list)   # folders searched for documentation and code text
    doc_max_mb: float = 100.0          # at most this much text from doc_dirs
    tokenizer: str | None = None       # a tokenizer.json (default: the model's own tokenizer)
    eval_text: str | None = None       # held-out text for the curve and the card (never trained on)
    work_dir: str = "sparsify-work"    # checkpoints, token caches, the curve
    seq_len: int = 512
    batch: int = 64                    # rows per step
    lr: float = 2e-4
    train_tokens: int = 100_000_000
    train_minutes: float = 0.0         # 0: no time limit; else progress runs on the clock (whichever ends first)
    stop_after_minutes: float = 0.0    # end this run after so many minutes of training, checkpointed, no GGUF yet
                                       # (a machine lent for 10 minutes at a time: the next run resumes)
    gen_tokens: int = 20_000_000       # teacher-sampled tokens
    gen_minutes: float = 0.0
    gen_batch: int = 1024
    temperature: float = 0.9
    target_sparsity: float = 0.0       # 0: no L1 penalty
    l1_start: float = 0.05             # fraction of training where the penalty starts (target from 0.6) ...
    l1_full: float = 0.5               # ... and where the target is reached
    qat_frac: float = 0.1              # last fraction of training run through Q4_0 rounding (q4_0 output only)
    quant: str = "q4_0"                # q4_0 or q8_0 for the block matrices
    eval_every_tokens: int = 5_000_000
    checkpoint_minutes: float = 3.0
    seed: int = 0
    device: str = "cuda"


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    lambdas: list[float] = field(default_factory=list)
    sparsity_ema: list[float] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)


def check_options(o: SparsifyOptions) -> None:
    if not o.model or not os.path.exists(o.model):
        raise InvalidOptionError(f"{o.model or 'MODEL'}: no such file or directory")
    if not o.output.endswith(".gguf"):
        raise InvalidOptionError(f"{o.output or '-o'}: the output must be a .gguf file")
    if o.quant not in ("q4_0", "q8_0"):
        raise InvalidOptionError(f"--quant {o.quant!r}: choose q4_0 or q8_0")
    if not 0.0 <= o.target_sparsity < 1.0:
        raise InvalidOptionError(f"--target-sparsity {o.target_sparsity}: must be in [0, 1)")
    if o.seq_len < 32 or o.batch < 1 or o.lr <= 0 or o.train_tokens < 1:
        raise InvalidOptionError("--seq-len >= 32, --batch >= 1, --lr > 0 and --train-tokens >= 1 are needed")
    if not 0.0 <= o.l1_start < o.l1_full <= 1.0:
        raise InvalidOptionError("the L1 ramp needs 0 <= --l1-start < --l1-full <= 1")
    for path in o.texts + ([o.eval_text] if o.eval_text else []):
        if not os.path.isfile(path):
            raise InvalidOptionError(f"{path}: no such file")
    for path in o.doc_dirs:
        if not os.path.isdir(path):
            raise InvalidOptionError(f"{path}: no such folder")


def source_gguf(o: SparsifyOptions) -> str:
    """The model as a GGUF: a Hugging Face directory is converted once (F32) into the work folder."""
    if not os.path.isdir(o.model):
        return o.model
    from flashlm.loaders.hf_convert import write_gguf

    path = os.path.join(o.work_dir, "source.f32.gguf")
    if not os.path.exists(path):
        write_gguf(o.model, path, "f32", force=False)
    return path


def _cached_rows(path: str, make) -> np.ndarray:
    if os.path.exists(path):
        return np.load(path)
    rows = make()
    np.save(path + ".tmp.npy", rows)
    os.replace(path + ".tmp.npy", path)
    return rows


def document_rows(o: SparsifyOptions, enc, bos: int) -> np.ndarray:
    """(N, seq_len) rows of the user's texts and the documentation found under doc_dirs (cached)."""
    from flashlm.tools.sparsify_data import (
        CODE_SUFFIXES,
        DOC_SUFFIXES,
        collect_texts,
        doc_rows,
        read_user_texts,
    )

    def make():
        texts = read_user_texts(o.texts, o.eval_text)
        budget = int(o.doc_max_mb * 1e6)
        texts += collect_texts(o.doc_dirs, DOC_SUFFIXES, int(budget * 0.7))
        texts += collect_texts(o.doc_dirs, CODE_SUFFIXES, int(budget * 0.3))
        return doc_rows(enc.encode_many(texts), o.seq_len, bos)

    return _cached_rows(os.path.join(o.work_dir, "docs.npy"), make)


def teacher_rows(o: SparsifyOptions, teacher, enc, docs: np.ndarray, bos: int, log) -> np.ndarray:
    """(N, seq_len) rows the teacher samples, appended to a cache in parts so an interrupted run keeps them."""
    import torch

    from flashlm.tools.sparsify_data import PromptMaker
    from flashlm.tools.sparsify_model import sample

    path = os.path.join(o.work_dir, "samples.npy")
    have = np.load(path) if os.path.exists(path) else np.zeros((0, o.seq_len), np.int32)
    maker = PromptMaker(enc, docs[:, 1:].reshape(-1), bos, prompt_len=min(64, o.seq_len // 4), seed=o.seed + len(have))
    gen = torch.Generator(device=o.device).manual_seed(o.seed + len(have))
    t0, parts = time.time(), [have]
    while sum(len(p) for p in parts) * o.seq_len < o.gen_tokens:
        if o.gen_minutes and time.time() - t0 > o.gen_minutes * 60:
            break
        prompts = maker.next_batch(o.gen_batch)
        ids = torch.from_numpy(prompts.ids.astype(np.int64)).to(o.device)
        out = sample(teacher, ids, o.seq_len - ids.shape[1], o.temperature, gen)
        parts.append(out.cpu().numpy().astype(np.int32))
        done = sum(len(p) for p in parts) * o.seq_len
        log(f"teacher samples: {done / 1e6:.1f}M tokens ({prompts.kind}), "
            f"{(done - len(have) * o.seq_len) / (time.time() - t0):,.0f} tok/s")
        rows = np.concatenate(parts)
        np.save(path + ".tmp.npy", rows)
        os.replace(path + ".tmp.npy", path)
    return np.concatenate(parts)


def progress_of(o: SparsifyOptions, st: TrainState) -> float:
    p = st.tokens / o.train_tokens
    if o.train_minutes:
        p = max(p, st.seconds / (o.train_minutes * 60))
    return min(p, 1.0)


def learning_rate(o: SparsifyOptions, p: float) -> float:
    """Linear warm-up over the first 2%, then cosine down to a tenth."""
    if p < 0.02:
        return o.lr * max(p, 1e-3) / 0.02
    return o.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - 0.02) / 0.98)))


def sparsity_target(o: SparsifyOptions, p: float) -> float:
    if not o.target_sparsity or p < o.l1_start:
        return 0.0
    ramp = min(1.0, (p - o.l1_start) / (o.l1_full - o.l1_start))
    start = min(0.6, o.target_sparsity)
    return start + (o.target_sparsity - start) * ramp


def update_lambdas(st: TrainState, zeros: list[float], target: float) -> None:
    """Per-layer integral controller: a layer under target gets a larger L1 coefficient, one above a smaller."""
    for i, z in enumerate(zeros):
        st.sparsity_ema[i] = 0.9 * st.sparsity_ema[i] + 0.1 * z
        if target > 0:
            st.lambdas[i] = min(10.0, max(1e-5, st.lambdas[i] * math.exp(0.5 * (target - st.sparsity_ema[i]))))


def distill_loss(teacher, student, rows, lambdas, use_l1: bool):
    """KL(teacher || student) per token, plus the L1 term; returns (loss, kl, per-layer zero fractions)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(rows), -1).flatten(0, 1)
    stats: list = []
    s_logp = torch.log_softmax(student(rows, stats=stats), -1).flatten(0, 1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / s_logp.shape[0]
    l1 = torch.stack([a for _, a in stats])
    loss = kl + (lambdas * l1).sum() if use_l1 else kl
    return loss, kl.detach(), torch.stack([z for z, _ in stats])


def save_checkpoint(o: SparsifyOptions, student, opt, st: TrainState) -> None:
    import torch

    path = os.path.join(o.work_dir, "checkpoint.pt")
    torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "state": asdict(st)}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(o: SparsifyOptions, student, opt, st: TrainState) -> TrainState:
    import torch

    path = os.path.join(o.work_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return st
    ck = torch.load(path, map_location=o.device, weights_only=False)
    student.load_state_dict(ck["student"])
    opt.load_state_dict(ck["opt"])
    return TrainState(**ck["state"])


def evaluate(o: SparsifyOptions, model, eval_ids, bos: int | None, st: TrainState | None) -> dict:
    from flashlm.tools.sparsify_model import held_out_score

    was_training = model.training
    model.eval()
    r = held_out_score(model, eval_ids, o.seq_len, bos)
    model.train(was_training)
    point = {"tokens": st.tokens if st else 0, "ppl": r.ppl, "sparsity_mean": float(np.mean(r.sparsity)),
             "sparsity_min": float(np.min(r.sparsity)), "sparsity": [round(z, 4) for z in r.sparsity]}
    if st is not None:
        st.curve.append(point)
    return point


def train(o: SparsifyOptions, teacher, student, rows: np.ndarray, eval_ids, bos: int | None, log) -> TrainState:
    import torch

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=o.device == "cuda")
    n = student.shape.n_layers
    st = load_checkpoint(o, student, opt, TrainState(lambdas=[1e-3] * n, sparsity_ema=[0.5] * n))
    rng = np.random.default_rng(o.seed + st.step)
    tokens_per_step, last_ck, last_log, t_start, tok_start = o.batch * o.seq_len, time.time(), 0.0, time.time(), st.tokens
    next_eval = (st.tokens // o.eval_every_tokens + 1) * o.eval_every_tokens
    while (p := progress_of(o, st)) < 1.0:
        if o.stop_after_minutes and time.time() - t_start > o.stop_after_minutes * 60:
            log(f"stopping after {o.stop_after_minutes} minutes at {p:.1%} of training; run again to resume")
            break
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, p)
        student.fake_quant = o.quant == "q4_0" and p >= 1.0 - o.qat_frac
        batch = torch.from_numpy(rows[rng.integers(0, len(rows), o.batch)].astype(np.int64)).to(o.device)
        target = sparsity_target(o, p)
        lambdas = torch.tensor(st.lambdas, device=o.device)
        loss, kl, zeros = distill_loss(teacher, student, batch, lambdas, target > 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        zeros = zeros.tolist()
        update_lambdas(st, zeros, target)
        st.step, st.tokens, st.seconds = st.step + 1, st.tokens + tokens_per_step, st.seconds + time.time() - t0
        if time.time() - last_log > 10:
            last_log = time.time()
            rate = (st.tokens - tok_start) / (time.time() - t_start)
            log(f"step {st.step} {p:.1%} tokens {st.tokens / 1e6:.1f}M kl {float(kl):.4f} sparsity "
                f"{np.mean(zeros):.3f} (min {min(zeros):.3f}, target {target:.3f}) lr {learning_rate(o, p):.2e} "
                f"{rate:,.0f} tok/s")
        if eval_ids and st.tokens >= next_eval:
            next_eval += o.eval_every_tokens
            pt = evaluate(o, student, eval_ids, bos, st)
            log(f"held-out: tokens {st.tokens / 1e6:.1f}M ppl {pt['ppl']:.3f} sparsity {pt['sparsity_mean']:.3f} "
                f"(min {pt['sparsity_min']:.3f})")
        if time.time() - last_ck > o.checkpoint_minutes * 60:
            save_checkpoint(o, student, opt, st)
            last_ck = time.time()
    save_checkpoint(o, student, opt, st)
    return st


def load_models(src: str, device: str):
    import torch

    from flashlm.tools.sparsify_model import Llama

    teacher = Llama.from_gguf(src, "silu").to(device=device, dtype=torch.bfloat16).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = Llama.from_gguf(src, "relu").to(device).train()
    return teacher, student


def run(o: SparsifyOptions, log=lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """The whole tool: data, teacher samples, training, the GGUF and its model card. Returns the card's figures."""
    check_options(o)
    try:
        import torch
    except ImportError:
        raise InvalidOptionError("sparsify needs PyTorch: pip install 'flashlm[train]'") from None
    if o.device == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda: no CUDA device is visible to PyTorch (use --device cpu to try)")
    from flashlm.tools.sparsify_data import TextEncoder
    from flashlm.tools.sparsify_export import finish

    os.makedirs(o.work_dir, exist_ok=True)
    torch.manual_seed(o.seed)
    src = source_gguf(o)
    enc = TextEncoder(src, o.tokenizer)
    bos = bos_id(src)
    docs = document_rows(o, enc, bos)
    log(f"document text: {docs.size / 1e6:.1f}M tokens in {len(docs)} rows")
    teacher, student = load_models(src, o.device)
    samples = teacher_rows(o, teacher, enc, docs, bos, log) if o.gen_tokens else docs[:0]
    rows = np.concatenate([docs, samples])
    if len(rows) == 0:
        raise InvalidOptionError("no training text: give --text, --doc-dir or teacher samples (--gen-tokens)")
    eval_ids = []
    if o.eval_text:
        with open(o.eval_text, encoding="utf-8", errors="ignore") as fh:
            eval_ids = enc.encode_many([fh.read()])[0]
    chunk_bos = bos if adds_bos(src) else None  # held-out chunks start as flashlm perplexity's do
    baseline = evaluate(o, teacher, eval_ids, chunk_bos, None) if eval_ids else None
    st = train(o, teacher, student, rows, eval_ids, chunk_bos, log)
    if progress_of(o, st) < 1.0:  # stopped on --stop-after-minutes: the checkpoint holds it
        return {"stopped": True, "tokens": st.tokens, "curve": st.curve, "baseline": baseline}
    data = {"document_tokens": int(docs.size), "teacher_sample_tokens": int(samples.size), "texts": o.texts,
            "doc_dirs": o.doc_dirs}
    return finish(o, src, student, teacher, enc, st, data, baseline, eval_ids, chunk_bos, log)


def bos_id(src: str) -> int:
    from flashlm.loaders.gguf_reader import GGUFFile

    with GGUFFile(src) as f:
        value = f.get("tokenizer.ggml.bos_token_id")
    if value is None:
        raise ModelFileError(f"{src}: no tokenizer.ggml.bos_token_id")
    return int(value)


def adds_bos(src: str) -> bool:
    from flashlm.loaders.gguf_reader import GGUFFile

    with GGUFFile(src) as f:
        return bool(f.get("tokenizer.ggml.add_bos_token", False))
