"""How a distributed table syncs: the one definition of the table types.

``collaborative``: each device's rows kept in their own device table on
the others; ``single_version``: one merged table, per-column
last-writer-wins on the conflict column (SPEC §4). A ``str`` enum: its
members are the strings that travel, are stored and are shown, so they
compare equal to them and pack, bind and print as them.
"""

from __future__ import annotations

import enum


class TableType(str, enum.Enum):
    COLLABORATIVE = "collaborative"
    SINGLE_VERSION = "single_version"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def keyed_by(cls, conflict_column: str | None) -> TableType:
        """A distributed table's type from its conflict column: single_version
        tables have one, collaborative ones none (the one place this is decided)."""
        return cls.SINGLE_VERSION if conflict_column else cls.COLLABORATIVE
