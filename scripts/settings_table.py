"""Print the README's configuration tables from the settings classes (or --check them).

Usage: python scripts/settings_table.py            # print the tables
       python scripts/settings_table.py --write    # replace them in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from shared.settings import CommonSettings
from worker.settings import WorkerSettings

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def env_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    if isinstance(alias, str):
        return alias
    return f"{cls.model_config.get('env_prefix', '')}{name}".upper()


def default_text(field: FieldInfo) -> str:
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    return "" if value in ("", None, []) else f"`{value}`"


def table(cls: type[BaseSettings], skip: set[str]) -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        if name in skip:
            continue
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{env_name(cls, name, field)}` | {default_text(field)} | {desc} |")
    return "\n".join(rows)


def tables() -> str:
    common = set(CommonSettings.model_fields)
    return "\n\n".join(
        [
            "**Both services**\n\n" + table(CommonSettings, set()),
            "**Gateway** (`slipstream gateway`)\n\n" + table(GatewaySettings, common),
            "**Worker** (`slipstream worker`)\n\n" + table(WorkerSettings, common),
        ]
    )


def main() -> int:
    text = tables()
    if "--write" in sys.argv:
        readme = Path("README.md")
        body = readme.read_text()
        head, _, rest = body.partition(BEGIN)
        _, _, tail = rest.partition(END)
        readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
