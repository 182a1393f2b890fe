"""Regenerates the small tokenizer in this folder from SmolLM2-135M-Instruct's tokenizer.

The scripted-model tests need a chat template to render prompts and a tokenizer to count tokens,
not the model itself. This folder gives them both without a download: SmolLM2-135M-Instruct's
tokenizer (https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0), cut down to
a prefix of its byte-level BPE. The chat template, the special tokens (``<|im_start|>``,
``<|im_end|>`` as eos and pad, ``<|endoftext|>`` as unk), the normalizer, the byte-level
pre-tokenizer, the post-processor and the decoder are copied unchanged, so rendered prompts are
byte for byte the real model's. The BPE is truncated in merge order: the special tokens and the
byte-level base symbols (ids below the first merge's id), then the first ``--merges`` merges and
the tokens they produce. A BPE vocabulary gives a merge the id after those of the earlier
merges, so every kept merge uses kept tokens, and each kept token keeps its real id. Any text
therefore encodes to the same characters in more, shorter tokens: token counts are somewhat
larger than the real model's (about 1.3 to 1.6 times on English, math and code, more on other
scripts), never smaller.

The tests do not run this script. To regenerate (``transformers`` is only needed for the check)::

    python tests/data/tokenizer/make_tokenizer.py SOURCE_DIR

where SOURCE_DIR is a folder holding the real ``tokenizer.json`` (and the chat template, in
``tokenizer_config.json`` or ``chat_template.jinja``): the hub repository's files, or the
embedded model's converted folder, ``~/.cache/critloop/models/smollm2-135m-instruct/hf``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = Path.home() / ".cache" / "critloop" / "models" / "smollm2-135m-instruct" / "hf"
DEFAULT_MERGES = 2000


def chat_template(source: Path) -> str:
    jinja = source / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    template = json.loads((source / "tokenizer_config.json").read_text()).get("chat_template")
    if not isinstance(template, str):
        raise SystemExit(f"{source} has no chat template")
    return template


def truncate(tokenizer: dict[str, Any], merges: int) -> dict[str, Any]:
    model = tokenizer["model"]
    if model["type"] != "BPE":
        raise SystemExit(f"expected a BPE model, found {model['type']}")
    vocab: dict[str, int] = model["vocab"]
    # Merges come as [a, b] pairs (tokenizers >= 0.20) or as "a b" strings (older files).
    pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in model["merges"]]
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    first_merged = vocab["".join(pairs[0])]
    kept_pairs = pairs[:merges]
    last_id = vocab["".join(kept_pairs[-1])]
    kept = dict(item for item in by_id if item[1] <= last_id)
    for a, b in kept_pairs:
        if a not in kept or b not in kept or a + b not in kept:
            raise SystemExit(f"merge {a!r} + {b!r} uses or makes a token outside the kept vocabulary")
    if len(kept) != first_merged + len(kept_pairs):
        raise SystemExit("the kept vocabulary is not the base symbols plus one token per merge")
    for added in tokenizer["added_tokens"]:
        if kept.get(added["content"]) != added["id"]:
            raise SystemExit(f"special token {added['content']!r} is not kept under its id")
    return {**tokenizer, "model": {**model, "vocab": kept, "merges": kept_pairs}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--merges", type=int, default=DEFAULT_MERGES)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    source: Path = args.source
    real = json.loads((source / "tokenizer.json").read_text())
    small = truncate(real, args.merges)
    config = {
        # The generic fast tokenizer: transformers 4 and 5 both load tokenizer.json as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template(source),
    }
    out: Path = args.out
    (out / "tokenizer.json").write_text(json.dumps(small, ensure_ascii=False, separators=(",", ":")) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"{len(small['model']['vocab'])} tokens, {args.merges} merges, folder {size} bytes")


if __name__ == "__main__":
    main()
