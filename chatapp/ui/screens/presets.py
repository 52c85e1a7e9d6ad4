"""Switch the loaded model's preset: each option with the planner's fit and estimated memory."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList, Static
from textual.widgets.option_list import Option

from ...planner import auto_ladder
from ...units import gb


def option_text(preset: str, plan, current: str) -> str:
    if plan.choice is None:
        # This preset's own need (for auto: the least of the presets it tries), not the smallest of all presets.
        tried = auto_ladder(plan.hardware) if preset == "auto" else (preset,)
        need = min((est for est, _ in plan.presets if est.preset in tried), key=lambda est: est.total_bytes)
        fit = f"✗ needs {gb(need.total_bytes)} at {need.context_tokens:,} tokens: won't fit"
    else:
        where = "GPU+CPU, slow" if plan.choice.slow else plan.choice.device_map
        fit = f"✓ {gb(plan.choice.estimate.total_bytes)} on {where}"
        if preset == "auto":
            fit = f"→ {plan.choice.preset}, {fit}"
    mark = " (loaded)" if preset == current else ""
    return f"{preset:<5} {fit}{mark}"


class PresetScreen(ModalScreen[str | None]):
    """Dismisses with the chosen preset, or None."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, model: str, options: list[tuple[str, object]], current: str, cost: str = ""):
        super().__init__(classes="dialog-screen")
        self.model, self.options, self.current, self.cost = model, options, current, cost

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(f"Preset for {self.model}: the planner's estimate for this machine", markup=False)
            yield OptionList(
                *(Option(option_text(p, plan, self.current), id=p) for p, plan in self.options), id="presets"
            )
            if self.cost:
                yield Static(self.cost, id="switch-cost", markup=False)  # wraps, where a Label is cut

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)
