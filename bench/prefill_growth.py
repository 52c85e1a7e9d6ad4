"""How a turn's prefill grows with the cache under it: N new tokens over each of several cache sizes.

    python bench/prefill_growth.py [--model REF] [--preset auto] [--new 125] [--contexts 160,1360] [--reps 7]
                                   [--rows 1] [--both]

A chat's turn prefills its new message on top of everything cached before it, and the new tokens attend to
all of it, so a later turn's time to first token grows with the chat even when nothing is re-encoded. This
loads the model as the app does, fills one cache per context size with random tokens, then times `--new`
more tokens over each (rolled back after each try), interleaving the sizes `--reps` times and printing the
medians and their ratio to the first size. The serve bench's turn 2 and turn 10 prefill about 125 tokens over
160 and 1,360 cached ones. `--rows 8 --new 8` times a speculative verify instead (logits for every row).
`--both` also times transformers' own SDPA in place of chatapp's (cpu_attention), interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-local")
    parser.add_argument("--preset", default="auto")
    parser.add_argument("--new", type=int, default=125, help="tokens prefilled over each cache")
    parser.add_argument("--contexts", default="160,1360", help="cache sizes, comma-separated")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rows", type=int, default=1, help="rows of logits to keep (a verify keeps them all)")
    parser.add_argument("--both", action="store_true", help="also time transformers' SDPA, interleaved")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.new < 1 or args.reps < 1 or args.rows < 1 or min(contexts) < 1:
        parser.error("--new, --reps, --rows and every context must be at least 1")

    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from chatapp.config import load_settings
    from chatapp.engine import cpu_attention, kvcache, load_model
    from chatapp.engine.generate import forward, prefill

    loaded = load_model(args.model, args.preset, settings=load_settings())
    model = loaded.model
    ids = torch.randint(100, min(loaded.tokenizer.vocab_size, 40000), (max(contexts) + args.new,)).tolist()
    caches = {}
    with torch.inference_mode():
        for ctx in contexts:
            caches[ctx] = kvcache.new_cache(model.config)
            prefill(model, caches[ctx], ids[:ctx])
    kinds = {"chatapp": cpu_attention.sdpa_forward}
    if args.both:
        kinds["transformers"] = sdpa_attention_forward
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.reps):
            for kind, attention in kinds.items():
                AttentionInterface.register("sdpa", attention)
                for ctx, cache in caches.items():
                    with torch.inference_mode():
                        started = time.perf_counter()
                        forward(model, cache, ids[ctx : ctx + args.new], rows=min(args.rows, args.new))
                        times.setdefault((kind, ctx), []).append(time.perf_counter() - started)
                        kvcache.drop(cache, args.new)
    finally:
        cpu_attention.install()
    print(
        f"{loaded.source.label} ({loaded.preset}, {loaded.attn_implementation}): {args.new} new tokens, "
        f"median of {args.reps}"
    )
    for kind in kinds:
        medians = [statistics.median(times[(kind, ctx)]) for ctx in contexts]
        cells = ", ".join(
            f"over {ctx:,}: {m:.3f} s ({m / medians[0]:.2f}x)" for ctx, m in zip(contexts, medians, strict=True)
        )
        print(f"  {kind} SDPA: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
