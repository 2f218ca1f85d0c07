"""deploy/compose.yaml's replica entrypoint, run as the container's shell runs it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_each_replica_prepares_the_database_before_it_serves(tmp_path: Path) -> None:
    """A fresh database holds no demo collection, and a replica started on it with `lorag
    serve` alone fails (no index 'demo'). The entrypoint reads the secrets, then runs `lorag
    prepare` (the demo built once however many replicas start together: tests/test_store_copy.py)
    and only then `lorag serve`, with the secrets in its environment; a failed prepare serves
    nothing."""
    service = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["lorag"]
    env = service["environment"]
    assert env["LORAG_STORE"] == "postgres"
    shell, flag, script = service["entrypoint"]
    script = script.replace("$$", "$")  # compose's escape for a literal $
    url, token = tmp_path / "db_url", tmp_path / "admin_token"
    url.write_text("postgresql://lorag:s3cret@db:5432/lorag\n")
    token.write_text("t0ken\n")
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "lorag"
    stub.write_text(
        '#!/bin/sh\necho "$1 $LORAG_DATABASE_URL $LORAG_ADMIN_TOKEN" >> "$CALLS"\n'
        '[ "$1" != prepare ] || exit "$PREPARE_RC"\n'
    )
    stub.chmod(0o755)

    def run(prepare_rc: int) -> subprocess.CompletedProcess[str]:
        calls.unlink(missing_ok=True)
        environ = {
            **{k: str(v) for k, v in env.items()},
            "LORAG_DATABASE_URL_FILE": str(url),
            "LORAG_ADMIN_TOKEN_FILE": str(token),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "CALLS": str(calls),
            "PREPARE_RC": str(prepare_rc),
        }
        return subprocess.run([shell, flag, script], env=environ, text=True, check=False)

    assert run(0).returncode == 0
    secrets = "postgresql://lorag:s3cret@db:5432/lorag t0ken"
    assert calls.read_text().splitlines() == [f"prepare {secrets}", f"serve {secrets}"]
    assert run(3).returncode == 3
    assert calls.read_text().splitlines() == [f"prepare {secrets}"]
