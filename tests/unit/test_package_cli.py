"""`shipyard package ...` and `shipyard signing-keys generate` on a real (tiny) training run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import ROOT
from typer.testing import CliRunner

from shipyard.cli import app
from shipyard.config import load_config
from shipyard.errors import PackageError
from shipyard.package import load_package, verify_package
from shipyard.train import fit

runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = load_config(
        {
            "name": "cli-digits",
            "task": "classification",
            "data": {"source": "builtin:digits"},
            "model": {"name": "mlp", "hidden_sizes": [16]},
            "train": {"epochs": None, "max_steps": 3, "batch_size": 32},
        }
    )
    return fit(config, run_dir=tmp_path_factory.mktemp("cli") / "run").run_dir


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.output


def test_training_writes_a_package(run_dir: Path) -> None:
    manifest = verify_package(run_dir / "package")
    assert manifest.name == "cli-digits" and manifest.version == "run"
    assert manifest.lineage.checkpoint_step == 3
    assert manifest.labels == [str(i) for i in range(10)]
    assert load_package(run_dir / "package").predict([[0.0] * 64])[0]["label"] in manifest.labels


def test_bare_and_build_forms(run_dir: Path, tmp_path: Path) -> None:
    out = invoke("package", str(run_dir), "-o", str(tmp_path / "bare"))
    assert "wrote package cli-digits run" in out
    invoke("package", "build", str(run_dir), "--out", str(tmp_path / "built"))
    a = (tmp_path / "bare" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "built" / "model.safetensors").read_bytes()
    assert "verify" in invoke("package", "--help")


def test_keys_sign_verify(run_dir: Path, tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    invoke("package", str(run_dir), "-o", str(pkg))
    assert "1 file(s) verified" in invoke("package", "verify", str(pkg))
    invoke("signing-keys", "generate", "-o", str(tmp_path / "me"))
    with pytest.raises(PackageError, match="not signed"):
        invoke("package", "verify", str(pkg), "--public-key", str(tmp_path / "me.pub"))
    invoke("package", "sign", str(pkg), "--key", str(tmp_path / "me.key"))
    out = invoke("package", "verify", str(pkg), "--public-key", str(tmp_path / "me.pub"))
    assert "signature valid" in out
    assert "classification" in invoke("package", "inspect", str(pkg))
    assert '"format_version": 2' in invoke("package", "inspect", str(pkg), "--json")


def test_pack_unpack_encrypt_decrypt(run_dir: Path, tmp_path: Path) -> None:
    pkg = run_dir / "package"
    invoke("package", "pack", str(pkg), "-o", str(tmp_path / "m.ship"))
    invoke("package", "unpack", str(tmp_path / "m.ship"), "-o", str(tmp_path / "un"))
    key = tmp_path / "k.hex"
    key.write_text("ab" * 32)
    invoke("package", "encrypt", str(pkg), "-o", str(tmp_path / "enc"), "--key-file", str(key))
    assert "AES-256-GCM" in invoke("package", "inspect", str(tmp_path / "enc"))
    invoke(
        "package",
        "decrypt",
        str(tmp_path / "enc"),
        "-o",
        str(tmp_path / "dec"),
        "--key-file",
        str(key),
    )
    assert (tmp_path / "dec" / "manifest.json").read_bytes() == (pkg / "manifest.json").read_bytes()


def test_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "shipyard", "package", "verify", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "not a package (no manifest.json)" in out.stderr
