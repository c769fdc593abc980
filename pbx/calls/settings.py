"""What phones set for their own extension with feature codes: do-not-disturb
(``*78``/``*79``) and forwarding of every call (``*72NUMBER``/``*73``).

The settings live in memory, where every call to an extension reads them,
and in the ``extension_settings`` table, written before the phone hears its
confirmation, so that they survive a restart. What a phone set wins over
``extensions.N.forward.always`` in pbx.yaml until the phone changes it again:
``*73`` turns forwarding off even when pbx.yaml forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pbx.store.db import Store


@dataclass(frozen=True)
class Setting:
    """One extension's settings; ``forward`` None: pbx.yaml decides, "": off, else the number."""

    dnd: bool = False
    forward: str | None = None


class PhoneSettings:
    """Every extension's settings made by phone."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._settings: dict[str, Setting] = {}

    async def load(self) -> None:
        """Read what phones set before the last stop."""
        rows = await self.store.rows("extension_settings")
        self._settings = {row["extension"]: Setting(bool(row["dnd"]), row["forward_always"]) for row in rows}

    def of(self, extension: str) -> Setting:
        return self._settings.get(extension, Setting())

    async def set_dnd(self, extension: str, on: bool) -> None:
        await self._save(extension, replace(self.of(extension), dnd=on))

    async def set_forward(self, extension: str, number: str) -> None:
        """Forward every call to ``number``; "" turns forwarding off."""
        await self._save(extension, replace(self.of(extension), forward=number))

    async def _save(self, extension: str, setting: Setting) -> None:
        self._settings[extension] = setting
        row = {"extension": extension, "dnd": int(setting.dnd), "forward_always": setting.forward}
        await self.store.upsert("extension_settings", row)
