"""The team stack's state: where it lives, its ports and secrets, saved as state.json readable by its owner only.

Every team module reads this one record, so none of them needs another's code to know the stack.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from cifar3study.team.processes import HOST, free_port, write_private

COMPONENTS = ("postgres", "s3", "mlflow")


@dataclasses.dataclass
class Stack:
    """Where the stack lives and how to reach it; saved as state.json in its folder."""

    dir: Path
    ports: dict[str, int]
    s3_key: str = ""
    s3_secret: str = ""
    pids: dict[str, int] = dataclasses.field(default_factory=dict)
    postgres_dir: str = ""  # the cluster's own folder, which the unprivileged user can reach
    postgres_password: str = ""  # the role mlflow's, given to clients in PGPASSWORD
    dvc_repo: str = ""  # where `up` wrote the DVC remote, for `down` to remove it
    dvc_config_created: bool = False  # `up` created .dvc/config.local: `down` may delete it

    @property
    def postgres_folder(self) -> Path:
        return Path(self.postgres_dir) if self.postgres_dir else self.dir / "postgres"

    @property
    def postgres_uri(self) -> str:
        """Without the password: libpq takes it from PGPASSWORD, so no command line shows it."""
        return f"postgresql+psycopg2://mlflow@{HOST}:{self.ports['postgres']}/mlflow"

    @property
    def ledger_uri(self) -> str:
        """The studies' ledger (Optuna's storage); the password comes from `pgpass`, a file only its owner reads."""
        return f"postgresql+psycopg2://mlflow@{HOST}:{self.ports['postgres']}/optuna"

    @property
    def pgpass(self) -> Path:
        return self.dir / "pgpass"

    @property
    def postgres_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.postgres_password}

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    def save(self) -> None:
        state = {**dataclasses.asdict(self), "dir": str(self.dir)}
        write_private(self.dir / "state.json", json.dumps(state, indent=1))


def open_stack(folder: Path) -> Stack:
    """The stack in `folder`: its saved state, or a new one on free ports."""
    folder = folder.resolve()
    if (folder / "state.json").is_file():
        state = json.loads((folder / "state.json").read_text())
        return Stack(**{**state, "dir": folder})
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # logs and state hold secrets; PostgreSQL lives elsewhere
    return Stack(folder, {name: free_port() for name in COMPONENTS})
