"""Run in a fresh process (as a user would): greedy tokens for prompts from a .flash file, optionally under the
half-model budget, i.e. this process's runtime baseline (interpreter, libraries, tokenizer, KV cache, scratch)
plus half of the model file. Prints one JSON line.

    python -m tests.flash_budget_run MODEL.flash half|most|tight|none[+sketch] N PROMPT...   (+sketch: output_head="sketch")

tight: the baseline plus 25% of the file, where part of the attention matrices must stream too.
"""

import json
import os
import sys

import flashlm
from flashlm.flash_store.reader import FlashStore
from flashlm.flash_store.planner import plan_for
from flashlm.models import read_model
from flashlm.loaders.tokenizer import Tokenizer
from flashlm.options import LoadOptions
from flashlm.tools.memory import peak_rss_bytes


def model_budget(path: str, ctx: int, share: float = 0.5) -> int:
    """The runtime baseline plus `share` of the model file."""
    Tokenizer(path)  # counted in the baseline, as a real load counts it
    f, family, args = read_model(path)
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model, verify=False)
    p = plan_for(f, family, args, store, LoadOptions(ctx_size=ctx, memory_budget=1 << 40).validate(), ctx)
    f.close()
    return p.baseline_bytes + p.kv_bytes + p.scratch_bytes + int(os.path.getsize(path) * share)


def half_model_budget(path: str, ctx: int) -> int:
    return model_budget(path, ctx, 0.5)


def main():
    path, mode, n, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    mode, _, head = mode.partition("+")
    ctx = 512
    shares = {"half": 0.5, "most": 0.75, "tight": 0.25, "none": None}
    budget = model_budget(path, ctx, shares[mode]) if shares[mode] else None
    m = flashlm.load(path, threads=2, ctx_size=ctx, memory_budget=budget, output_head=head or "exact")
    reader = m.engine.executor.ffn.reader
    issued: list[int] = []  # the byte counts of the reads the FFN asks the reader for
    original, original_ahead = reader.read, reader.read_ahead
    reader.read = lambda offset, nbytes, out=None: (issued.append(nbytes), original(offset, nbytes, out))[1]
    reader.read_ahead = lambda offset, nbytes, out: (issued.append(nbytes), original_ahead(offset, nbytes, out))[1]
    tokens, reads = [], []
    for p in prompts:
        issued.clear()
        responses = list(m.stream(p, max_tokens=n, temperature=0.0, ignore_eos=True))
        tokens.append([r.token for r in responses if r.token is not None])
        flash = responses[-1].timings.flash  # this generation's streaming stats
        reads.append({"bytes_read": flash.bytes_read, "reads": flash.reads, "issued_bytes": sum(issued),
                      "issued_reads": len(issued)})
    plan = m._loaded.plan
    print(json.dumps({"budget": budget, "hot": plan.hot_neurons, "n_ff": plan.n_ff,
                      "head_resident": plan.head_resident, "head_resident_rows": plan.head_resident_rows,
                      "head_rows": plan.head_rows, "attention_streamed": plan.attention_streamed, "tokens": tokens,
                      "reads": reads,
                      "peak_bytes": peak_rss_bytes()}))


if __name__ == "__main__":
    main()
