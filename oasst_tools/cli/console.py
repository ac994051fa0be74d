"""Rich consoles for the CLI: tables on stdout, progress and warnings on stderr."""

from __future__ import annotations

from rich.console import Console

stdout = Console(soft_wrap=False)
stderr = Console(stderr=True)
