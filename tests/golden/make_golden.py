"""Regenerate smollm2_greedy.json (run only when a deliberate change moves the numerics):

    python -m tests.golden.make_golden

Stores flashlm's greedy continuation, each token's margin (its logit minus the runner-up's: where it is small, a
CPU that rounds differently may pick the other token, and test_generate compares up to there) and, for the record,
how many leading tokens llama.cpp's greedy continuation of the same prompt shares with it.
"""

import json
import os

import numpy as np

import flashlm
from flashlm.loaders.default_model import default_model_path

PROMPTS = [("The capital of France is", 32), ("def fibonacci(n):", 32),
           ("<|im_start|>user\nWhat is the tallest mountain?<|im_end|>\n<|im_start|>assistant\n", 32)]


def llama_cpp_greedy(path, ids, n):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    out = []
    llm.eval(ids)
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llm.token_eos() == tok:
            break
        out.append(tok)
        llm.eval([tok])
    return out


def main():
    path = default_model_path()
    model = flashlm.load(path, threads=2, ctx_size=2048)
    cases = []
    for prompt, n in PROMPTS:
        responses = list(model.stream(prompt, max_tokens=n, temperature=0.0))
        tokens = [r.token for r in responses if r.token is not None and r.finish_reason != "stop"]
        ids = model.tokenize(prompt)
        logits = np.sort(model.logits(ids + tokens)[len(ids) - 1:len(ids) + len(tokens) - 1], axis=1)
        margins = [round(float(m), 4) for m in logits[:, -1] - logits[:, -2]]
        ref = llama_cpp_greedy(path, ids, len(tokens))
        shared = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
        cases.append({"prompt": prompt, "max_tokens": n, "tokens": tokens,
                      "text": "".join(r.text for r in responses), "margins": margins,
                      "llama_cpp_shared_prefix": shared})
        print(f"{prompt[:30]!r}: {len(tokens)} tokens, llama.cpp agrees on the first {shared}")
    with open(os.path.join(os.path.dirname(__file__), "smollm2_greedy.json"), "w", encoding="utf-8") as f:
        json.dump({"model": os.path.basename(path), "cases": cases}, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
