"""`flashlm info`: what a GGUF holds, read from its header only (no weights are loaded)."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict

from flashlm.models import read_model

# Tensor groups by name: the first pattern that matches names the group.
GROUPS = [
    ("token embedding", r"^token_embd\."),
    ("output matrix", r"^output\."),
    ("attention", r"^blk\.\d+\.attn_(q|k|v|output|qkv)\."),
    ("sparsity predictor", r"^blk\.\d+\.ffn_predictor_"),
    ("feed-forward", r"^blk\.\d+\.ffn_(gate|up|down|bundle)"),
    ("norms", r"norm"),
    ("other", r""),
]


def _mb(n: int) -> str:
    return f"{n / 1e6:9.1f} MB"


def _plan_lines(path, f, family, args, budget, ctx_size, device="cpu", gpu_budget=None,
                output_head="exact") -> list[str]:
    from flashlm.flash_store.reader import FlashStore, is_flash_store
    from flashlm.flash_store.planner import plan_for
    from flashlm.loaders.tokenizer import Tokenizer
    from flashlm.options import LoadOptions

    if not is_flash_store(f):
        return ["memory plan   a GGUF runs fully resident; convert it (flashlm convert) to stream under a budget"], None
    store = FlashStore(f, args.n_layers, args.n_ff, args.d_model, verify=False)
    Tokenizer(path)  # the plan's baseline includes the tokenizer, as a real load does
    opts = LoadOptions(memory_budget=budget, ctx_size=ctx_size, device=device, gpu_memory_budget=gpu_budget,
                       output_head=output_head).validate()
    kind = "neuron" if store.group == 1 else \
        f"blocks of {store.group} neurons, ffn_down as {store.layout.down_type.name} blocks"
    head = [f"flash store   {store.record_bytes}-byte records ({kind}), calibrated on {f.get('flashlm.calibration')}"]
    if store.predictor_rank:
        from flashlm.flash_store.format import KEY_PREDICTOR
        from flashlm.flash_store.predictor import scorer_bytes

        head.append(f"predictor     rank {store.predictor_rank}, {scorer_bytes(store, 'predictor') / 1e6:.1f} MB "
                    f"(--sparsity-score predictor): {f.get(KEY_PREDICTOR)}")
    if device == "cuda":
        from flashlm.flash_store.planner import gpu_plan_for

        _, gpu = gpu_plan_for(f, family, args, store, opts, opts.resolved_ctx(args.n_ctx_train))
        return head + ["device plan   " + gpu.describe(),
                       "              (host baseline measured here without CUDA's context, which a GPU run adds)"], \
            {"gpu_plan": asdict(gpu)}
    plan = plan_for(f, family, args, store, opts, opts.resolved_ctx(args.n_ctx_train))
    return head + plan.describe().splitlines(), {"plan": {**asdict(plan), "total_bytes": plan.total_bytes},
                                                 "record_bytes": store.record_bytes, "group": store.group}


def describe(path: str, budget: str | None = None, ctx_size: int | None = None, device: str = "cpu",
             gpu_budget: str | None = None, output_head: str = "exact", as_json: bool = False) -> str:
    """The text `flashlm info` prints, or with as_json one JSON document of the same facts."""
    f, family, args = read_model(path)
    try:
        sizes, types = defaultdict(int), defaultdict(set)
        for t in f.tensors.values():
            group = next(g for g, pat in GROUPS if re.search(pat, t.name))
            sizes[group] += t.nbytes
            types[group].add(t.type_name)
        plan_lines, plan = _plan_lines(path, f, family, args, budget, ctx_size, device, gpu_budget, output_head)
        facts = {"file": path, "gguf_version": f.version, "size_bytes": f.file_size, "n_tensors": len(f.tensors),
                 "name": f.get("general.name", None), "architecture": args.arch,
                 "family": family.__name__.rsplit(".", 1)[-1],
                 "args": {k: (vars(v) if k == "rope" else v) for k, v in vars(args).items() if k != "arch"},
                 "family_facts": dict(args.facts()), "output_tied": "output.weight" not in f.tensors,
                 "tensor_groups": {g: {"bytes": sizes[g], "types": sorted(types[g])} for g, _ in GROUPS if sizes[g]},
                 "chat_template": isinstance(f.get("tokenizer.chat_template"), str), "flash_store": plan}
        if as_json:
            import json

            return json.dumps(facts, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        return "\n".join(_text(facts, args) + plan_lines)
    finally:
        f.close()


def _text(facts: dict, args) -> list[str]:
    lines = [f"file          {facts['file']} (GGUF v{facts['gguf_version']}, {facts['size_bytes'] / 1e6:.1f} MB, "
             f"{facts['n_tensors']} tensors)",
             f"name          {facts['name'] or '?'}",
             f"architecture  {facts['architecture']} (family {facts['family']})"]
    for key, value in vars(args).items():
        if key != "arch":
            lines.append(f"  {key:<15}{value}")
    for key, value in facts["family_facts"].items():
        lines.append(f"  {key:<16}{value}")
    lines.append(f"output        {'tied to the token embedding' if facts['output_tied'] else 'separate matrix'}")
    lines.append("tensor groups")
    for group, g in facts["tensor_groups"].items():
        lines.append(f"  {group:<16}{_mb(g['bytes'])}  {', '.join(g['types'])}")
    lines.append(f"chat template {'yes' if facts['chat_template'] else 'no'}")
    return lines
