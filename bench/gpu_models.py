"""Random-weight checkpoints from the real config.json files in bench/configs, with a byte-level tokenizer.

Memory and speed don't depend on the weights' values (DESIGN.md §5), so the GPU check builds each model from its
published architecture with random weights, saves it as a checkpoint folder and loads it through chatapp's own
loader, as a downloaded model would be. The GPU machine reaches no Hub, so the tokenizer is made here too: Qwen2's
pipeline (its split regex, byte-level BPE) without merges, so every byte is one token. transformers rebuilds a
Qwen2 checkpoint's tokenizer as Qwen2Tokenizer from the vocabulary whatever the file says; with this pipeline the
rebuilt one is the same tokenizer. Its vocabulary is as large as the model's: four control tokens, the 256 bytes,
then fillers no text encodes to.

The output layer keeps only the printable ASCII bytes' rows (the rest are zeroed; a random row's best logit is far
above 0): greedy replies then never stop early, so each has the asked length, and any reply's text encodes back to
exactly the ids that were sampled, as real models' replies almost always do.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
#: The names the steps use -> the published config they are built from.
MODELS = {
    "llama-3.1-8b": "llama-3.1-8b-instruct.json",
    "qwen2.5-7b": "qwen2.5-7b-instruct.json",
    "gemma-2-9b": "gemma-2-9b-it.json",
    "smollm2-135m": "smollm2-135m-instruct.json",
}
SPECIAL = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Byte b is token FIRST_BYTE + b.
FIRST_BYTE = len(SPECIAL)
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def read_config(name: str) -> dict:
    return json.loads((CONFIGS / MODELS[name]).read_text())


def shrink(config: dict) -> dict:
    """The same architecture at toy size, for --dry-run: 2 layers, width 128, a 512-word vocabulary. Grouped-query
    attention, head_dim, the sliding window (at 32 tokens, so short prompts cross it), soft caps and RoPE scaling
    stay as the family has them. Every Linear has a multiple of 32 outputs: bitsandbytes' CPU 4-bit kernel needs it."""
    small = dict(config)
    heads = 4
    groups = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    small.update(
        num_hidden_layers=2,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // groups),
        vocab_size=512,
    )
    if "head_dim" in config:
        small["head_dim"] = 32
    if "query_pre_attn_scalar" in config:
        small["query_pre_attn_scalar"] = 32
    if "max_window_layers" in config:
        small["max_window_layers"] = 2
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        small["sliding_window"] = 32
        if "sliding_window_size" in config:
            small["sliding_window_size"] = 32
    small.pop("layer_types", None)  # derived again for 2 layers
    return small


def _byte_chars() -> list[str]:
    """The character the byte-level pre-tokenizer writes for each byte 0..255 (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer(vocab_size: int):
    """A fast tokenizer of exactly vocab_size ids: SPECIAL, the 256 bytes, then fillers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({char: FIRST_BYTE + b for b, char in enumerate(_byte_chars())})
    vocab.update({f"\u0120{i}": i for i in range(len(vocab), vocab_size)})  # " <id>" once decoded
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], continuing_subword_prefix="", end_of_word_suffix=""))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL[1:3]),
    )
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def reply_ids() -> list[int]:
    """The ids the output layer keeps: the printable ASCII bytes."""
    return [FIRST_BYTE + b for b in range(ord(" "), ord("~") + 1)]


def user_message(tokenizer, tokens: int, seed: int = 0) -> str:
    """A user message whose rendered prompt (chat template and all) is exactly `tokens` ids long: random letters,
    one token each."""
    from chatapp.engine.session import Message, render_ids

    glue = len(render_ids(tokenizer, [Message("user", "a")])) - 1
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(max(1, tokens - glue)))


def build(name: str, folder: Path, *, device: str, dry_run: bool, seed: int = 0) -> Path:
    """A checkpoint folder for model `name`: its config (shrunk for a dry run) with this tokenizer's token ids,
    random bf16 weights made on `device`, and the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = read_config(name)
    if dry_run:
        config = shrink(config)
    tokenizer = byte_tokenizer(config["vocab_size"])
    end, stop = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config.update(bos_token_id=end, eos_token_id=[stop, end], pad_token_id=end)
    model_type = config.pop("model_type")
    auto = AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(auto, dtype=torch.bfloat16).eval()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < size + 2**30:
        raise OSError(f"{name}: its checkpoint needs {size / 2**30:.1f} GiB, {folder} has {free / 2**30:.1f} GiB free")
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        keep = torch.zeros(head.shape[0], dtype=torch.bool, device=head.device)
        keep[reply_ids()] = True
        head[~keep] = 0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


class Checkpoints:
    """The checkpoints a run builds, each once, under one scratch folder; big ones are dropped when done."""

    def __init__(self, root: Path, *, device: str, dry_run: bool):
        self.root, self.device, self.dry_run = root, device, dry_run
        self.folders: dict[str, Path] = {}
        #: name -> seconds its build took (reported: it is part of the run's time, not of any measurement).
        self.build_s: dict[str, float] = {}

    def get(self, name: str) -> Path:
        if name not in self.folders:
            started = time.monotonic()
            folder = self.root / name
            shutil.rmtree(folder, ignore_errors=True)  # a build cut short leaves a partial folder
            self.folders[name] = build(name, folder, device=self.device, dry_run=self.dry_run)
            self.build_s[name] = round(time.monotonic() - started, 1)
        return self.folders[name]

    def drop(self, name: str) -> None:
        folder = self.folders.pop(name, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        for name in list(self.folders):
            self.drop(name)


def pick_scratch(preferred: str | None, need_bytes: int) -> Path:
    """Where checkpoints go: `preferred`, else /dev/shm when it has room for them (RAM: no disk writes), else the
    temp folder."""
    import tempfile

    if preferred:
        return Path(preferred)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes:
        return shm
    return Path(tempfile.gettempdir())
