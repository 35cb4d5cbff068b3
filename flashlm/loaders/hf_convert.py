"""`flashlm convert HF_DIR -o X.gguf|X.flash --quant ...`: a Hugging Face directory -> GGUF (-> flash store).

The GGUF is the one llama.cpp's convert_hf_to_gguf.py would write for the family (names, metadata and transforms
from loaders/hf_families.py), quantized once with gguf-py's reference quantizer; norms and biases stay F32, and a
matrix whose rows do not divide into the format's blocks falls back to F16 as llama.cpp's converter does. The
tokenizer travels as tokenizer.json's text under `tokenizer.huggingface.json` (gguf-py's key for it; not under
flashlm.*, which the flash-store writer reserves for its own keys and does not copy), with the chat template and
the BOS/EOS ids; loaders/tokenizer.py then tokenizes with the `tokenizers` library, exactly as transformers does.
For byte-level BPE vocabularies the tokenizer.ggml.* vocabulary is written too, so llama.cpp can load the file.

Tensors are streamed: the header is written from the safetensors headers alone, then one tensor at a time is read,
transformed, quantized and appended, so memory holds one tensor. Output goes to a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as QT, LlamaFileType

from flashlm.atomic_file import discard, finish_gguf, remove_stale_temps, temp_path
from flashlm.errors import InvalidOptionError, ModelFileError, UnsupportedModelError
from flashlm.loaders import hf_families as fam
from flashlm.loaders.hf_dir import FLOAT_DTYPES, HFModelDir, TOKENIZER_FILE

QUANT_TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}
DEFAULT_QUANT = "q8_0"
CONVERTER_VERSION = 1  # part of the cache key: bump when the GGUF written for the same directory changes
HF_TOKENIZER_KEY = gguf.Keys.Tokenizer.HF_JSON  # "tokenizer.huggingface.json"
# Special tokens llama.cpp counts as end of generation besides EOS (its llama-vocab.cpp list, abridged).
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
             "<EOT>", "<|return|>", "<|call|>", "<｜end▁of▁sentence｜>")


@dataclass
class HFConvertReport:
    path: str
    model_type: str
    arch: str
    quant: str
    n_tensors: int
    nbytes: int
    f16_fallbacks: list[str]  # matrices written as F16 because their rows do not divide into quant blocks


def _progress(done: int, total: int, what: str) -> None:
    if sys.stderr.isatty() or os.environ.get("FLASHLM_PROGRESS"):
        bar = "#" * int(30 * done / total)
        print(f"\r{what:<12} [{bar:<30}] {done}/{total}", end="" if done < total else "\n", file=sys.stderr)


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str) -> QT:
    """What one tensor is stored as: 1-D tensors, norms and biases F32 (as llama.cpp's converter keeps them)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return QT.F32
    qtype = QUANT_TYPES[quant]
    block, _ = GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else QT.F16


def _nbytes(shape: tuple[int, ...], qtype: QT) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


# -- tokenizer -------------------------------------------------------------------------------------------------
def _token_content(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _apply_transformers_post_processor(tok, tok_config: dict) -> bool:
    """transformers rebuilds the post-processor when tokenizer_config.json sets add_bos_token / add_eos_token or
    tokenizer.json has none (TokenizersBackend.update_post_processor); do the same so our ids equal its."""
    from tokenizers import processors

    if not ("add_bos_token" in tok_config or "add_eos_token" in tok_config or tok.post_processor is None):
        return False
    special = []
    bos, eos = _token_content(tok_config.get("bos_token")), _token_content(tok_config.get("eos_token"))
    add_bos = bool(tok_config.get("add_bos_token")) and bos is not None
    add_eos = bool(tok_config.get("add_eos_token")) and eos is not None
    if add_bos:
        special.append((bos, tok.token_to_id(bos)))
    if add_eos:
        special.append((eos, tok.token_to_id(eos)))
    if any(i is None for _, i in special):
        return False  # transformers would have added the token; a directory like that is beyond this mirror
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return True


def _as_transformers_loads_it(path: str) -> str | None:
    """The tokenizer JSON of AutoTokenizer.from_pretrained(path), when transformers is installed: transformers 5
    picks a class by config.json's model_type (Qwen2Tokenizer, ...) which may replace tokenizer.json's normalizer,
    pre-tokenizer or post-processor, so this is what "the same ids as transformers" means. Without transformers
    (or a directory it cannot load), tokenizer.json is used with transformers' generic post-processor rule."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        loaded = AutoTokenizer.from_pretrained(path)
    except Exception:  # custom code, slow-only tokenizers...: the file-based path below still applies
        return None
    backend = getattr(loaded, "_tokenizer", None)
    return backend.to_str() if backend is not None and getattr(loaded, "is_fast", False) else None


def _chat_template(hf: HFModelDir, tok_config: dict) -> str | None:
    template = hf.text_file("chat_template.jinja")  # transformers 5 saves it beside tokenizer_config.json
    if template is None:
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: llama.cpp keeps the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
    return template if isinstance(template, str) else None


def tokenizer_metadata(hf: HFModelDir, n_vocab: int) -> list[tuple[str, str, object]]:
    """(type, key, value) entries carrying the directory's tokenizer into the GGUF."""
    from tokenizers import Tokenizer

    path = os.path.join(hf.path, TOKENIZER_FILE)
    text = hf.text_file(TOKENIZER_FILE)
    if text is None:
        raise ModelFileError(f"{path}: file not found (only fast tokenizers, tokenizer.json, are supported)")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception for a malformed file
        raise ModelFileError(f"{path}: not a valid tokenizer ({e})") from None
    tok_config = hf.json_file("tokenizer_config.json") or {}
    as_loaded = _as_transformers_loads_it(hf.path)
    if as_loaded is not None:
        text = as_loaded
        tok = Tokenizer.from_str(text)
    elif _apply_transformers_post_processor(tok, tok_config):
        text = tok.to_str()
    if tok.get_vocab_size(with_added_tokens=True) > n_vocab:
        raise ModelFileError(f"{path}: {tok.get_vocab_size(with_added_tokens=True)} tokens do not fit the model's "
                             f"vocab_size {n_vocab}")

    def token_id(key: str) -> int | None:
        content = _token_content(tok_config.get(key))
        found = tok.token_to_id(content) if content is not None else None
        if found is None:
            value = hf.config.get(f"{key}_id")
            found = value if isinstance(value, int) and 0 <= value < n_vocab else None
        return found

    entries: list[tuple[str, str, object]] = [("str", HF_TOKENIZER_KEY, text)]
    bos, eos = token_id("bos_token"), token_id("eos_token")
    if bos is not None:
        entries.append(("u32", gguf.Keys.Tokenizer.BOS_ID, bos))
    if eos is not None:
        entries.append(("u32", gguf.Keys.Tokenizer.EOS_ID, eos))
    probe = tok.encode("a", add_special_tokens=True).ids
    entries.append(("bool", gguf.Keys.Tokenizer.ADD_BOS, bos is not None and probe[:1] == [bos]))
    entries.append(("bool", gguf.Keys.Tokenizer.ADD_EOS, eos is not None and len(probe) > 1 and probe[-1] == eos))
    gen = hf.json_file("generation_config.json") or {}
    extra = gen.get("eos_token_id")
    extra = [i for i in (extra if isinstance(extra, list) else [extra]) if isinstance(i, int) and i != eos]
    for key, value in zip((gguf.Keys.Tokenizer.EOT_ID, gguf.Keys.Tokenizer.EOM_ID), extra):
        entries.append(("u32", key, value))
    template = _chat_template(hf, tok_config)
    if template is not None:
        entries.append(("str", gguf.Keys.Tokenizer.CHAT_TEMPLATE, template))
    entries += _ggml_vocab(json.loads(text), tok, n_vocab)
    return entries


def _ggml_vocab(spec: dict, tok, n_vocab: int) -> list[tuple[str, str, object]]:
    """tokenizer.ggml.* for byte-level BPE (llama.cpp's "gpt2" model), so llama.cpp can load the file too;
    nothing for other tokenizer types (flashlm itself tokenizes from tokenizer.json)."""
    model = spec.get("model") or {}
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or '"ByteLevel"' not in pre:
        return []
    tokens, types = [], []
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i in range(n_vocab):
        text = tok.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return [("str", gguf.Keys.Tokenizer.MODEL, "gpt2"), ("str", gguf.Keys.Tokenizer.PRE, "default"),
            ("arr", gguf.Keys.Tokenizer.LIST, tokens), ("arr", gguf.Keys.Tokenizer.TOKEN_TYPE, [int(t) for t in types]),
            ("arr", gguf.Keys.Tokenizer.MERGES, merges)]


# -- the GGUF --------------------------------------------------------------------------------------------------
def _add(w: gguf.GGUFWriter, kind: str, key: str, value) -> None:
    {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "bool": w.add_bool,
     "arr": w.add_array}[kind](key, value)


def _check_tensors(hf: HFModelDir, family: fam.HFFamily, args: fam.HFArgs,
                   plan: list[tuple[str, str]]) -> None:
    """Every tensor the config implies is present with its shape, and nothing unexplained is left over."""
    shapes = fam.expected_shapes(args)
    for hf_name, gguf_name in plan:
        info = hf.info(hf_name, shapes[gguf_name])  # ModelFileError naming the tensor and the expected shape
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(f"{info.file}: tensor {hf_name!r} has type {info.dtype} "
                                        f"(supported: {', '.join(FLOAT_DTYPES)})")
    known = {h for h, _ in plan} | {"lm_head.weight"}
    extra = sorted(n for n in hf.tensors if n not in known and not n.endswith(fam.IGNORED_SUFFIXES))
    if extra:
        raise UnsupportedModelError(f"{hf.path}: tensor {extra[0]!r} has no place in a {hf.model_type} GGUF"
                                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def write_gguf(src_dir: str, dst: str, quant: str = DEFAULT_QUANT, force: bool = False) -> HFConvertReport:
    """HF directory -> GGUF file at dst (atomically: a temporary file beside it, renamed when complete; those of
    killed earlier runs are removed first)."""
    remove_stale_temps(dst)
    if quant not in QUANT_TYPES:
        raise InvalidOptionError(f"--quant must be one of {', '.join(QUANT_TYPES)}, got {quant!r}")
    if os.path.isdir(dst):
        raise InvalidOptionError(f"{dst}: is a directory")
    if os.path.exists(dst) and not force:
        raise InvalidOptionError(f"{dst}: already exists (use --force to overwrite)")
    hf = HFModelDir(src_dir)
    family = fam.family_for_config(hf.cfg)
    args = fam.HFArgs.from_config(hf.cfg, family)
    plan = fam.tensor_plan(family, args)
    _check_tensors(hf, family, args, plan)
    if not args.tied and "lm_head.weight" not in hf:
        raise ModelFileError(f"{hf.path}: missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
    tok_entries = tokenizer_metadata(hf, args.vocab_size)
    rope_factors = fam.llama3_rope_factors(args)

    arch = family.gguf_arch
    types = {gg: tensor_type(gg, hf.tensors[h].shape, quant) for h, gg in plan}
    tmp = temp_path(dst)
    nbytes = 0
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(os.path.basename(os.path.normpath(src_dir)))
        w.add_file_type(FILE_TYPES[quant])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for kind, key, value in fam.metadata(args, arch) + tok_entries:
            _add(w, kind, key, value)
        if rope_factors is not None:
            w.add_tensor_info("rope_freqs.weight", rope_factors.shape, np.dtype(np.float32), rope_factors.nbytes)
        for hf_name, gguf_name in plan:
            shape, qtype = hf.tensors[hf_name].shape, types[gguf_name]
            w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if rope_factors is not None:
            w.write_tensor_data(rope_factors)
        for k, (hf_name, gguf_name) in enumerate(plan):
            data = fam.transform(family, args, gguf_name, hf.tensor(hf_name))
            data = gguf.quants.quantize(np.ascontiguousarray(data, np.float32), types[gguf_name])
            w.write_tensor_data(data)
            nbytes += data.nbytes
            _progress(k + 1, len(plan), "converting")
        finish_gguf(w, tmp, dst)
    except BaseException:
        discard(tmp)
        raise
    fallbacks = [n for n, t in types.items() if t == QT.F16 and quant not in ("f16", "f32")]
    return HFConvertReport(dst, hf.model_type, arch, quant, len(plan) + (rope_factors is not None), nbytes, fallbacks)


# -- `-m HF_DIR`: a cached conversion ---------------------------------------------------------------------------
def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashlm", "hf")


def cache_key(src_dir: str, quant: str) -> str:
    """Changes when the directory's path, any file's size or mtime, the quant type or the converter changes."""
    root = os.path.abspath(src_dir)
    h = hashlib.sha256(f"{root}\0{quant}\0{CONVERTER_VERSION}".encode())
    for name in sorted(os.listdir(root)):
        p = os.path.join(root, name)
        if os.path.isfile(p):
            st = os.stat(p)
            h.update(f"\0{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cached_gguf(src_dir: str, quant: str = DEFAULT_QUANT, log=None) -> str:
    """The GGUF for an HF directory, converted on first use into the cache and reused while the directory is
    unchanged. `log` gets one line saying which (default: stderr)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.isfile(os.path.join(src_dir, "config.json")):
        raise ModelFileError(f"{src_dir}: is a directory, not a GGUF file nor a Hugging Face model directory "
                             "(no config.json)")
    path = os.path.join(cache_dir(), f"{cache_key(src_dir, quant)}.gguf")
    if os.path.isfile(path):
        log(f"flashlm: {src_dir} is a Hugging Face directory; using its conversion cached in {path}")
        return path
    log(f"flashlm: {src_dir} is a Hugging Face directory; converting it ({quant}) into {path}")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_gguf(src_dir, path, quant, force=True)
    return path
