"""Make every model entry a folder any Llama-3.1 reader takes as it takes a Hub Llama-3.1-Instruct folder.

transformers 5 writes what only transformers 5 reads (`rope_parameters`, `dtype`, tokenizer class
`TokenizersBackend`, the template only in `chat_template.jinja`), and a copied
`special_tokens_map.json` from a base folder (eos <|end_of_text|>) overrides the tokenizer's EOS when
the folder is loaded again. Here every entry gets, next to what transformers 5 wrote:
- config.json: `rope_theta`/`rope_scaling` and `torch_dtype` (what transformers 4.x reads),
  `use_cache: true`, EOS ids with the tokenizer's EOS first, and no `auto_map` unless remote code is trusted;
- tokenizer_config.json: `PreTrainedTokenizerFast` and the chat template inside it;
- special_tokens_map.json agreeing with the tokenizer;
- generation_config.json: EOS ids (end of turn first), bos/pad ids, and the input's sampling defaults.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
                 "max_length")


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.unlink(missing_ok=True)  # never write through a link into someone else's file
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def eos_ids(tokenizer, *older) -> list[int]:
    """The tokenizer's EOS first, then any other EOS ids the folder had (base-style text still stops)."""
    ids = [tokenizer.eos_token_id]
    for value in older:
        for old in _as_list(value):
            if old is not None and old not in ids:
                ids.append(old)
    return ids


def save_tokenizer_files(out_dir: Path, tokenizer, input_dir: Path | None = None,
                         trust_remote_code: bool = False) -> None:
    """Save the tokenizer into `out_dir` and bring config, generation config and token maps in line."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    _tokenizer_config(out_dir, tokenizer)
    _write(out_dir / "special_tokens_map.json", {
        name: value for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (value := getattr(tokenizer, name, None))})
    generation = _generation_config(out_dir, tokenizer, input_dir)
    _model_config(out_dir, generation["eos_token_id"], trust_remote_code)


def _tokenizer_config(out_dir: Path, tokenizer) -> None:
    path = out_dir / "tokenizer_config.json"
    config = _read(path)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class every transformers 4.x/5.x has
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template  # where transformers 4.x and vLLM look first
    for name in ("bos_token", "eos_token", "pad_token"):
        if getattr(tokenizer, name, None):
            config[name] = getattr(tokenizer, name)
    _write(path, config)


def _generation_config(out_dir: Path, tokenizer, input_dir: Path | None) -> dict[str, Any]:
    path = out_dir / "generation_config.json"
    inherited = _read(Path(input_dir) / "generation_config.json") if input_dir else {}
    generation = {**inherited, **_read(path)}
    for key in SAMPLING_KEYS:  # the base's sampling defaults carry over to every descendant
        if key in inherited:
            generation[key] = inherited[key]
    model_config = _read(out_dir / "config.json")
    ids = eos_ids(tokenizer, generation.get("eos_token_id"), model_config.get("eos_token_id"))
    generation["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    if tokenizer.bos_token_id is not None:
        generation["bos_token_id"] = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    generation.setdefault("_from_model_config", False)
    _write(path, generation)
    return generation


def _model_config(out_dir: Path, eos, trust_remote_code: bool) -> None:
    path = out_dir / "config.json"
    config = _read(path)
    if not config:
        return
    config["eos_token_id"] = eos
    config["use_cache"] = True  # training turns it off; an inference folder wants it on
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if config.get("dtype"):
        config["torch_dtype"] = config["dtype"]
    if not trust_remote_code:
        config.pop("auto_map", None)
        for code in out_dir.glob("*.py"):
            code.unlink()
    _write(path, config)
