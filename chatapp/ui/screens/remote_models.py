"""The model picker on a remote backend: the server's /v1/models; choosing one loads it (the server has it)."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option

from ...errors import ChatappError
from ..backend import Target


class RemoteModelsScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self):
        super().__init__(classes="dialog-screen")

    def compose(self) -> ComposeResult:
        host = self.app.backend.client.host
        with Vertical(classes="dialog wide"):
            yield Label(f"Models on {host} (the server decides presets and memory)", markup=False)
            yield OptionList(id="remote-models")

    def on_mount(self) -> None:
        self.query_one(OptionList).add_option(Option("asking the server…", id="", disabled=True))
        self._list()

    @work(thread=True, exclusive=True, group="remote-models")
    def _list(self) -> None:
        try:
            models = self.app.backend.client.models()
        except ChatappError as exc:
            self.app.call_from_thread(self._show, [], str(exc))
            return
        self.app.call_from_thread(self._show, models, "")

    def _show(self, models: list[dict], error: str) -> None:
        options = self.query_one(OptionList)
        options.clear_options()
        if error:
            options.add_option(Option(error, id="", disabled=True))
            return
        current = self.app.backend.model
        for model in models:
            context = f" · context {model['context_length']:,}" if model["context_length"] else ""
            mark = " (loaded)" if model["id"] == current else ""
            options.add_option(Option(f"{model['id']}{context}{mark}", id=model["id"]))
        options.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.app.backend.switch(Target(event.option.id, "remote"))
        self.dismiss(None)
