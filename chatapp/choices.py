"""What the model picker shows: rows for catalog, downloaded and Hub search models, with the planner's verdicts.

Plain Python (no textual, no torch), so it is tested without a screen and planned for any hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import planner
from .report import format_plan, speed, verdict, weights_verdict
from .units import gb, params

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .facts import ModelFacts
    from .hardware import Hardware
    from .hub import LocalModel, SearchResult


@dataclass(frozen=True)
class ModelRow:
    #: What loading it takes: a catalog key, or a Hub repo id.
    ref: str
    name: str
    params: int | None
    #: Bytes a download takes (an estimate from the parameter count: bf16 safetensors) or None.
    download_bytes: int | None
    license: str
    gated: bool
    context: int | None
    verdict: str
    #: Ready to load without a download: in the HF cache, or bundled (the starter).
    ready: bool
    size_on_disk: int | None = None
    plan: planner.Plan | None = None
    description: str = ""
    #: The Hub repo (for a catalog entry, the one its key stands for).
    repo: str = ""

    @property
    def fits(self) -> bool:
        return self.plan is not None and self.plan.choice is not None

    @property
    def preset(self) -> str:
        """The preset the planner would pick ("auto" when it can't tell)."""
        return self.plan.choice.preset if self.fits else "auto"

    @property
    def tokens_per_s(self) -> float | None:
        """The planner's decode-speed estimate for that preset (None when nothing fits)."""
        return self.plan.choice.tokens_per_s if self.fits else None

    @property
    def usable(self) -> bool:
        """Fits without a GPU+CPU split, and decodes fast enough to chat with (planner.USABLE_TOKENS_PER_S)."""
        return self.fits and not self.plan.choice.slow and (self.tokens_per_s or 0) >= planner.USABLE_TOKENS_PER_S

    @property
    def speed(self) -> str:
        """'~25 tok/s', or '-' when unknown."""
        return speed(self.plan) if self.plan else "-"

    def details(self) -> str:
        head = [self.name, self.description] if self.description else [self.name]
        facts = [
            f"parameters: {params(self.params)}",
            f"license: {self.license or 'unknown'}"
            + (" (gated: accept it on the Hub, then log in)" if self.gated else ""),
            f"on disk: {gb(self.size_on_disk, 2)}"
            if self.size_on_disk
            else ("ready (bundled)" if self.ready else f"download: about {gb(self.download_bytes or 0)}"),
        ]
        body = format_plan(self.plan) if self.plan else f"fit: {self.verdict}"
        return "\n".join([*head, "", *facts, "", body])


def _approx_download(params: int | None) -> int | None:
    return params * 2 if params else None


def _plan(hardware: Hardware, facts: ModelFacts, context_cap: int | None) -> planner.Plan:
    """The plan a verdict is given from: at the context the user will get (planner.practical_context)."""
    return planner.choose(hardware, facts, context=planner.practical_context(facts, context_cap))


def catalog_rows(
    catalog: dict[str, ModelSpec], hardware: Hardware, local: dict[str, LocalModel], context_cap: int | None = None
) -> list[ModelRow]:
    """Every catalog model; `local` maps repo ids to hub.LocalModel for what is downloaded.

    Verdicts are planned at the context the user will get: context_cap (settings.context_cap) when set, else
    planner.PRACTICAL_CONTEXT; each says how far the context can go.
    """
    from .facts import facts_from_spec

    rows = []
    for spec in catalog.values():
        facts = facts_from_spec(spec)
        plan = _plan(hardware, facts, context_cap) if facts else None
        # A bundled GGUF starter is not the HF download of the same repo.
        found = None if spec.gguf_package else local.get(spec.repo)
        rows.append(
            ModelRow(
                ref=spec.key,
                repo=spec.repo,
                name=spec.name,
                params=facts.params if facts else None,
                download_bytes=None if spec.gguf_package else _approx_download(facts.params if facts else None),
                license=spec.license,
                gated=spec.gated,
                context=spec.context_length or (facts.max_context if facts else None),
                verdict=verdict(plan) if plan else "unknown",
                ready=bool(spec.gguf_package) or found is not None,
                size_on_disk=found.size_bytes if found else None,
                plan=plan,
                description=spec.description,
            )
        )
    return rows


def recommended(rows: list[ModelRow]) -> list[ModelRow]:
    """Models that fit this machine and decode fast enough to chat with: ready ones first (nothing to wait for),
    then the biggest. After them, those that fit but would crawl (planner.USABLE_TOKENS_PER_S), fastest first."""
    fitting = [r for r in rows if r.fits and not r.plan.choice.slow]
    usable = sorted((r for r in fitting if r.usable), key=lambda r: (not r.ready, -(r.params or 0)))
    crawling = sorted((r for r in fitting if not r.usable), key=lambda r: -(r.tokens_per_s or 0))
    return usable + crawling


def local_rows(local: dict[str, LocalModel], hardware: Hardware, context_cap: int | None = None) -> list[ModelRow]:
    """Downloaded models, planned from their own config.json and safetensors headers."""
    from .errors import ChatappError
    from .facts import facts_from_folder

    rows = []
    for model in local.values():
        snapshots = sorted((model.path / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        plan = None
        if snapshots:
            try:
                plan = _plan(hardware, facts_from_folder(snapshots[-1], model.repo_id), context_cap)
            except ChatappError:
                plan = None
        rows.append(
            ModelRow(
                ref=model.repo_id,
                repo=model.repo_id,
                name=model.repo_id,
                params=plan.facts.params if plan else None,
                download_bytes=None,
                license="",
                gated=False,
                context=plan.facts.max_context if plan else None,
                verdict=verdict(plan) if plan else "unknown",
                ready=True,
                size_on_disk=model.size_bytes,
                plan=plan,
            )
        )
    return rows


def search_rows(results: list[SearchResult], hardware: Hardware, local: dict[str, LocalModel]) -> list[ModelRow]:
    """Hub search results: only the parameter count is known before a download, so the verdict is the weights'."""
    return [
        ModelRow(
            ref=r.repo_id,
            repo=r.repo_id,
            name=r.repo_id,
            params=r.params,
            download_bytes=_approx_download(r.params),
            license="gated" if r.gated else "",
            gated=r.gated,
            context=None,
            verdict=weights_verdict(hardware, r.params),
            ready=r.repo_id in local,
            size_on_disk=local[r.repo_id].size_bytes if r.repo_id in local else None,
            description=f"{r.downloads:,} downloads · updated {r.last_modified}",
        )
        for r in results
    ]


def preset_options(
    facts: ModelFacts, hardware: Hardware, context_cap: int | None = None
) -> list[tuple[str, planner.Plan]]:
    """Each preset with the planner's plan for it, as loading plans it (context_cap, else the model's full context
    lowered to fit): its estimate, and whether and where it fits."""
    return [
        (preset, planner.choose(hardware, facts, context=context_cap or None, preset=preset))
        for preset in planner.PRESETS
    ]
