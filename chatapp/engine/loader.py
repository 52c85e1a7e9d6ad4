"""Load a model with a preset (bf16, fp16, fp32, int8, nf4, auto) and an attention implementation."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import hub_download, planner
from ..catalog import ModelSpec, load_catalog
from ..config import Settings, load_settings
from ..errors import ChatappError, ModelLoadError, first_line
from ..facts import facts_from_folder
from ..hardware import GpuInfo, Hardware, detect, detect_cpu, flash_attn_installed
from ..refs import ModelSource, parse_ref
from ..sampling import model_defaults
from ..units import mb
from . import bf16_weights, cpu_attention, cpu_linear, decode_kernel, heap, mapped, static_decode
from .checks import check_remote_code, check_weights, remote_code_refusal, tokenizer_problem
from .gguf import convert_gguf, is_converted

#: Used when a model ships no chat template. Plain "Role: text" blocks; documented in the README.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: With the fallback template the model marks the next turn in text, so stop there.
FALLBACK_STOP_STRINGS = ("\nUser:", "\nSystem:")

#: End-of-turn markers used by common chat templates, beyond the declared EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    folder: Path
    preset: str
    dtype: str
    device: str
    attn_implementation: str
    footprint_bytes: int
    context_length: int
    stop_token_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()
    template_fallback: bool = False
    #: What the user should hear about this load (a fallback, a slow split, remote code, no template).
    notes: list[str] = field(default_factory=list)
    #: The planner's reasoning, for the log and `chatapp plan`.
    reasons: list[str] = field(default_factory=list)
    #: "static": turns decode on a static cache with a compiled step (static_decode); "dynamic": eagerly.
    decode_path: str = "dynamic"
    #: The compiled decode step, made on the first static decode.
    compiled_step: Any = None
    #: A small model with the same tokenizer, loaded alongside for speculative decoding (see draftmodel.py).
    draft: LoadedModel | None = None

    @property
    def spec(self) -> ModelSpec | None:
        return self.source.spec

    def sampling_defaults(self) -> dict[str, float | int]:
        """The model's own sampling defaults: its generation_config.json, with the catalog entry's over it."""
        generation = getattr(self.model, "generation_config", None)
        return model_defaults(generation.to_dict() if generation is not None else {}, self.spec)

    def describe(self) -> str:
        return (
            f"{self.source.label}: preset {self.preset} ({self.dtype}) on {self.device}, "
            f"attention {self.attn_implementation}, weights {mb(self.footprint_bytes)}, "
            f"context {self.context_length}"
        )


def pick_device(requested: str | None = None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _device_facts(device: str) -> tuple[bool, tuple[int, int] | None]:
    """(bf16 runs natively, compute capability) for the device."""
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return torch.cuda.is_bf16_supported(), torch.cuda.get_device_capability(index)
    if device == "mps":
        return True, None
    return detect_cpu().bf16_native, None


def detect_hardware(device: str) -> Hardware:
    """What the planner may use for this device: NVML's view of the GPUs, else torch's."""
    found = detect()
    device_type, _, index = device.partition(":")
    if device_type != "cuda":
        return replace(found, gpus=(), mps=device_type == "mps")
    gpus = found.gpus
    if not gpus:
        gpus = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            props = torch.cuda.get_device_properties(i)
            gpus.append(GpuInfo(i, props.name, total, free, (props.major, props.minor)))
    if index:
        gpus = [g for g in gpus if g.index == int(index)]
    return replace(found, gpus=tuple(gpus))


def materialize(
    source: ModelSource,
    settings: Settings,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    on_status: Callable[[str], None] | None = None,
    on_progress: Callable | None = None,
    before_fetch: Callable[[], None] | None = None,
) -> Path:
    """A local folder with config.json and weights for source, downloading or converting as needed
    (before_fetch: see hub_download.download)."""
    say = on_status or (lambda _text: None)
    if source.kind == "gguf":
        if not is_converted(source.path, settings.converted_dir):
            say(f"converting {source.path.name} into a Hugging Face checkpoint (once; about half a minute)...")
        return convert_gguf(source.path, settings.converted_dir)
    if source.kind == "hub":
        return hub_download.download(
            source.repo_id,
            source.revision,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=on_progress,
            before_fetch=before_fetch,
        )
    return source.path


def _torch_dtype(name: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def preset_load_kwargs(preset: str, compute_dtype: str) -> dict:
    """from_pretrained keyword arguments for a concrete (non-auto) preset."""
    if preset not in planner.PRESETS or preset == "auto":
        raise ModelLoadError(f"unknown preset '{preset}' (choose from {', '.join(planner.PRESETS)})")
    dtype = _torch_dtype(compute_dtype)
    if preset == "int8":
        from transformers import BitsAndBytesConfig

        return {"dtype": dtype, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    if preset == "nf4":
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        return {"dtype": dtype, "quantization_config": config}
    # The preset's own dtype, not compute_dtype: bf16 weights with fp32 math load in bf16 (bf16_weights.py).
    return {"dtype": _torch_dtype(preset)}


def _stop_tokens(tokenizer, model) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    for value in eos if isinstance(eos, (list, tuple)) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocab and token in tokenizer.all_special_tokens:
            ids.add(int(vocab[token]))
    return frozenset(ids)


def load_model(
    ref: str | ModelSource,
    preset: str = "auto",
    *,
    settings: Settings | None = None,
    device: str | None = None,
    context: int | None = None,
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool | None = None,
    force: bool = False,
    on_status: Callable[[str], None] | None = None,
    on_progress: Callable | None = None,
    draft: str | None = None,
) -> LoadedModel:
    """Load ref with preset; and its draft model beside it where both fit (draft: a model reference, "none",
    or None for the one its catalog entry names; see draftmodel.resolve_draft)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if preset not in planner.PRESETS:
        raise ModelLoadError(f"unknown preset '{preset}' (choose from {', '.join(planner.PRESETS)})")
    settings = settings or load_settings()
    source = ref if isinstance(ref, ModelSource) else parse_ref(ref, load_catalog(settings.config_dir / "models.toml"))
    notes: list[str] = []
    if trust_remote_code is None:
        trust_remote_code = bool(source.spec and source.spec.trust_remote_code)
        if trust_remote_code:
            notes.append(f"trust_remote_code is on for '{source.label}' (set by its catalog entry): its own code runs")
    elif trust_remote_code:
        notes.append(f"trust_remote_code is on for '{source.label}' (--trust-remote-code): its own code runs")

    # auto refuses a model that fits no preset anyway: say so before its weights are downloaded, not after.
    fit_check = hub_download.refuse_what_cannot_fit(source, lambda: detect_hardware(pick_device(device)))
    folder = materialize(
        source,
        settings,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        on_status=on_status,
        on_progress=on_progress,
        before_fetch=fit_check if preset == "auto" else None,
    )
    check_weights(folder, source.label, allow_pickle=allow_pickle)
    from .draftmodel import attach_draft, resolve_draft

    draft_source, draft_facts, draft_note = resolve_draft(source, draft, settings)
    if draft_note:
        notes.append(draft_note)

    device = pick_device(device)
    device_type = device.split(":")[0]
    bf16_ok, capability = _device_facts(device)
    # Every preset is planned, not only auto: a preset named by hand that can't fit would otherwise allocate
    # until the machine gives out (a config with 10^9 layers). `force` is the user's word that they know.
    try:
        plan = _plan(folder, source.label, preset, device, context or settings.context_cap or None, draft_facts)
    except ChatappError as exc:
        if not force or preset == "auto":
            raise
        plan = None
        notes.append(f"no plan ({exc}); loading {preset} as asked, as forced")
    reasons: list[str] = list(plan.reasons) if plan else []
    choice = plan.choice if plan else None
    if plan is not None and choice is None and preset != "auto":
        if not force:
            raise ModelLoadError(
                f"'{source.label}' won't fit with preset {preset}: {planner.shortfall(plan, preset)}; "
                "force it to load anyway (--force; in the app, F4 and 'Load anyway')"
            )
        notes.append(f"{preset} won't fit ({planner.shortfall(plan, preset)}); loading it anyway, as forced")
    if preset == "auto":
        if choice is None:
            raise ModelLoadError(f"'{source.label}' fits no preset on this machine: {reasons[-1]}")
        preset = choice.preset
        if preset not in planner.DTYPE_BYTES:  # int8 or nf4
            notes.append(f"auto chose {preset}: the unquantized presets don't fit (`chatapp plan {source.label}`)")
    if choice is not None and choice.slow:
        notes.append(f"{preset} is split over the GPU and CPU RAM: it fits, but decoding is slow")
    device_map, max_memory = device, None
    if choice is not None and device_type == "cuda":
        device_map, max_memory = choice.device_map, choice.max_memory
    compute_dtype = planner.compute_dtype_for(preset, device_type=device_type, bf16_supported=bf16_ok)
    kwargs = preset_load_kwargs(preset, compute_dtype)
    if max_memory:
        kwargs["max_memory"] = max_memory
    if context is None and choice is not None:
        context = choice.context_tokens
    if attn_implementation is None:
        if choice is not None:
            attn_implementation = choice.attn_implementation
        else:
            attn_implementation = planner.choose_attention(
                device_type=device_type,
                compute_dtype=compute_dtype,
                compute_capability=capability,
                flash_attn_installed=flash_attn_installed(),
            ).value

    check_remote_code(folder, source.label, trust_remote_code=trust_remote_code)
    attn_implementation, why = _supported_attention(folder, attn_implementation, trust_remote_code)
    if why:
        reasons.append(why)

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(tokenizer_problem(folder, source.label, exc)) from None
    cpu_attention.install()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
            **kwargs,
        )
    except ImportError as exc:
        raise ModelLoadError(f"can't load '{source.label}' with preset {preset}: {first_line(exc)}") from None
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(out_of_memory(source.label, preset, plan, exc)) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(remote_code_refusal(source.label, "it")) from None
        raise ModelLoadError(f"can't load '{source.label}' ({preset}): {first_line(exc)}") from None
    model.eval()
    if preset in planner.DTYPE_BYTES and preset != compute_dtype:
        bf16_weights.apply(model)
        reasons.append(f"{preset} weights with {compute_dtype} math: this CPU has no native bf16")
    elif device_type == "cpu" and compute_dtype == "bf16" and cpu_linear.supported():
        if packed := cpu_linear.apply(model):
            reasons.append(f"{packed} Linear layers' bf16 weights packed once for oneDNN, not on every call")
        if problem := decode_kernel.prepare(settings.data_dir / "kernels"):
            reasons.append(f"long-context decode attends by torch's bf16 products, not chatapp's kernel: {problem}")
    mapped.release_unused(model)  # what quantizing, packing or upcasting replaced
    if device_type == "cpu":
        if preset == "int8":
            heap.watch(model)
        heap.trim()  # what quantizing or packing freed
    if device_type == "cuda":
        # Loading leaves blocks in torch's cache that no weight uses (transient copies, quantizing's fp16 rows);
        # other processes, and the driver's count the planner reads, should see them free.
        torch.cuda.empty_cache()

    template_fallback = not tokenizer.chat_template
    stop_strings: tuple[str, ...] = ()
    if template_fallback:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        stop_strings = FALLBACK_STOP_STRINGS
        notes.append(f"'{source.label}' has no chat template; using chatapp's plain 'Role: text' template")

    limit = int(getattr(model.config.get_text_config(), "max_position_embeddings", 0) or 0) or 4096
    if source.spec and source.spec.context_length:
        limit = min(limit, source.spec.context_length)
    if settings.context_cap:
        limit = min(limit, settings.context_cap)
    if context:
        limit = min(limit, context)

    why_dynamic = static_decode.why_not(model, _devices(model).split(":")[0], quantized=preset in ("int8", "nf4"))
    if why_dynamic is None:
        reasons.append("decode: static cache and a compiled step (CUDA graphs)")
    elif device_type == "cuda":
        reasons.append(f"decode: eager, on a dynamic cache ({why_dynamic})")
        notes.append(f"decode: eager, on a dynamic cache ({why_dynamic})")

    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        source=source,
        folder=folder,
        preset=preset,
        dtype=compute_dtype,
        device=_devices(model),
        attn_implementation=model.config._attn_implementation,
        footprint_bytes=int(model.get_memory_footprint()),
        context_length=limit,
        stop_token_ids=_stop_tokens(tokenizer, model),
        stop_strings=stop_strings,
        template_fallback=template_fallback,
        notes=notes,
        reasons=reasons,
        decode_path="dynamic" if why_dynamic else "static",
    )
    if draft_source is not None:
        attach_draft(loaded, draft_source, plan, settings, device, on_status, on_progress)
    return loaded


def out_of_memory(label: str, preset: str, plan, exc: BaseException) -> str:
    """One line for a load the GPU ran out of memory for: what the plan says it needs (when there was one),
    else the size torch failed to allocate."""
    if plan is not None:
        need = planner.shortfall(plan, preset)
    else:
        found = re.search(r"Tried to allocate [0-9.]+ [KMGT]iB", str(exc))
        need = found.group(0) if found else first_line(exc)[:120]
    return f"'{label}' ran out of GPU memory loading {preset} ({need}); free the GPU or pick a smaller preset"


def _devices(model) -> str:
    """Where the weights are: one device, or every device a device_map spread them over."""
    placed = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(placed) > 1:
        return "+".join(sorted(placed))
    return str(next(model.parameters()).device)


def _plan(folder: Path, label: str, preset: str, device: str, context: int | None, draft=None) -> planner.Plan:
    """The planner's choice for this preset here. A config.json or safetensors header it can't read is one line
    naming the file, whatever the preset: loading it anyway would fail later with a library's traceback."""
    facts = facts_from_folder(folder, label)
    return planner.choose(
        detect_hardware(device),
        facts,
        context=context,
        preset=preset,
        flash_attn_installed=flash_attn_installed(),
        draft=draft,
    )


def _supported_attention(folder: Path, wanted: str, trust_remote_code: bool = False) -> tuple[str, str]:
    """`wanted`, or the next best attention the model's class supports (Gemma 2 has no SDPA: its logits are
    soft-capped); and why it changed, or "". Remote-code classes are taken at their word."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)  # never a prompt on stdin
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError, OSError):
        return wanted, ""
    order = ["flash_attention_2", "sdpa", "eager"]
    supported = {
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", False),
        "sdpa": getattr(model_class, "_supports_sdpa", False),
        "eager": True,
    }
    if wanted not in supported or supported[wanted]:
        return wanted, ""
    chosen = next(a for a in order[order.index(wanted) :] if supported[a])
    return chosen, f"attention: {chosen} ({model_class.__name__} does not support {wanted})"
