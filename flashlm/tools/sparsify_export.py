"""The end of `flashlm sparsify`: the sparse GGUF, its scores on the held-out text, and the model card.

The GGUF keeps the source's metadata (tokenizer, chat template) and adds flashlm.ffn_activation = "relu". Block
matrices are quantized with gguf-py's reference quantizer; norms stay F32; the embedding (and an untied output
head), which training does not change, are copied byte for byte and written last.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as QT
from gguf.constants import LlamaFileType

from flashlm.atomic_file import discard, finish_gguf, temp_path
from flashlm.flash_store.writer import copy_metadata
from flashlm.loaders.gguf_reader import GGUFFile
from flashlm.loaders.keys import KEY_FFN_ACTIVATION

QUANTS = {"q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0), "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
VOCAB_TENSORS = ("token_embd.weight", "output.weight")
CHAT_PROMPTS = ("What is the capital of France?", "Give me three tips for staying focused while studying.",
                "Explain what a computer virus is in two sentences.")


def sparse_tensors(student, qtype: QT) -> list[tuple[str, np.ndarray, QT]]:
    """(name, data, type) of the trained tensors: matrices quantized, norms F32."""
    out = []
    for i in range(student.shape.n_layers):
        for name, t in student.layer_tensors(i).items():
            a = np.ascontiguousarray(t.numpy(), np.float32)
            out.append((name, a, QT.F32) if a.ndim == 1 else (name, gguf.quants.quantize(a, qtype), qtype))
    out.append(("output_norm.weight", student.output_norm.detach().float().cpu().numpy(), QT.F32))
    return out


def write_sparse_gguf(src: str, student, quant: str, dst: str) -> None:
    """The student's blocks (quantized), then the source's vocabulary tensors (last, byte for byte) and metadata."""
    qtype, file_type = QUANTS[quant]
    tensors = sparse_tensors(student, qtype)
    tmp = temp_path(dst)
    try:
        with GGUFFile(src) as f:
            w = gguf.GGUFWriter(tmp, "llama")
            copy_metadata(w, f, skip=lambda key: key.startswith("flashlm.") or key == "general.file_type")
            w.add_file_type(file_type)
            w.add_string(KEY_FFN_ACTIVATION, "relu")
            for name, data, qt in tensors:
                w.add_tensor(name, data, raw_dtype=None if qt == QT.F32 else qt)
            for name in VOCAB_TENSORS:
                if name in f.tensors:
                    info = f.tensors[name]
                    w.add_tensor(name, np.array(f.tensor_bytes(name)).reshape(info.shape[0], -1),
                                 raw_dtype=QT(info.ggml_type))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finish_gguf(w, tmp, dst)
    except BaseException:
        discard(tmp)
        raise


def chat_answers(model, enc, device: str, max_new: int = 64) -> list[tuple[str, str]]:
    """Greedy answers to CHAT_PROMPTS in the ChatML format of SmolLM2's template."""
    import torch

    from flashlm.tools.sparsify_data import SYSTEM_PROMPT
    from flashlm.tools.sparsify_model import sample

    stop = enc.encode_chat("<|im_end|>")[0]
    out = []
    for q in CHAT_PROMPTS:
        ids = enc.encode_chat(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                              "<|im_start|>assistant\n")
        gen = sample(model, torch.tensor([ids], device=device), max_new, 0.0, stop_id=stop)[0, len(ids):].tolist()
        out.append((q, enc.decode(gen[:gen.index(stop)] if stop in gen else gen).strip()))
    return out


def _curve_table(curve: list[dict]) -> list[str]:
    lines = ["| tokens trained | held-out ppl | sparsity mean | sparsity min |", "| ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['tokens'] / 1e6:.1f}M | {p['ppl']:.3f} | {p['sparsity_mean']:.3f} | {p['sparsity_min']:.3f} |"
              for p in curve]
    return lines


def _card_intro(o) -> str:
    l1 = (f", with a per-layer L1 penalty on the ReLU outputs ramped to a {o.target_sparsity:.0%} zero target"
          if o.target_sparsity else "")
    return (f"A ReLU-sparse version of `{os.path.basename(o.model)}`, made with `flashlm sparsify` by "
            "self-distillation: the FFN's SiLU replaced by ReLU (`flashlm.ffn_activation = \"relu\"`), the student "
            f"trained to match the original's next-token distribution (KL on its logits){l1}. Embedding and output "
            f"head are the original's, byte for byte; the block matrices are {o.quant.upper()}.")


def _card_data(o, data: dict) -> list[str]:
    dirs = ", ".join(data["doc_dirs"]) or "-"
    files = f" and {', '.join(data['texts'])}" if data["texts"] else ""
    return [(f"- teacher samples: {data['teacher_sample_tokens'] / 1e6:.1f}M tokens (temperature {o.temperature}; "
             "chats the teacher writes itself, instructions about document snippets, continuations)"),
            f"- document text: {data['document_tokens'] / 1e6:.1f}M tokens from {dirs}{files} (license texts excluded)",
            f"- held-out evaluation text (never trained on): {o.eval_text or '-'}"]


def _card_training(o, s: dict) -> str:
    qat = f", last {o.qat_frac:.0%} through Q4_0 rounding" if o.quant == "q4_0" else ""
    return (f"- {s['steps']} steps of {o.batch} x {o.seq_len} tokens: {s['tokens'] / 1e6:.1f}M tokens in "
            f"{s['seconds'] / 60:.1f} min ({s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s), AdamW lr {o.lr:g} "
            f"(cosine){qat}")


def _card_figures(o, s: dict) -> list[str]:
    e, b = s["eval"], s["baseline"]
    return [f"## Figures (held-out text, context {o.seq_len}, this file vs the original)", "",
            f"- perplexity {e['ppl']:.3f} vs {b['ppl']:.3f} ({e['ppl'] / b['ppl']:.3f}x)",
            (f"- FFN zeros per token: mean {e['sparsity_mean']:.3f}, min over layers {e['sparsity_min']:.3f} "
             f"(original: {b['sparsity_mean']:.3f} of gate values <= 0)"),
            "- per layer: " + ", ".join(f"{z:.3f}" for z in e["sparsity"]), "", "### Curve", "",
            *_curve_table(s["curve"]), ""]


def model_card(o, summary: dict) -> str:
    lines = [f"# {os.path.basename(o.output)}", "", _card_intro(o), "", "## Data", "",
             *_card_data(o, summary["data"]), "", "## Training", "", _card_training(o, summary), ""]
    if summary.get("eval"):
        lines += _card_figures(o, summary)
    lines += ["## Greedy chat answers", ""]
    lines += [f"- **{q}** {a}" for q, a in summary["chat"]]
    return "\n".join(lines) + "\n"


def finish(o, src, student, teacher, enc, st, data: dict, baseline, eval_ids, bos: int | None, log) -> dict:
    import torch

    from flashlm.tools.sparsify import evaluate
    from flashlm.tools.sparsify_model import Llama

    write_sparse_gguf(src, student, o.quant, o.output)
    log(f"wrote {o.output} ({os.path.getsize(o.output) / 1e6:.1f} MB)")
    exported = Llama.from_gguf(o.output, "relu").to(device=o.device, dtype=torch.bfloat16).eval()
    summary = {"steps": st.step, "tokens": st.tokens, "seconds": st.seconds, "data": data, "curve": st.curve,
               "baseline": baseline, "options": {k: v for k, v in vars(o).items()}}
    if eval_ids:
        summary["eval"] = evaluate(o, exported, eval_ids, bos, None)
        log(f"exported: ppl {summary['eval']['ppl']:.3f} vs original {baseline['ppl']:.3f}, sparsity mean "
            f"{summary['eval']['sparsity_mean']:.3f} min {summary['eval']['sparsity_min']:.3f}")
    summary["chat"] = chat_answers(exported, enc, o.device)
    summary["teacher_chat"] = chat_answers(teacher, enc, o.device)
    for q, a in summary["chat"]:
        log(f"chat: {q} -> {a}")
    card = os.path.splitext(o.output)[0] + ".md"
    with open(card, "w", encoding="utf-8") as fh:
        fh.write(model_card(o, summary))
    with open(os.path.join(o.work_dir, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    return summary
